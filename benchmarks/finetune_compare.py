"""After fine-tuning, with one recipe for all: the best searched policy against uniform.

    python -m benchmarks.finetune_compare --quality benchmarks/results/quality-resnet56.json --epochs 2

Takes the search_quality results, the best policy of the best searcher (by test accuracy before
fine-tuning) and the uniform policy, fine-tunes each with the same recipe (SGD, Nesterov 0.9,
cosine from lr, weight decay 5e-4, batch 128, the same seed and batch order) and reports test
accuracy. On CPU the recipe is short (a couple of epochs); the GPU recipe is longer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from autoprune.finetune import FinetuneConfig, finetune
from autoprune.policy import Policy
from benchmarks.common import machine, make_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", required=True)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--distill", type=float, default=0.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    q = json.loads(Path(args.quality).read_text())
    model_name = q["args"]["model"]
    rows = q["rows"]
    searched = [r for r in rows if r["searcher"] not in ("uniform", "erk", "lamp", "global")]
    best = max(searched, key=lambda r: r["test_acc"])
    uniform = next(r for r in rows if r["searcher"] == "uniform")
    task = make_task(model_name, q["args"]["search_val_size"], reconstruct=q["args"].get("reconstruct", "none"))
    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, distill=args.distill, batch_size=128, seed=0)
    print(f"# {model_name} {q['args']['budget']}: fine-tune {args.epochs:g} epochs, lr {args.lr}, distill "
          f"{args.distill}, device {args.device}; {machine()}", flush=True)
    results = []
    for label, row in ((f"{best['searcher']} seed {best['seed']} (best searched)", best), ("uniform", uniform)):
        kept = Policy(row["policy"], widths=row.get("widths", {})).kept(task.table)
        model, _ = task.pruned(kept)
        before = task.test_accuracy(model)
        start = time.perf_counter()
        teacher = task.dense.to(args.device) if args.distill > 0 else None
        finetune(model, task.splits, cfg, teacher=teacher, device=args.device, progress=False)
        after = task.test_accuracy(model.to("cpu"))
        results.append({"policy": label, "flops": task.cost_ratios(kept)["flops"], "test_before": before,
                        "test_after": after, "seconds": time.perf_counter() - start})
        print(f"{label}: test {before:.2%} -> {after:.2%} after fine-tuning "
              f"({results[-1]['seconds']:.0f}s)", flush=True)
    print("\n| policy | FLOPs ratio | test acc before FT | test acc after FT |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['policy']} | {r['flops']:.3f} | {r['test_before']:.2%} | {r['test_after']:.2%} |")
    print(f"\nsearched minus uniform after fine-tuning: "
          f"{(results[0]['test_after'] - results[1]['test_after']) * 100:+.2f} points")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "machine": machine(), "rows": results},
                                             indent=1))


if __name__ == "__main__":
    main()
