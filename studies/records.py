"""Trials <-> policies: what each episode leaves in the study, and how to read it back.

Every episode is one trial. Its parameters ``s/<unit>`` are the *requested* sparsities; its user
attributes hold what was achieved (the wall's output after rounding) and measured:

    policy        {unit: achieved sparsity}        widths       [kept elements per unit]
    accuracy      proxy accuracy on search-val     ratios       {flops, params[, latency]}
    reward        the env's reward                 reward_parts {...}
    within_budget bool                             searcher, episode, uid, worker, seconds
"""

from __future__ import annotations

import math

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from autoprune.agents.base import Episode, param_name

# What a study made before a key existed implies: its episodes ran without reconstruction.
LEGACY_DEFAULTS = {"reconstruct": "none"}


def study_attrs(study: optuna.Study) -> dict:
    """A study's user attributes, with the value each key had before it was recorded."""
    return {**LEGACY_DEFAULTS, **study.user_attrs}


def episode_attrs(ep: Episode, searcher: str, index: int, uid: str, seconds: float) -> dict:
    s = ep.summary
    return {
        "policy": {k: round(float(v), 10) for k, v in s["policy"].items()},
        "widths": s["widths"],
        "accuracy": s["accuracy"],
        "ratios": s["ratios"],
        "reward": s["reward"],
        "reward_parts": s["reward_parts"],
        "within_budget": s["within_budget"],
        "searcher": searcher,
        "episode": index,
        "uid": uid,
        "seconds": round(seconds, 3),
        "eval_seconds": round(s["eval_seconds"], 3),
        **({"reconstruction": s["reconstruction"]} if "reconstruction" in s else {}),
    }


def frozen_record(ep: Episode, unit_names: list[str], low: float, high: float, values: list[float],
                  attrs: dict) -> dict:
    """A complete trial as plain data (JSON-able), to add to a study with :func:`add_record`."""
    params = {param_name(n): float(min(max(r, low), high)) for n, r in zip(unit_names, ep.requested)}
    return {"params": params, "low": low, "high": high, "values": values, "user_attrs": attrs}


def add_record(study: optuna.Study, record: dict) -> None:
    dist = FloatDistribution(record["low"], record["high"])
    study.add_trial(optuna.trial.create_trial(
        params=record["params"], distributions={k: dist for k in record["params"]},
        values=record["values"], user_attrs=record["user_attrs"],
    ))


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def is_finite(trial: FrozenTrial) -> bool:
    return trial.values is not None and all(math.isfinite(v) for v in trial.values)


def best_trial(study: optuna.Study, trials: list[FrozenTrial] | None = None) -> FrozenTrial | None:
    """The best complete trial within budget: highest reward (highest accuracy if multi-objective)."""
    trials = [t for t in (trials if trials is not None else completed(study)) if is_finite(t)]
    if not trials:
        return None
    within = [t for t in trials if t.user_attrs.get("within_budget", True)] or trials
    key = "reward" if len(study.directions) == 1 else "accuracy"
    return max(within, key=lambda t: (t.user_attrs.get(key, t.values[0]), -t.number))


def policy_of(trial: FrozenTrial) -> dict[str, float]:
    """The achieved per-unit sparsities of a trial."""
    return dict(trial.user_attrs["policy"])


def pareto_front(trials: list[FrozenTrial], metric: str) -> list[FrozenTrial]:
    """Trials not dominated on (proxy accuracy up, ``metric`` ratio down), sorted by cost."""
    pts = [(t.user_attrs["accuracy"], t.user_attrs["ratios"][metric], t) for t in trials]
    front = [p for p in pts if not any(q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1])
                                       for q in pts)]
    return [t for _, _, t in sorted(front, key=lambda p: (p[1], -p[0]))]
