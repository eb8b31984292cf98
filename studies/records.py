"""The records a study holds, and trials <-> policies.

A study's user attributes are typed records (:mod:`autoprune.common.records`), each under its own
namespace: ``task.*`` (:class:`~autoprune.task.TaskConfig`, how to rebuild the task),
``fingerprint.*`` (:class:`~autoprune.task.Fingerprint`, what the built task was),
``search.*`` (:class:`SearchSpec`) and ``run.*`` (:class:`Provenance`). The fields marked
``identity`` are what ``--resume`` and ``export`` check; those marked ``sibling`` group studies
of one task in reports. :class:`StudyRecord` reads and writes them together.

Every episode is one trial. Its parameters ``s/<unit>`` are the *requested* sparsities; its user
attributes are an :class:`EpisodeRecord`: what was achieved (the wall's output after rounding)
and measured. A trial holds one record, so its keys need no namespace:

    policy        {unit: achieved sparsity}        widths       [kept elements per unit]
    accuracy      proxy score on search-val        ratios       {flops, params[, latency]}
    reward        the env's reward                 reward_parts {...}
    within_budget bool                             searcher, episode, uid, worker, seconds
    latency       {pairs, margin[, first]}: how a latency budget's figure was measured (latency
                  budgets only; an episode recorded before it existed was measured with 30 pairs
                  and aimed at the budget itself)
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from autoprune.agents.base import Episode
from autoprune.common.records import Record, spec
from autoprune.envs.config import EnvConfig
from autoprune.errors import AutopruneError
from autoprune.task import Fingerprint, TaskConfig


@dataclass(frozen=True)
class SearchSpec(Record):
    """How the search chooses and scores policies (``search.*``): the env's settings
    (:class:`~autoprune.envs.config.EnvConfig`, stored flat under the same namespace) and the
    searcher's.

    Attributes:
        env: the env's settings, budget first.
        searcher: a registered searcher.
        episodes: complete trials the study should hold.
        seed: the searcher's seed.
        early_stop: the pruner that may stop scoring a policy after a chunk of search-val
            (``median``, ``halving``; None scores every episode in full).
        options: searcher options (e.g. ``{"warmup": 100}`` for RL agents).
    """

    namespace: ClassVar[str] = "search"

    env: EnvConfig = field(default_factory=EnvConfig)
    searcher: str = spec("tpe", identity=True)
    episodes: int = spec(60, legacy_key="episodes_requested")
    seed: int = 0
    early_stop: str | None = spec(None, legacy=None)
    options: dict = spec(default_factory=dict, legacy={})

    @property
    def budget(self) -> str:
        return self.env.budget


@dataclass(frozen=True)
class Provenance(Record):
    """Where a study came from (``run.*``): the command, when, and the library versions."""

    namespace: ClassVar[str] = "run"

    command: str = spec("", legacy_key="command")
    created: str = spec("", legacy_key="created")
    versions: dict = spec(default_factory=dict, legacy_key="versions")

    @classmethod
    def now(cls, command: str = "") -> Provenance:
        import gymnasium
        import stable_baselines3
        import torch

        import autoprune
        from autoprune.units import tp_adapter

        return cls(command, time.strftime("%Y-%m-%dT%H:%M:%S%z"), {
            "autoprune": autoprune.__version__, "torch": torch.__version__, "optuna": optuna.__version__,
            "stable_baselines3": stable_baselines3.__version__, "gymnasium": gymnasium.__version__,
            "torch_pruning": tp_adapter.version()})


@dataclass(frozen=True)
class StudyRecord:
    """Everything a study records about itself, read and written as one."""

    task: TaskConfig
    fingerprint: Fingerprint
    search: SearchSpec
    run: Provenance = field(default_factory=Provenance)

    def parts(self) -> tuple[Record, ...]:
        return (self.task, self.fingerprint, self.search, self.run)

    def to_attrs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in self.parts():
            out.update(part.to_attrs())
        return out

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StudyRecord:
        return cls(TaskConfig.from_attrs(attrs), Fingerprint.from_attrs(attrs), SearchSpec.from_attrs(attrs),
                   Provenance.from_attrs(attrs))

    @classmethod
    def of(cls, study: optuna.Study) -> StudyRecord:
        """The record of a study made by ``autoprune search`` (a user error for any other)."""
        try:
            return cls.from_attrs(study.user_attrs)
        except AutopruneError:
            raise AutopruneError(f"study {study.study_name!r} was not made by autoprune search") from None

    def mismatch(self, attrs: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
        """The first identity field that a study's ``attrs`` record differently: ``(key, theirs, mine)``."""
        for part in self.parts():
            found = part.mismatch(attrs)
            if found:
                return found
        return None

    def sibling_of(self, attrs: Mapping[str, Any]) -> bool:
        """Whether the study of ``attrs`` searched the same task, scored the same way."""
        return all(part.same(attrs) for part in self.parts())


