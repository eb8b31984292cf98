"""N:M and block sparsity: a searched per-layer pattern against the same pattern everywhere.

    python -m benchmarks.patterns --model resnet56 --granularity nm --targets 2:4,1:4 \\
        --seeds 0,1,2 --episodes 60 --storage sqlite:///bench-state/patterns.db \\
        --out benchmarks/results/patterns-resnet56-nm.json
    python -m benchmarks.patterns --model resnet56 --granularity block:4x4 --targets 0.5,0.75 ...

For each target the uniform policy puts every unit at it: an N:M rung (``2:4``) with
``--granularity nm``, a sparsity with ``block:RxC``. It is pruned, refit and recalibrated as an
episode is, and scored on search-val and on the 10,000 test images. Its effective FLOPs ratio is
the budget of a search over the default ladder (or blocks at any sparsity), TPE from the
portfolio of one-shot rules, one study per seed; each study's best trial (by reward, within
budget) is pruned again and scored on test (with ``--search-val heldout``, on the 9,000 test images
search-val leaves out). Every figure is written to ``--out`` after each
step, and a rerun with the same ``--storage`` resumes the studies where they stopped and does
not score again what it scored.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import optuna
import torch

from autoprune.envs import LayerSparsityEnv
from autoprune.prune.granularity import check_patterns
from autoprune.studies.runner import SearchConfig, run_search
from benchmarks.common import machine, make_task, read_results, write_results


def uniform_widths(task, target: str) -> np.ndarray:
    """Every unit at ``target``: the level of rung ``target`` (N:M), or that sparsity (blocks)."""
    table = task.table
    if ":" in target:
        widths = []
        for u in table.units:
            level = [k for k, p in table.levels[u.index] if p == target]
            if not level:
                raise SystemExit(f"unit {u.name} cannot take {target} (its levels: {table.levels[u.index]})")
            widths.append(level[0])
        return np.array(widths, dtype=np.int64)
    return table.kept_all([float(target)] * len(table.units))


def score(task, widths) -> dict:
    model, _ = task.pruned(widths)
    task.pruner.finalize(model)
    checked = check_patterns(model, task.table, widths)
    ratios = task.cost_ratios(widths)
    return {"proxy_acc": task.proxy_accuracy(model), "val_acc": task.val_accuracy(model),
            "test_acc": task.test_accuracy(model),
            "flops": ratios["flops"], "params": ratios["params"], "layers_checked": checked}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--granularity", default="nm", help="nm, nm:LADDER or block:RxC")
    ap.add_argument("--targets", default="2:4,1:4", help="N:M rungs (nm) or sparsities (block)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--episodes", type=int, default=60)
    ap.add_argument("--searcher", default="tpe")
    ap.add_argument("--proxy", default="ce")
    ap.add_argument("--max-sparsity", type=float, default=0.9)
    ap.add_argument("--search-val-size", type=int, default=1000)
    ap.add_argument("--search-val", choices=("train", "heldout"), default="train",
                    help="search-val on training images, or on 1,000 held-out test images (test on the rest); "
                         "give a --tag of its own, the studies differ")
    ap.add_argument("--storage", default="sqlite:///bench-state/patterns.db")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="", help="suffix of the study names (a variant's studies of their own)")
    ap.add_argument("--score-rules", action="store_true",
                    help="also score on test every one-shot rule the first seed's study played")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    task = make_task(args.model, args.search_val_size, granularity=args.granularity, proxy=args.proxy,
                     search_val=args.search_val)
    print(f"# {args.model} {task.table.granularity}: {len(task.table.units)} units; {machine()}", flush=True)
    earlier = read_results(args.out) or {}
    if earlier.get("args", {}).get("granularity") not in (None, args.granularity):
        earlier = {}
    done = {(r["kind"], r["target"], r.get("seed"), r.get("trial")): r for r in earlier.get("rows", [])}
    dense_test = earlier.get("dense_test") or task.test_accuracy(task.dense)
    rows: list[dict] = []

    def save() -> None:
        if args.out:
            write_results(args.out, {"args": vars(args), "machine": machine(), "dense_test": dense_test,
                                     "rows": rows}, earlier=earlier or None)

    for target in args.targets.split(","):
        widths = uniform_widths(task, target)
        row = done.get(("uniform", target, None, None))
        if row is None:
            start = time.perf_counter()
            row = {"kind": "uniform", "target": target, **score(task, widths),
                   "seconds": time.perf_counter() - start}
        rows.append(row)
        print(f"uniform {target}: test {row['test_acc']:.4f} proxy {row['proxy_acc']:.4f} "
              f"flops {row['flops']:.4f}", flush=True)
        save()
        budget = f"{row['flops'] + 1e-6:.6f}flops"
        env = LayerSparsityEnv(task, budget=budget, max_sparsity=args.max_sparsity)
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(search_row(task, env, args, target, seed, done))
            r = rows[-1]
            print(f"{args.searcher} {target} seed {seed}: test {r['test_acc']:.4f} proxy {r['proxy_acc']:.4f} "
                  f"flops {r['flops']:.4f} ({r['episodes']} episodes, {r['episode_seconds']:.0f}s)", flush=True)
            save()
        if args.score_rules:
            rows.extend(rule_rows(task, args, target, done))
            save()
    print(summary(rows, dense_test))


def study_name(task, args, target: str, seed: int) -> str:
    slug = task.table.granularity.replace(":", "").replace(",", "-")
    return f"{args.model}-{slug}-{target.replace(':', 'of')}-{args.proxy}-{args.searcher}{args.tag}-s{seed}"


def rule_rows(task, args, target: str, done: dict) -> list[dict]:
    """Every one-shot rule of the portfolio, as the first seed's study played it, scored on test
    (the rules do not depend on the search's seed)."""
    seed = int(args.seeds.split(",")[0])
    study = optuna.load_study(study_name=study_name(task, args, target, seed), storage=args.storage)
    rows = []
    for t in study.trials:
        rule = t.user_attrs.get("rule")
        if t.state.name != "COMPLETE" or rule is None:
            continue
        row = done.get(("rule", target, None, t.number))
        if row is None:
            row = {"kind": "rule", "target": target, "rule": rule, "trial": t.number,
                   **score(task, t.user_attrs["widths"])}
        rows.append(row)
        print(f"rule {rule} {target}: test {row['test_acc']:.4f} flops {row['flops']:.4f}", flush=True)
    return rows


def search_row(task, env, args, target: str, seed: int, done: dict) -> dict:
    name = study_name(task, args, target, seed)
    result = run_search(env, SearchConfig(searcher=args.searcher, episodes=args.episodes, seed=seed,
                                          storage=args.storage, resume=True, study_name=name, progress=False))
    best = result.best
    widths = best.user_attrs["widths"]
    row = done.get(("search", target, seed, best.number))
    if row is None:
        row = {"kind": "search", "target": target, "seed": seed, "trial": best.number, **score(task, widths)}
    finished = [t for t in result.study.trials if t.state.name == "COMPLETE"]
    row.update(study=name, episodes=len(finished), rule=best.user_attrs.get("rule"),
               search_proxy=best.user_attrs["accuracy"],
               episode_seconds=sum((t.datetime_complete - t.datetime_start).total_seconds() for t in finished),
               patterns=best.user_attrs.get("patterns") or best.user_attrs["policy"])
    return row


def summary(rows: list[dict], dense_test: float) -> str:
    lines = [f"dense test accuracy {dense_test:.2%}", "",
             "| target | uniform test | best other rule (test) | searched test (mean ± sd) | seeds | vs uniform "
             "(points) | FLOPs ratio |", "|---|---|---|---|---|---|---|"]
    for target in dict.fromkeys(r["target"] for r in rows):
        uni = next(r for r in rows if r["kind"] == "uniform" and r["target"] == target)
        found = [r["test_acc"] for r in rows if r["kind"] == "search" and r["target"] == target]
        if not found:
            continue
        sd = statistics.stdev(found) if len(found) > 1 else 0.0
        rules = [r for r in rows if r["kind"] == "rule" and r["target"] == target]
        best = max(rules, key=lambda r: r["test_acc"]) if rules else None
        other = f"{best['rule']} {best['test_acc']:.2%}" if best else "not scored"
        lines.append(f"| {target} | {uni['test_acc']:.2%} | {other} | {statistics.mean(found):.2%} ± {sd:.2%} | "
                     f"{len(found)} | {100 * (statistics.mean(found) - uni['test_acc']):+.2f} | {uni['flops']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
