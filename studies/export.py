"""Reading results out of a study: pick a trial, write its policy, rebuild its pruned model.

The policy file is versioned and self-describing (see :mod:`autoprune.units.policy`): every unit with
its sparsity, size and kept width, the budget and the achieved costs, the proxy accuracy, and the
identity of the model, weights, data and study it came from. ``--format torch-pruning`` writes a
``pruning_ratio_dict`` keyed by module name and ``--format nni`` an NNI ``config_list``, for users
of those tools.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from autoprune.errors import AutopruneError
from autoprune.studies.records import StudyRecord, best_trial, completed, is_finite, pareto_front
from autoprune.studies.storage import open_storage
from autoprune.units.policy import Policy

PICKS = ("accuracy", "cost", "knee")


def load_study(name: str, storage_url: str) -> optuna.Study:
    storage = open_storage(storage_url)
    try:
        names = [s.study_name for s in storage.get_all_studies()]
    except Exception as err:
        raise AutopruneError(f"cannot read studies from {storage_url}: {str(err).splitlines()[0][:200]}") \
            from None
    if name not in names:
        known = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "") if names else "none"
        raise AutopruneError(f"no study {name!r} in {storage_url} (studies there: {known}); "
                             "see `autoprune studies --storage URL`")
    return optuna.load_study(study_name=name, storage=storage)


def choose_trial(study: optuna.Study, number: int | None = None, pick: str = "accuracy") -> FrozenTrial:
    """The trial to export: ``number``, or the best within budget (a Pareto pick if two objectives)."""
    if number is not None:
        match = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not match:
            raise AutopruneError(f"study {study.study_name!r} has no trial {number}")
        if match[0].state != TrialState.COMPLETE or "policy" not in match[0].user_attrs:
            raise AutopruneError(f"trial {number} of {study.study_name!r} is {match[0].state.name}, "
                                 "not a complete episode")
        return match[0]
    if pick not in PICKS:
        raise AutopruneError(f"unknown pick {pick!r}; choose one of: {', '.join(PICKS)}")
    trials = [t for t in completed(study) if is_finite(t) and "policy" in t.user_attrs]
    if not trials:
        raise AutopruneError(f"study {study.study_name!r} has no complete trial to export yet")
    if len(study.directions) == 1:
        return best_trial(study, trials)
    within = [t for t in trials if t.user_attrs.get("within_budget", True)] or trials
    metric = StudyRecord.of(study).search.env.parsed_budget.metric
    front = pareto_front(within, metric)
    if pick == "cost":
        return front[0]
    if pick == "accuracy":
        return max(front, key=lambda t: t.user_attrs["accuracy"])
    # knee: the front point farthest from the line joining its two ends (normalised axes)
    acc = np.array([t.user_attrs["accuracy"] for t in front])
    cost = np.array([t.user_attrs["ratios"][metric] for t in front])
    if len(front) < 3:
        return max(front, key=lambda t: t.user_attrs["accuracy"])
    a = (acc - acc.min()) / max(np.ptp(acc), 1e-12)
    c = (cost - cost.min()) / max(np.ptp(cost), 1e-12)
    dist = np.abs((c[-1] - c[0]) * (a[0] - a) - (c[0] - c) * (a[-1] - a[0]))
    return front[int(dist.argmax())]


def trial_policy(study: optuna.Study, trial: FrozenTrial) -> Policy:
    """The achieved policy of ``trial``, with exact widths and what makes it self-describing:
    the task it was searched on, the budget, what it achieved and where it came from."""
    record, a = StudyRecord.of(study), trial.user_attrs
    task, fp = record.task, record.fingerprint
    names = list(fp.unit_names) or list(a["policy"])
    meta = {
        "model": task.model, "weights": fp.weights, "dataset": task.dataset, "data": fp.data,
        "split_seed": task.seed, "granularity": task.granularity, "round_to": fp.round_to,
        "importance": task.importance, "reconstruct": task.reconstruct, "budget": record.search.budget,
        "achieved": a["ratios"], "proxy_accuracy": a["accuracy"], "dense_proxy_accuracy": fp.dense_score,
        "reward": a.get("reward"), "study": study.study_name, "trial": trial.number,
        "searcher": a.get("searcher"),
    }
    return Policy({n: a["policy"][n] for n in names}, meta, {n: int(k) for n, k in zip(names, a["widths"])},
                  dict(a.get("patterns") or {}))


def policy_document(study: optuna.Study, trial: FrozenTrial) -> dict:
    """The self-describing policy of ``trial`` as the document ``export`` writes."""
    return trial_policy(study, trial).to_dict()


def rebuild_task(record: StudyRecord, weights: str | None = None, data_dir: str | None = None,
                 device: str | None = None, reconstruct: str | None = None, progress: bool = True,
                 study_name: str = "the study"):
    """The study's task, built again from its record: the same weights (checked by SHA-256), data,
    units and evaluation. ``weights`` and ``data_dir`` replace files that moved; ``device`` and
    ``reconstruct`` change how the model is scored and rebuilt."""
    from autoprune.model.checkpoints import file_sha256
    from autoprune.task import PruningTask

    task, fp = record.task, record.fingerprint
    if task.model.startswith("python:"):
        raise AutopruneError(f"the study searched a model given in Python ({task.model[7:]}); open it "
                             "with autoprune.load(name, storage, model=..., score=..., calib=...)")
    weights = weights or task.weights or fp.weights_path
    if not task.pretrained:
        if not weights or not Path(weights).is_file():
            raise AutopruneError(f"the study's weights file is not at {weights!r}; give its new path "
                                 "(weights)")
        if fp.weights.split(":")[-1] != file_sha256(weights):
            raise AutopruneError(f"{weights} is not the weights study {study_name!r} searched ({fp.weights}); "
                                 "pass the same file with --weights")
    config = replace(task, weights=None if task.pretrained else str(Path(weights).resolve()),
                     data_dir=data_dir or task.data_dir, device=device or task.device,
                     reconstruct=reconstruct or task.reconstruct)
    built = PruningTask(config, progress=progress)
    check_fingerprint(built.fingerprint(), fp)
    return built


def check_fingerprint(built, recorded) -> None:
    """Refuse a rebuilt task whose units (or weights, data) are not those the study searched."""
    different = built.mismatch(recorded.to_attrs())
    if different:
        key, theirs, mine = different
        what = {"units_digest": "units"}.get(key, key)
        raise AutopruneError(f"the rebuilt task's {what} differ from the study's ({theirs!r} searched, "
                             f"{mine!r} now); was the model, its weights or the data changed since the search?")
