"""Apply a policy end to end: prune, reconstruct, recalibrate, (fine-tune), measure and write.

This is what `autoprune apply` runs and what `autoprune export --weights` reuses: the pruned
model, reconstructed and recalibrated exactly as a search episode scores it (``pruned.pt`` and
``model.pt2``), its achieved policy, and a metrics JSON comparing the dense and pruned models on
FLOPs, params, measured latency and accuracy.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoprune.artifacts import OutputDir, check_output_dir, export_program, pruned_payload
from autoprune.errors import AutopruneError
from autoprune.evaluate import proxy_label
from autoprune.finetune import FinetuneConfig, FinetuneResult, finetune, finished
from autoprune.latency import default_threads, measure_ratio
from autoprune.policy import Policy
from autoprune.pruning import removed_indices
from autoprune.runtimes import get_runtime
from autoprune.task import PruningTask


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def hint_points(task: PruningTask, kept) -> dict[str, torch.Tensor]:
    """Where feature-map hints compare the pruned model with the dense one: every BatchNorm whose
    channels a unit prunes, with the dense channel indices it kept (in order, as the cut keeps them;
    all of them where the policy cut none)."""
    if task.config.granularity != "channel":
        raise AutopruneError("feature-map hints need --granularity channel (masked weights keep every channel)")
    kept_out = task.table.kept_outputs(removed_indices(task.table, task.ranks, kept))
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
    :data:`~autoprune.runtimes.RUNTIMES`), which each ``metrics["latency"]`` entry records. Returns
    the metrics dict written to ``metrics.json``.
    """
    kept = task.kept(policy)  # validates the policy before any work
    get_runtime(latency_runtime).check(latency_device)  # and the runtime (a missing package)
    achieved = Policy.from_kept(task.table, kept, **{k: v for k, v in policy.meta.items()
                                                     if k not in ("format", "version")})
    model = task.prune(kept)
    dense_cost, counted = task.dense_costs, task.counted_costs(model)
    closed = task.cost_ratios(kept)
    metrics: dict = {
        "model": task.config.model,
        "dataset": task.config.dataset,
        "granularity": task.table.granularity,
        "flops_kind": task.table.strategy.flops_kind,
        "dense": {"flops": dense_cost.flops, "params": dense_cost.params},
        "pruned": {"flops": counted.flops, "params": counted.params},
        "ratios": {"flops": counted.flops / dense_cost.flops, "params": counted.params / dense_cost.params},
        "closed_form_ratios": closed,
    }
    _log(f"pruned: FLOPs x{metrics['ratios']['flops']:.3f}, params x{metrics['ratios']['params']:.3f}", quiet)

    metrics["dense"]["proxy_acc"] = task.dense_accuracy()
    metrics["pruned"]["proxy_acc_selected"] = task.proxy_accuracy(model)
    report = task.calibrate(model, kept)  # what the search scored, so what export writes
    metrics["pruned"]["proxy_acc"] = task.proxy_accuracy(model)
    metrics["reconstruct"], metrics["proxy"] = task.config.reconstruct, task.config.proxy
    if report is not None:
        metrics["reconstruction"] = {"refit": report.refit, "fallbacks": report.fallbacks,
                                     "traced": report.traced, "seconds": round(report.seconds, 3)}
    _log(f"{proxy_label(task.config.proxy)} (search-val): dense {metrics['dense']['proxy_acc']:.2%}, pruned "
         f"{metrics['pruned']['proxy_acc_selected']:.2%} as selected / {metrics['pruned']['proxy_acc']:.2%} "
         f"after {'reconstruction (' + str(report.refit) + ' layers refit) and ' if report else ''}"
         "BN recalibration", quiet)
    test = test and task.has_test
    if test:
        metrics["dense"]["test_acc"] = task.test_accuracy(task.dense)
        metrics["pruned"]["test_acc"] = task.test_accuracy(model)
        _log(f"test accuracy: dense {metrics['dense']['test_acc']:.2%}, pruned "
             f"{metrics['pruned']['test_acc']:.2%}", quiet)
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
        if made:  # a run that failed (not one killed: that keeps its checkpoint for --resume) leaves nothing
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if ran is not None:
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
            _log(f"after fine-tuning: test accuracy {metrics['pruned']['test_acc_finetuned']:.2%}"
                 + (f" (epoch {ran.best_epoch} of {len(ran.history)}, kept by search-val)" if ran.history else ""),
                 quiet)
    metrics.update(extra or {})

    model = task.pruner.finalize(model.cpu())
    dense_cpu = task.dense
    metrics["latency"] = {}
    threads = latency_threads or default_threads(latency_device)
    for batch in latency_batches:
        ratio, d, p = measure_ratio(dense_cpu, model, task.table.input_shape, latency_device, batch,
                                    threads, pairs=30, runtime=latency_runtime)
        metrics["latency"][f"batch{batch}"] = {
            "runtime": latency_runtime, "device": latency_device, "threads": threads, "runs": d.runs,
            "dense_ms": d.median_s * 1e3, "pruned_ms": p.median_s * 1e3, "ratio": ratio,
        }
        _log(f"latency ({latency_runtime} on {latency_device}, batch {batch}, {threads} thread(s), {d.runs} alternated "
             f"runs): dense {d.median_s * 1e3:.2f} ms, pruned {p.median_s * 1e3:.2f} ms "
             f"(median ratio x{ratio:.3f})", quiet)
    task.dense.to(task.device)

    achieved.meta.update({"model": task.config.model, "weights": task.weights_id,
                          "reconstruct": task.config.reconstruct, "achieved": metrics["ratios"]})
    with OutputDir(out_dir) as tmp:
        import torch

        if task.model_spec is not None:  # a model autoprune can build again from its name
            torch.save(pruned_payload(model, task.table, kept, achieved, task.config.model, task.model_spec,
                                      task.config.exclude), tmp / "pruned.pt")
        if program:
            export_program(model, task.example, tmp / "model.pt2")
        if onnx:
            from autoprune.artifacts import export_onnx

            metrics["onnx"] = export_onnx(model, task.example, tmp / "model.onnx",
                                          task.calibration_inputs()[:64].cpu())
            metrics["onnx"]["path"] = "model.onnx"
            _log(f"ONNX: onnxruntime matches PyTorch within {metrics['onnx']['max_abs_diff']:.2g}", quiet)
        achieved.save(tmp / "policy.json", task.table)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if run_dir is not None:
        finished(run_dir)  # the weights are in the model files now; finetune.csv stays
    return metrics
