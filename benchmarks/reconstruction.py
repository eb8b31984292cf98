"""Reconstruction on a CIFAR-10 fixture: the same policies scored with each ``--reconstruct`` method.

    python -m benchmarks.reconstruction --model resnet56 --budget 0.5flops \\
        --quality benchmarks/results/quality-resnet56.json \\
        --quality benchmarks/results/quality-resnet56-lsq.json \\
        --out benchmarks/results/reconstruction-resnet56.json

Policies: uniform over every unit; the block-inner rule (uniform over the units with a single
conv member, so the groups a residual add couples stay whole); and the best policy of every
searcher/seed in the given ``search_quality`` result files (a search made with ``none`` and one
with ``lsq``). Each is scored on search-val and on the 10,000 test images with every method of
``--methods``. Then the time of one episode (prune, calibrate, score on search-val) with each,
against one dense forward pass over search-val, as medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from autoprune.budget import parse_budget
from autoprune.evaluate import accuracy
from autoprune.task import PruningTask
from benchmarks.common import machine, make_task


def rule_kept(task: PruningTask, ratio: float, metric: str, units: list[int]) -> np.ndarray:
    """One sparsity for ``units`` (the rest whole), the smallest that meets the budget (bisection)."""
    def kept_at(s: float) -> np.ndarray:
        return task.table.kept_all([s if u in units else 0.0 for u in range(len(task.table.units))])

    lo, hi = 0.0, 0.95
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if task.cost_ratios(kept_at(mid))[metric] > ratio else (lo, mid)
    return kept_at(hi)


def block_inner_units(task: PruningTask) -> list[int]:
    convs = {lay.name for lay in task.table.layers if lay.kind in ("conv", "linear")}
    return [u.index for u in task.table.units if sum(m in convs for m in u.members) == 1]


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--budget", default="0.5flops")
    ap.add_argument("--quality", action="append", default=[], help="search_quality JSON (repeatable)")
    ap.add_argument("--searchers", default="tpe", help="which searchers' best policies to score")
    ap.add_argument("--methods", default="none,lsq,lsq-all", help="reconstruction methods to compare")
    ap.add_argument("--granularity", default="channel",
                    help="unstructured: masks; only the uniform policy (every unit is one layer)")
    ap.add_argument("--search-val-size", type=int, default=1000)
    ap.add_argument("--importance", default="l1")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    budget = parse_budget(args.budget)
    lsq = make_task(args.model, args.search_val_size, importance=args.importance, reconstruct="lsq",
                    granularity=args.granularity)
    methods = args.methods.split(",")
    tasks = {m: lsq if m == "lsq" else PruningTask(replace(lsq.config, reconstruct=m), splits=lsq.splits,
                                                   dense=lsq.dense, progress=False) for m in methods}
    print(f"# {args.model} {args.budget}: {len(lsq.table.units)} units, search-val "
          f"{len(lsq.splits.search_val)}; {machine()}", flush=True)

    policies = [("uniform", "-", rule_kept(lsq, budget.ratio, budget.metric, list(range(len(lsq.table.units))))),
                ("block-inner rule", "-", rule_kept(lsq, budget.ratio, budget.metric, block_inner_units(lsq)))]
    if args.granularity != "channel":  # one unit per layer: the rule is uniform, searched widths differ
        policies = policies[:1]
    wanted = set(args.searchers.split(","))
    for path in args.quality:
        q = json.loads(Path(path).read_text())
        searched_with = q["args"].get("reconstruct", "none")
        for row in q["rows"]:
            if row["searcher"] in wanted:
                kept = np.array([row["widths"][n] for n in lsq.table.names])
                policies.append((f"{row['searcher']} (searched with {searched_with})", row["seed"], kept))

    dense_test = lsq.test_accuracy(lsq.dense)
    rows = []
    for label, seed, kept in policies:
        row = {"policy": label, "seed": seed, "flops": lsq.cost_ratios(kept)["flops"],
               "widths": dict(zip(lsq.table.names, map(int, kept)))}
        for name, task in tasks.items():
            model, report = task.pruned(kept)
            row[f"proxy_{name}"] = task.proxy_accuracy(model)
            row[f"test_{name}"] = task.test_accuracy(model)
            if report is not None:
                row[f"refit_{name}"], row[f"fallbacks_{name}"] = report.refit, report.fallbacks
        rows.append(row)
        print(f"{label:34s} seed {seed}: flops {row['flops']:.3f}  " + "  ".join(
            f"{m}: test {row[f'test_{m}']:.4f} proxy {row[f'proxy_{m}']:.4f}" for m in methods), flush=True)

    timing = {"dense_forward": median_seconds(lambda: accuracy(lsq.dense, lsq.splits.search_val, 500),
                                              args.repeats)}
    for label, _, kept in policies[:2]:  # the rule refits the fewest layers, uniform every one
        for name, task in tasks.items():
            timing[f"{label}: episode_{name}"] = median_seconds(lambda t=task, k=kept: t.evaluate(k), args.repeats)
        for name in methods:
            timing[f"{label}: extra_{name}"] = (timing[f"{label}: episode_{name}"]
                                                - timing[f"{label}: episode_none"]) / timing["dense_forward"]
    print(table(rows, dense_test, timing, methods))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "machine": machine(), "dense_test": dense_test,
                                              "rows": rows, "timing": timing}, indent=1))


def table(rows: list[dict], dense_test: float, timing: dict, methods: list[str]) -> str:
    lines = [f"dense test accuracy {dense_test:.2%}", "",
             "| policy | seed | FLOPs ratio | " + " | ".join(f"test, {m}" for m in methods) + " | "
             + " | ".join(f"proxy, {m}" for m in methods) + " |",
             "|---" * (3 + 2 * len(methods)) + "|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['seed']} | {r['flops']:.3f} | "
                     + " | ".join(f"{r[f'test_{m}']:.2%}" for m in methods) + " | "
                     + " | ".join(f"{r[f'proxy_{m}']:.2%}" for m in methods) + " |")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["seed"] != "-":
            groups.setdefault(r["policy"], []).append(r)
    for label, rs in groups.items():
        lines.append(f"| **{label}, mean of {len(rs)}** | | | "
                     + " | ".join(f"{statistics.mean(r[f'test_{m}'] for r in rs):.2%}" for m in methods)
                     + " |" + " |" * len(methods))
    lines += ["", f"one dense forward pass over search-val: {timing['dense_forward']:.2f} s (median)", "",
              "| episode of (median) | " + " | ".join(methods) + " | "
              + " | ".join(f"{m} adds (x dense forward)" for m in methods if m != "none") + " |",
              "|---" * (1 + 2 * len(methods) - 1) + "|"]
    for label in dict.fromkeys(k.split(": ")[0] for k in timing if ": " in k):
        lines.append(f"| {label} | " + " | ".join(f"{timing[f'{label}: episode_{m}']:.2f} s" for m in methods)
                     + " | " + " | ".join(f"{timing[f'{label}: extra_{m}']:.2f}" for m in methods if m != "none")
                     + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
