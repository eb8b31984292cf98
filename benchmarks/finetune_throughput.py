"""Fine-tune throughput: the per-image JPEG loader against the in-memory tensor path.

    python -m benchmarks.finetune_throughput --model resnet56 --device cpu --steps 20 \\
        --out benchmarks/results/finetune-throughput-cpu.json
    python -m benchmarks.finetune_throughput --model resnet56 --device cuda --steps 300 \\
        --policies dense,0.3flops --compile --out $OUT/finetune-throughput-h200.json

For each path, in one process: the loader alone (images per second, no model) and the real
fine-tune step (:func:`autoprune.finetune.loop.finetune` for ``--steps`` steps, distilling from
the dense model, the recipe ``export`` uses) on the dense model and on the best-rule policy at
each budget. ``--fp32`` also times the tensor path in float32 and the contiguous layout, against
the default bfloat16 autocast and channels-last (on CUDA and on CPUs with native bfloat16, AMX or
AVX512-BF16; elsewhere both rows run float32). ``--stored-logits`` also times the tensor path
reading the dense teacher's logits that an earlier run on the same batches stored
(:mod:`autoprune.finetune.teacher`: what a second fine-tune with the same seed pays), against the
teacher run on every batch; ``--rounds`` alternates the variants and reports each one's median.
Every other row runs the teacher on every batch. An epoch's time is the training split's images over
the measured rate, after a warm-up of ``--warmup`` steps (cuDNN autotuning, compilation) that is
not counted.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from autoprune.finetune.loop import FinetuneConfig, finetune, native_bf16
from benchmarks.common import machine, make_task, rule_widths, write_results


def loader_rate(splits, device: str, batches: int, batch_size: int) -> float:
    loader = splits.train_loader(batch_size, seed=0, device=device)
    it = iter(loader)
    next(it)  # workers started, tensors moved
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        x, _ = next(it)
        x = x.to(device)
        seen += len(x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def step_rate(task, splits, model, device: str, steps: int, warmup: int, batch_size: int, compile: bool,
              fp32: bool = False, stored: Path | None = None) -> float:
    """Images per second of ``steps`` fine-tune steps after ``warmup`` untimed ones. With ``stored``
    (a folder), the teacher's logits of those steps are stored there first, then read."""
    cfg = FinetuneConfig.recipe(1, batch_size=batch_size, compile=compile, amp=not fp32, channels_last=not fp32)
    measured = dataclasses.replace(cfg, steps=steps)
    run = dataclasses.replace(cfg, steps=warmup, seed=1)  # other batches than the measured ones
    finetune(model, splits, run, teacher=task.dense, device=device, progress=False, teacher_cache=False)
    if stored is not None:
        finetune(copy.deepcopy(model), splits, measured, teacher=task.dense, device=device, progress=False,
                 teacher_cache=stored)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    finetune(model, splits, measured, teacher=task.dense, device=device, progress=False,
             teacher_cache=stored if stored is not None else False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--loader-batches", type=int, default=40)
    ap.add_argument("--policies", default="dense,0.3flops", help="dense and/or budgets (played by --rule)")
    ap.add_argument("--rule", default="uncoupled")
    ap.add_argument("--paths", default="jpeg,tensor")
    ap.add_argument("--compile", action="store_true", help="also time the tensor path through torch.compile")
    ap.add_argument("--fp32", action="store_true", help="also time the tensor path in float32, contiguous")
    ap.add_argument("--stored-logits", action="store_true",
                    help="also time the tensor path reading the teacher's stored logits")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the variants this many times (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = make_task(args.model, 1000, device=args.device)
    splits = task.splits
    paths = {"jpeg": dataclasses.replace(splits, tensor_views=None), "tensor": splits}
    paths = {k: paths[k] for k in args.paths.split(",")}
    started = time.perf_counter()
    assert splits.tensors is not None, "the tensor path is not available for this dataset"
    decode_s = time.perf_counter() - started
    rows = []
    train_images = len(splits.train)
    for name, sp in paths.items():
        rate = loader_rate(sp, args.device, args.loader_batches, args.batch_size)
        rows.append({"path": name, "what": "loader", "images_per_s": rate})
        print(f"{name:6s} loader alone: {rate:,.0f} images/s", flush=True)
    for policy in args.policies.split(","):
        widths = None if policy == "dense" else rule_widths(task, args.rule, policy)
        variants = [(n, sp, False, False, False) for n, sp in paths.items()]
        if args.fp32:
            variants.append(("tensor+fp32", splits, False, True, False))
        if args.compile:
            variants.append(("tensor+compile", splits, True, False, False))
        if args.stored_logits:
            variants.append(("tensor+stored-logits", splits, False, False, True))
        rates: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for name, sp, comp, fp32, stored in variants:
                model = task.prune(task.table.sizes()) if widths is None else task.pruned(widths)[0]
                with tempfile.TemporaryDirectory() as folder:
                    rates.setdefault(name, []).append(step_rate(
                        task, sp, model, args.device, args.steps, args.warmup, args.batch_size, comp, fp32,
                        Path(folder) if stored else None))
        for name, _sp, _comp, fp32, _stored in variants:
            rate = statistics.median(rates[name])
            flops = 1.0 if widths is None else task.cost_ratios(widths)["flops"]
            row = {"path": name, "what": "fine-tune", "policy": policy, "images_per_s": rate, "rounds": rates[name],
                   "bf16": native_bf16(args.device) and not fp32,
                   "epoch_s": train_images / rate, "flops": flops}
            rows.append(row)
            print(f"{name:14s} {policy:8s}: {rate:,.0f} images/s, epoch {row['epoch_s']:.1f} s", flush=True)
            if args.out:
                write_results(args.out, {"args": vars(args), "machine": machine(), "decode_s": decode_s,
                                         "train_images": train_images, "rows": rows})
    if args.out:
        write_results(args.out, {"args": vars(args), "machine": machine(), "decode_s": decode_s,
                                 "train_images": train_images, "rows": rows})


if __name__ == "__main__":
    main()
