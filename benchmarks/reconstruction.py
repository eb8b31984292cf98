"""Reconstruction on a CIFAR-10 fixture: the same policies scored with each ``--reconstruct`` method.

    python -m benchmarks.reconstruction --model resnet56 --budget 0.5flops \\
        --quality benchmarks/results/quality-resnet56.json \\
        --quality benchmarks/results/quality-resnet56-lsq.json \\
        --out benchmarks/results/reconstruction-resnet56.json

Policies: the one-shot rules ``uniform`` (every unit) and ``uncoupled`` (the units with a single
conv member, so the groups a residual add couples stay whole), as a search's portfolio plays them;
and the best policy of every searcher/seed in the given ``search_quality`` result files (a search
made with ``none`` and one with ``lsq``). Each is scored on search-val and on the 10,000 test
images with every method of ``--methods``. Then the time of one episode (prune, calibrate, score on
search-val) with each, against one dense forward pass over search-val, as medians of ``--repeats``
runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from autoprune.evaluate.metrics import accuracy
from benchmarks.common import machine, make_task, rule_widths, write_results


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
    lsq = make_task(args.model, args.search_val_size, importance=args.importance, reconstruct="lsq",
                    granularity=args.granularity)
    methods = args.methods.split(",")
    tasks = {m: lsq if m == "lsq" else lsq.variant(m) for m in methods}
    print(f"# {args.model} {args.budget}: {len(lsq.table.units)} units, search-val "
          f"{len(lsq.splits.search_val)}; {machine()}", flush=True)

    rules = ("uniform", "uncoupled") if args.granularity == "channel" else ("uniform",)  # else a unit is a layer
    policies = [(rule, "-", rule_widths(lsq, rule, args.budget)) for rule in rules]
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
        for name in methods if "none" in methods else ():  # what each method adds to a plain episode
            timing[f"{label}: extra_{name}"] = (timing[f"{label}: episode_{name}"]
                                                - timing[f"{label}: episode_none"]) / timing["dense_forward"]
    print(table(rows, dense_test, timing, methods))
    if args.out:
        write_results(args.out, {"args": vars(args), "machine": machine(), "dense_test": dense_test,
                                 "rows": rows, "timing": timing})


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
    adds = [m for m in methods if m != "none"] if "none" in methods else []  # against a plain episode
    lines += ["", f"one dense forward pass over search-val: {timing['dense_forward']:.2f} s (median)", "",
              "| episode of (median) | " + " | ".join(methods + [f"{m} adds (x dense forward)" for m in adds]) + " |",
              "|---" * (1 + len(methods) + len(adds)) + "|"]
    for label in dict.fromkeys(k.split(": ")[0] for k in timing if ": " in k):
        lines.append(f"| {label} | " + " | ".join([f"{timing[f'{label}: episode_{m}']:.2f} s" for m in methods]
                                                  + [f"{timing[f'{label}: extra_{m}']:.2f}" for m in adds]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
