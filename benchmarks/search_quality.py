"""Search quality on a CIFAR-10 fixture: searchers against baselines at equal episode budgets.

    python -m benchmarks.search_quality --model resnet56 --budget 0.5flops --episodes 200 \\
        --searchers uncoupled,uniform,erk,lamp,global,tpe,cmaes,random --seeds 0,1,2 \\
        --storage sqlite:////path/kept/between/runs.db --out results.json

Every searcher runs on the same task (same split, same reconstruction and BN recalibration, same
importance), each (searcher, seed) in its own study of one SQLite file. The best trial of each
study (by reward, within budget) is pruned again, reconstructed and recalibrated as its episode
was, and scored on the 10,000 test images. Prints a
markdown table (mean and spread over seeds, and each searcher against the best one-shot rule on
test accuracy) and writes every figure to a JSON file after each search, so a long run killed
part-way keeps what it finished; run it again with the same ``--storage`` and it resumes every
study where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import optuna
import torch

from autoprune.agents import SEARCHERS
from autoprune.envs import LayerSparsityEnv
from autoprune.studies.runner import SearchConfig, run_search
from benchmarks.common import machine, make_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--budget", default="0.5flops")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--searchers", default="uncoupled,uniform,erk,lamp,global,random,tpe,ddpg")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--search-val-size", type=int, default=1000)
    ap.add_argument("--calib-batches", type=int, default=10)
    ap.add_argument("--importance", default="l1")
    ap.add_argument("--reconstruct", default="lsq", help="lsq or none (studies of none keep their old names)")
    ap.add_argument("--storage", default="sqlite:///benchmarks-search.db")
    ap.add_argument("--out", default=None, help="JSON file for every figure")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    task = make_task(args.model, args.search_val_size, args.calib_batches, args.importance,
                     reconstruct=args.reconstruct)
    env = LayerSparsityEnv(task, budget=args.budget)
    print(f"# {args.model} {args.budget}: {len(task.table.units)} units, search-val "
          f"{len(task.splits.search_val)}, {args.episodes} episodes per search; {machine()}", flush=True)
    dense_test = task.test_accuracy(task.dense)
    rows = []
    suffix = "" if args.reconstruct == "none" else f"-{args.reconstruct}"
    for name in args.searchers.split(","):
        SEARCHERS.get(name)
        seeds = [0] if SEARCHERS.get(name).one_shot else [int(s) for s in args.seeds.split(",")]
        for seed in seeds:
            start = time.perf_counter()
            result = run_search(env, SearchConfig(
                searcher=name, episodes=args.episodes, seed=seed, storage=args.storage, resume=True,
                study_name=f"{args.model}-{env.budget.slug}-{args.importance}{suffix}-{name}-s{seed}",
                progress=False))
            best = result.best
            model, _ = task.pruned(best.user_attrs["widths"])  # as the episode scored it
            row = {"searcher": name, "seed": seed, "trial": best.number,
                   "episodes": len(result.study.trials), "proxy_acc": best.user_attrs["accuracy"],
                   "test_acc": task.test_accuracy(model), "ratios": best.user_attrs["ratios"],
                   "policy": best.user_attrs["policy"],
                   "widths": dict(zip(task.table.names, best.user_attrs["widths"])),
                   "seconds": time.perf_counter() - start}
            rows.append(row)
            print(f"{name:8s} seed {seed}: proxy {row['proxy_acc']:.4f} test {row['test_acc']:.4f} "
                  f"flops {row['ratios']['flops']:.3f} ({row['seconds']:.0f}s)", flush=True)
            if args.out:  # after every search: a run killed part-way keeps what it finished
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps({"args": vars(args), "machine": machine(),
                                                      "dense_test": dense_test, "rows": rows}, indent=1))
    print(table(rows, dense_test))


def sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def table(rows: list[dict], dense_test: float) -> str:
    from autoprune.agents.baselines import PORTFOLIO

    rules = [r for r in rows if r["searcher"] in PORTFOLIO]
    best_rule = max(rules, key=lambda r: r["test_acc"]) if rules else None
    lines = [f"dense test accuracy {dense_test:.2%}"
             + (f"; best one-shot rule: {best_rule['searcher']}" if best_rule else ""), "",
             "| searcher | seeds | proxy acc (mean ± sd) | test acc (mean ± sd) | vs best rule (test, points) "
             "| FLOPs ratio |", "|---|---|---|---|---|---|"]
    names = list(dict.fromkeys(r["searcher"] for r in rows))
    for name in names:
        rs = [r for r in rows if r["searcher"] == name]
        p = [r["proxy_acc"] for r in rs]
        t = [r["test_acc"] for r in rs]
        delta = (statistics.mean(t) - best_rule["test_acc"]) * 100 if best_rule else float("nan")
        lines.append(f"| {name} | {len(rs)} | {statistics.mean(p):.2%} ± {sd(p):.2%} | "
                     f"{statistics.mean(t):.2%} ± {sd(t):.2%} | {delta:+.2f} | "
                     f"{statistics.mean(r['ratios']['flops'] for r in rs):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
