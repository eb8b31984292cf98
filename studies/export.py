"""Reading results out of a study: pick a trial, write its policy, rebuild its pruned model.

The policy file is versioned and self-describing (see :mod:`autoprune.policy`): every unit with
its sparsity, size and kept width, the budget and the achieved costs, the proxy accuracy, and the
identity of the model, weights, data and study it came from. ``--format torch-pruning`` writes a
``pruning_ratio_dict`` keyed by module name and ``--format nni`` an NNI ``config_list``, for users
of those tools.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from autoprune.errors import AutopruneError
from autoprune.fileio import write_document
from autoprune.policy import FORMAT, VERSION, Policy
from autoprune.studies.records import best_trial, completed, is_finite, pareto_front, study_attrs
from autoprune.studies.storage import open_storage

FORMATS = ("autoprune", "torch-pruning", "nni")
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
        raise AutopruneError(f"unknown --pick {pick!r}; choose one of: {', '.join(PICKS)}")
    trials = [t for t in completed(study) if is_finite(t) and "policy" in t.user_attrs]
    if not trials:
        raise AutopruneError(f"study {study.study_name!r} has no complete trial to export yet")
    if len(study.directions) == 1:
        return best_trial(study, trials)
    within = [t for t in trials if t.user_attrs.get("within_budget", True)] or trials
    metric = study.user_attrs.get("budget_metric", "flops")
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


def policy_document(study: optuna.Study, trial: FrozenTrial) -> dict:
    """The self-describing policy of ``trial`` (what ``export`` writes)."""
    s, a = study_attrs(study), trial.user_attrs
    names = s.get("unit_names") or list(a["policy"])
    units = []
    for i, name in enumerate(names):
        entry = {"name": name, "sparsity": a["policy"][name], "kept": a["widths"][i]}
        units.append(entry)
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": s.get("model"),
        "weights": s.get("weights"),
        "dataset": s.get("dataset"),
        "data": s.get("data"),
        "split_seed": s.get("split_seed"),
        "granularity": s.get("granularity"),
        "round_to": s.get("round_to"),
        "importance": s.get("importance"),
        "reconstruct": s["reconstruct"],
        "budget": s.get("budget"),
        "achieved": a["ratios"],
        "proxy_accuracy": a["accuracy"],
        "dense_proxy_accuracy": s.get("dense_accuracy"),
        "reward": a.get("reward"),
        "study": study.study_name,
        "trial": trial.number,
        "searcher": a.get("searcher"),
        "units": units,
    }


def to_torch_pruning(doc: dict) -> dict:
    """Torch-Pruning's ``pruning_ratio_dict``, keyed by each unit's root module name.

    Map names to modules with ``{model.get_submodule(k): v for k, v in d.items()}`` and pass it to
    ``tp.pruner.MetaPruner(..., pruning_ratio_dict=...)``; Torch-Pruning rounds widths itself.
    """
    return {"pruning_ratio_dict": {u["name"]: u["sparsity"] for u in doc["units"]},
            "round_to": doc.get("round_to"), "source": {k: doc[k] for k in ("model", "study", "trial")}}


def to_nni(doc: dict) -> list[dict]:
    """An NNI ``config_list``: one entry per unit, by module name, with its sparse ratio."""
    return [{"op_names": [u["name"]], "sparse_ratio": u["sparsity"]} for u in doc["units"]]


def write_policy(doc: dict, path: str | Path, fmt: str = "autoprune") -> Path:
    """Write ``doc`` in ``fmt`` to ``path`` (YAML when the suffix says so), atomically."""
    if fmt not in FORMATS:
        raise AutopruneError(f"unknown --format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    path = Path(path)
    if not path.parent.is_dir():
        raise AutopruneError(f"cannot write {path}: folder {path.parent} does not exist")
    data = {"autoprune": doc, "torch-pruning": to_torch_pruning, "nni": to_nni}[fmt]
    return write_document(path, data(doc) if callable(data) else data)


def export_model(study: optuna.Study, trial: FrozenTrial, model_dir: str | Path,
                 weights: str | None = None, data_dir: str | None = None, device: str = "cpu",
                 finetune=None, onnx: bool = False, latency_batches=(1,), quiet: bool = False,
                 reconstruct: str | None = None) -> dict:
    """Rebuild the study's task, prune with ``trial``'s policy and write the model files.

    The weights must be the ones the study searched (checked by SHA-256); by default the path the
    study recorded is used. The model is reconstructed as the study's episodes were, unless
    ``reconstruct`` says otherwise. Returns the metrics written to ``metrics.json``.
    """
    from autoprune.apply import apply_policy
    from autoprune.checkpoints import file_sha256
    from autoprune.task import PruningTask, TaskConfig

    s = study_attrs(study)
    if "model" not in s:
        raise AutopruneError(f"study {study.study_name!r} was not made by autoprune search")
    weights = weights or s.get("weights_path")
    recorded = str(s.get("weights", ""))
    if not s.get("pretrained"):
        if not weights or not Path(weights).is_file():
            raise AutopruneError(f"the study's weights file is not at {weights!r}; pass --weights PATH")
        if recorded.split(":")[-1] != file_sha256(weights):
            raise AutopruneError(f"{weights} is not the weights study {study.study_name!r} searched "
                                 f"({recorded}); pass the same file with --weights")
    config = TaskConfig(
        model=s["model"], weights=None if s.get("pretrained") else weights,
        pretrained=bool(s.get("pretrained")), dataset=s["dataset"], data_dir=data_dir or s.get("data_dir"),
        seed=s["split_seed"], granularity=s["granularity"], importance=s["importance"],
        exclude=tuple(s.get("exclude") or ()), round_to=s["round_to"],
        search_val_size=s.get("search_val_size"), calib_batches=s.get("calib_batches", 10),
        calib_batch_size=s.get("calib_batch_size", 64), bn_recalibration=s.get("bn_recalibration", True),
        reconstruct=reconstruct or s["reconstruct"],
        device=device,
    )
    task = PruningTask(config, progress=not quiet)
    doc = policy_document(study, trial)
    # the recorded widths are exact; the sparsities are the same widths as fractions
    policy = Policy.from_dict(doc, f"trial {trial.number}")
    if task.identity()["units_digest"] != s.get("units_digest", task.identity()["units_digest"]):
        raise AutopruneError("the rebuilt model's units are not the ones the study searched; was "
                             "the model definition changed since the search?")
    policy.meta.update({"study": study.study_name, "trial": trial.number})
    return apply_policy(task, policy, model_dir, finetune, test=True, latency_batches=latency_batches,
                        onnx=onnx, quiet=quiet)
