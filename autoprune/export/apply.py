"""Apply a policy end to end: prune, reconstruct, recalibrate, (fine-tune), measure and write.

This is what :func:`autoprune.apply` runs and what :meth:`autoprune.SearchResult.export` reuses: the
pruned model, reconstructed and recalibrated exactly as a search episode scores it (``pruned.pt`` and
``model.pt2``), its achieved policy, and a metrics JSON comparing the dense and pruned models on
FLOPs, params, measured latency and accuracy.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoprune.cost.latency import default_threads, measure_ratio
from autoprune.cost.runtimes import get_runtime
from autoprune.errors import AutopruneError
from autoprune.evaluate.metrics import proxy_label
from autoprune.export.artifacts import OutputDir, check_output_dir, export_program, pruned_payload
from autoprune.finetune.loop import FinetuneConfig, FinetuneResult, finetune, finished
from autoprune.prune.granularity import check_patterns
from autoprune.task import PruningTask
from autoprune.units.policy import Policy

log = logging.getLogger(__name__)


def _note(msg: str, quiet: bool) -> None:
    """What ``apply`` reports as it goes, shown by default (a warning), never when ``quiet``."""
    if not quiet:
        log.warning(msg)


def hint_points(task: PruningTask, kept) -> dict[str, torch.Tensor]:
    """Where feature-map hints compare the pruned model with the dense one: every BatchNorm whose
    channels a unit prunes, with the dense channel indices it kept (in order, as the cut keeps them;
    all of them where the policy cut none)."""
    if task.config.granularity != "channel":
        raise AutopruneError("feature-map hints need granularity 'channel' (masked weights keep every channel)")
    kept_out = task.kept_outputs(kept)
    points = {}
    for unit in task.table.units:
        for name in unit.members:
            module = task.dense.get_submodule(name)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                points[name] = torch.as_tensor(kept_out.get(name, np.arange(module.num_features)), dtype=torch.long)
    return points


def run_finetune(task: PruningTask, model, how, quiet: bool = False, run_dir: Path | None = None,
                 resume: bool = False, log_test: bool = False, tag: dict | None = None,
                 desc: str = "fine-tune", kept=None) -> FinetuneResult | None:
    """Fine-tune ``model`` in place: a :class:`FinetuneConfig` on the task's training split (with
    distillation from the dense model if it asks, the best epoch kept by search-val, which the
    fine-tune never trains on), or ``how(model)``, the user's own training. With ``run_dir``
    the run checkpoints every epoch there and logs ``finetune.csv`` (test accuracy too with
    ``log_test``). ``kept`` (the policy's widths) places feature-map hints when the config asks for
    them. Returns what ran (``None``: nothing did)."""
    if how is None:
        return None
    if callable(how):
        how(model)
        model.eval()
        return FinetuneResult(model)
    if not (how.epochs > 0 or how.steps):
        return None
    if task.splits is None:
        raise AutopruneError("FinetuneConfig trains on a registered dataset; for a model given in "
                             "Python pass finetune=a function that trains the model in place")
    teacher = task.dense if how.distill > 0 or how.hint > 0 else None
    if how.hint > 0 and kept is None:
        raise AutopruneError("feature-map hints need the policy's kept widths")
    hints = hint_points(task, kept) if how.hint > 0 else None
    return finetune(model, task.splits, how, teacher=teacher, device=task.device, progress=not quiet,
                    desc=desc, run_dir=run_dir, resume=resume, validate=task.val_accuracy,
                    test=task.test_accuracy if log_test and task.has_test else None, tag=tag, hints=hints)


def apply_policy(
    task: PruningTask,
    policy: Policy,
    out_dir: str | Path,
    finetune_cfg: FinetuneConfig | None = None,
    test: bool = True,
    latency_batches: tuple[int, ...] = (1,),
    latency_device: str = "cpu",
    latency_threads: int | None = None,
    latency_runtime: str = "eager",
    program: bool = True,
    onnx: bool = False,
    quiet: bool = False,
    resume: bool = False,
    extra: dict | None = None,
) -> dict:
    """Prune the task's dense model with ``policy`` and write model, policy and metrics.

    A :class:`FinetuneConfig` fine-tune checkpoints every epoch into ``out_dir`` and logs
    ``finetune.csv`` there; ``resume`` continues a killed one. ``extra`` is merged into the
    metrics (the top-K selection's record). Latency is measured by ``latency_runtime`` (a name in
    :data:`~autoprune.cost.runtimes.RUNTIMES`), which each ``metrics["latency"]`` entry records. Returns
    the metrics dict written to ``metrics.json``.
    """
    kept = task.kept(policy)  # validates the policy before any work
    get_runtime(latency_runtime).check(latency_device)  # and the runtime (a missing package)
    achieved = Policy.from_kept(task.table, kept, **{k: v for k, v in policy.meta.items()
                                                     if k not in ("format", "version")})
    model = task.prune(kept)
    metrics = _cost_metrics(task, model, kept)
    _note(f"pruned: FLOPs x{metrics['ratios']['flops']:.3f}, params x{metrics['ratios']['params']:.3f}", quiet)
    test = test and task.has_test
    _score_pruned(task, model, kept, metrics, test, quiet)
    run_dir = _finetune_phase(task, model, kept, finetune_cfg, out_dir, metrics, test, quiet, resume)
    metrics.update(extra or {})

    model = task.pruner.finalize(model.cpu())
    checked = check_patterns(model, task.table, kept)
    if checked:
        metrics["patterns_checked"] = checked  # every layer cut to a pattern satisfies it
    if checked and task.config.granularity.startswith("nm"):
        metrics["semi_structured"] = _semi_structured(task, model, quiet)
    metrics["latency"] = _latencies(task, model, latency_batches, latency_device, latency_threads,
                                    latency_runtime, quiet)
    task.dense.to(task.device)

    achieved.meta.update({"model": task.config.model, "weights": task.weights_id,
                          "reconstruct": task.config.reconstruct, "achieved": metrics["ratios"]})
    _write_outputs(task, model, kept, achieved, metrics, out_dir, program, onnx, quiet)
    if run_dir is not None:
        finished(run_dir)  # the weights are in the model files now; finetune.csv stays
    return metrics


def _cost_metrics(task: PruningTask, model: nn.Module, kept) -> dict:
    """The metrics' head: what was pruned, and its FLOPs and params against the dense model's."""
    dense_cost, counted = task.dense_costs, task.counted_costs(model)
    return {
        "model": task.config.model,
        "dataset": task.config.dataset,
        "granularity": task.table.granularity,
        "flops_kind": task.table.strategy.flops_kind,
        "dense": {"flops": dense_cost.flops, "params": dense_cost.params},
        "pruned": {"flops": counted.flops, "params": counted.params},
        "ratios": {"flops": counted.flops / dense_cost.flops, "params": counted.params / dense_cost.params},
        "closed_form_ratios": task.cost_ratios(kept),
    }


def _score_pruned(task: PruningTask, model: nn.Module, kept, metrics: dict, test: bool, quiet: bool) -> None:
    """Reconstruct and recalibrate ``model`` as a search episode does, scoring it before and after
    (and on the test split with ``test``), into ``metrics``."""
    metrics["dense"]["proxy_acc"] = task.dense_accuracy()
    metrics["pruned"]["proxy_acc_selected"] = task.proxy_accuracy(model)
    report = task.calibrate(model, kept)  # what the search scored, so what export writes
    metrics["pruned"]["proxy_acc"] = task.proxy_accuracy(model)
    metrics["reconstruct"], metrics["proxy"] = task.config.reconstruct, task.config.proxy
    if task.splits is not None:  # which images scored what
        metrics["search_val"] = {"from": task.splits.search_val_from, "images": len(task.splits.search_val),
                                 "test_images": len(task.splits.test)}
    if report is not None:
        metrics["reconstruction"] = {"refit": report.refit, "fallbacks": report.fallbacks,
                                     "traced": report.traced, "seconds": round(report.seconds, 3)}
    _note(f"{proxy_label(task.config.proxy)} (search-val): dense {metrics['dense']['proxy_acc']:.2%}, pruned "
          f"{metrics['pruned']['proxy_acc_selected']:.2%} as selected / {metrics['pruned']['proxy_acc']:.2%} "
          f"after {'reconstruction (' + str(report.refit) + ' layers refit) and ' if report else ''}"
          "BN recalibration", quiet)
    if test:
        metrics["dense"]["test_acc"] = task.test_accuracy(task.dense)
        metrics["pruned"]["test_acc"] = task.test_accuracy(model)
        _note(f"test accuracy: dense {metrics['dense']['test_acc']:.2%}, pruned "
              f"{metrics['pruned']['test_acc']:.2%}", quiet)


def _finetune_phase(task: PruningTask, model: nn.Module, kept, finetune_cfg, out_dir: str | Path,
                    metrics: dict, test: bool, quiet: bool, resume: bool) -> Path | None:
    """Fine-tune ``model`` in place if asked and record how it went in ``metrics``. Returns the
    folder a :class:`FinetuneConfig` run checkpoints into (``None``: none)."""
    run_dir, made = None, False
    if isinstance(finetune_cfg, FinetuneConfig) and (finetune_cfg.epochs > 0 or finetune_cfg.steps):
        run_dir = Path(out_dir)
        check_output_dir(run_dir)
        made = not run_dir.exists()
        run_dir.mkdir(exist_ok=True)
    tag = {"model": task.config.model, "weights": task.weights_id, "kept": [int(k) for k in kept]}
    try:
        ran = run_finetune(task, model, finetune_cfg, quiet, run_dir=run_dir, resume=resume, log_test=test,
                           tag=tag, kept=kept)
    except AutopruneError:
        if made:  # a run that failed (not one killed: that keeps its checkpoint to resume) leaves nothing
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if ran is None:
        return run_dir
    metrics["finetune"] = asdict(finetune_cfg) if isinstance(finetune_cfg, FinetuneConfig) else "user"
    if ran.history:
        metrics["finetune_run"] = {"epochs": len(ran.history), "best_epoch": ran.best_epoch,
                                   "val_before": ran.val_before, "resumed_after": ran.resumed_after,
                                   "log": "finetune.csv"}
    # the fine-tune scored the weights it kept by top-1 on search-val (a user's own training did not)
    scored = ran.val_acc is not None and task.config.proxy == "acc"
    metrics["pruned"]["proxy_acc_finetuned"] = ran.val_acc if scored else task.proxy_accuracy(model)
    if test:
        metrics["pruned"]["test_acc_finetuned"] = task.test_accuracy(model)
        _note(f"after fine-tuning: test accuracy {metrics['pruned']['test_acc_finetuned']:.2%}"
              + (f" (epoch {ran.best_epoch} of {len(ran.history)}, kept by search-val)" if ran.history else ""),
              quiet)
    return run_dir


def _semi_structured(task: PruningTask, model: nn.Module, quiet: bool) -> dict:
    """Where the task runs on a GPU with sparse tensor cores: which layers take the 2:4 sparse
    form, and how far its outputs are from the masked model's; elsewhere, why not."""
    from autoprune.cost.semi_structured import check_semi_structured, semi_structured

    try:
        sparse, report = semi_structured(model, task.device)
    except AutopruneError as err:
        _note(f"2:4 sparse kernels not checked: {err}", quiet)
        return {"checked": False, "why": str(err)}
    converted = [r.name for r in report if r.converted]
    try:
        diff = check_semi_structured(model, sparse, task.calibration_inputs()[:64]) if converted else 0.0
    except RuntimeError as err:  # a kernel this GPU or build lacks: the export itself stands
        _note(f"2:4 sparse kernels failed to run: {err}", quiet)
        return {"checked": False, "why": f"the sparse model failed to run: {str(err).strip().splitlines()[0]}"}
    _note(f"2:4 sparse kernels: {len(converted)} of {len(report)} layers converted (autoprune.semi_structured), "
          f"largest output difference {diff:.2g} of the largest output (bfloat16)", quiet)
    return {"checked": True, "converted": len(converted), "max_rel_diff": diff,
            "layers": [r.to_dict() for r in report]}


def _latencies(task: PruningTask, model: nn.Module, batches: tuple[int, ...], device: str,
               threads: int | None, runtime: str, quiet: bool) -> dict:
    """The dense and the (finalised) pruned model's latency at each batch size, timed in alternation."""
    latency = {}
    threads = threads or default_threads(device)
    for batch in batches:
        ratio, d, p = measure_ratio(task.dense, model, task.table.input_shape, device, batch,
                                    threads, pairs=30, runtime=runtime)
        latency[f"batch{batch}"] = {
            "runtime": runtime, "device": device, "threads": threads, "runs": d.runs,
            "dense_ms": d.median_s * 1e3, "pruned_ms": p.median_s * 1e3, "ratio": ratio,
        }
        _note(f"latency ({runtime} on {device}, batch {batch}, {threads} thread(s), {d.runs} alternated "
              f"runs): dense {d.median_s * 1e3:.2f} ms, pruned {p.median_s * 1e3:.2f} ms "
              f"(median ratio x{ratio:.3f})", quiet)
    return latency


def _write_outputs(task: PruningTask, model: nn.Module, kept, achieved: Policy, metrics: dict,
                   out_dir: str | Path, program: bool, onnx: bool, quiet: bool) -> None:
    """Write the model files, ``policy.json`` and ``metrics.json`` into ``out_dir``, all at once."""
    with OutputDir(out_dir) as tmp:
        if task.model_spec is not None:  # a model autoprune can build again from its name
            torch.save(pruned_payload(model, task.table, kept, achieved, task.config.model, task.model_spec,
                                      task.config.exclude), tmp / "pruned.pt")
        if program:
            export_program(model, task.example, tmp / "model.pt2")
        if onnx:
            from autoprune.export.artifacts import export_onnx

            metrics["onnx"] = export_onnx(model, task.example, tmp / "model.onnx",
                                          task.calibration_inputs()[:64].cpu())
            metrics["onnx"]["path"] = "model.onnx"
            _note(f"ONNX: onnxruntime matches PyTorch within {metrics['onnx']['max_abs_diff']:.2g}", quiet)
        achieved.save(tmp / "policy.json", task.table)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