@dataclass(frozen=True)
class EpisodeRecord(Record):
    """What one episode leaves in its trial (flat keys: a trial holds one record)."""

    policy: dict
    widths: tuple[int, ...]
    accuracy: float
    ratios: dict
    reward: float
    reward_parts: dict
    within_budget: bool
    searcher: str
    episode: int
    uid: str
    seconds: float
    eval_seconds: float
    reconstruction: dict | None = None
    rule: str | None = None  # the one-shot rule this episode played (the portfolio every search starts from)
    latency: dict | None = None  # how a latency budget's figure was measured: pairs, margin[, first]
    agent: dict | None = None  # an RL agent's learning after this episode: critic/actor loss, sigma, baseline
    patterns: dict | None = None  # N:M granularity: each unit's pattern
    repeat: bool | None = None  # widths this search scored before: that episode's scores, not scored again

    pruned_after_chunks: int | None = None  # scoring stopped early (--early-stop): the trial is pruned

    @classmethod
    def of(cls, ep: Episode, searcher: str, index: int, uid: str, seconds: float) -> EpisodeRecord:
        o = ep.outcome
        return cls(
            policy={k: round(float(v), 10) for k, v in o.policy.items()}, widths=o.widths,
            accuracy=o.accuracy, ratios=o.ratios, reward=o.reward, reward_parts=o.reward_parts,
            within_budget=o.within_budget, searcher=searcher, episode=index, uid=uid,
            seconds=round(seconds, 3), eval_seconds=round(o.eval_seconds, 3),
            reconstruction=o.reconstruction, rule=ep.rule, latency=o.latency, agent=ep.agent,
            pruned_after_chunks=o.stopped_after, patterns=o.patterns, repeat=o.repeat or None,
        )

    def to_attrs(self) -> dict[str, Any]:
        attrs = super().to_attrs()
        for key in ("reconstruction", "rule", "latency", "agent", "pruned_after_chunks", "patterns", "repeat"):
            if attrs[key] is None:
                del attrs[key]
        if self.pruned_after_chunks is not None:  # a partial score earns no reward and meets no budget
            for key in ("reward", "reward_parts", "within_budget"):
                del attrs[key]
        return attrs


def add_record(study: optuna.Study, record: dict) -> None:
    """Add a complete trial saved as plain data (an RL agent's pending episode, as checkpoints
    written before every episode went through ask/tell held it)."""
    names = list(record["params"])
    # a record saved before per-unit bounds holds one number for all units
    lows = record["low"] if isinstance(record["low"], list) else [record["low"]] * len(names)
    highs = record["high"] if isinstance(record["high"], list) else [record["high"]] * len(names)
    study.add_trial(optuna.trial.create_trial(
        params=record["params"],
        distributions={k: FloatDistribution(lo, hi) for k, lo, hi in zip(names, lows, highs)},
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


def top_trials(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The ``k`` best complete trials within budget, best first, one per distinct policy (the
    order of :func:`best_trial`; a policy sampled twice counts once)."""
    trials = [t for t in completed(study) if is_finite(t) and "widths" in t.user_attrs]
    within = [t for t in trials if t.user_attrs.get("within_budget", True)] or trials
    key = "reward" if len(study.directions) == 1 else "accuracy"
    ranked = sorted(within, key=lambda t: (-t.user_attrs.get(key, t.values[0]), t.number))
    seen, top = set(), []
    for t in ranked:
        widths = tuple(t.user_attrs["widths"])
        if widths not in seen:
            seen.add(widths)
            top.append(t)
        if len(top) == k:
            break
    return top


def policy_of(trial: FrozenTrial) -> dict[str, float]:
    """The achieved per-unit sparsities of a trial."""
    return dict(trial.user_attrs["policy"])


def best_rule_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best of the one-shot rules the search started from (trials that record a ``rule``)."""
    rules = [t for t in completed(study) if t.user_attrs.get("rule")]
    return best_trial(study, rules) if rules else None


def pareto_front(trials: list[FrozenTrial], metric: str) -> list[FrozenTrial]:
    """Trials not dominated on (proxy accuracy up, ``metric`` ratio down), sorted by cost."""
    pts = [(t.user_attrs["accuracy"], t.user_attrs["ratios"][metric], t) for t in trials]
    front = [p for p in pts if not any(q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1])
                                       for q in pts)]
    return [t for _, _, t in sorted(front, key=lambda p: (p[1], -p[0]))]
