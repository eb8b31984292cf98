"""Real speedup: measured latency of slimmed models against their FLOPs ratio, and a latency search.

    python -m benchmarks.real_speedup --model resnet56 --quality benchmarks/results/quality-resnet56.json \\
        --latency-search-episodes 40

Latency is the median of per-pair ratios over alternated runs of the dense and pruned model (so
machine drift hits both alike), on the CPU at batch 1 and 64 with one intra-op thread. The
latency search runs TPE under a ``0.6latency`` budget and reports what it predicted and measured.

Its figures (docs/benchmarks-history.md) were measured with the engine before the least-squares
refit; ``runtime_speedup`` (latency per runtime) and ``latency_budget`` (latency searches against
the FLOPs policy) measure the current one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import optuna
import torch

from autoprune.cost.latency import measure_ratio
from autoprune.envs import LayerSparsityEnv
from autoprune.studies.runner import SearchConfig, run_search
from autoprune.units.policy import Policy
from benchmarks.common import machine, make_task, rule_widths, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--quality", default=None, help="search_quality JSON: also time its best policies")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--latency-budget", default="0.6latency")
    ap.add_argument("--latency-search-episodes", type=int, default=0)
    ap.add_argument("--storage", default="sqlite:///benchmarks-latency.db")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(2)
    task = make_task(args.model, search_val_size=1000)
    policies = {}
    for budget in ("0.75flops", "0.5flops", "0.25flops"):
        policies[f"uniform {budget}"] = rule_widths(task, "uniform", budget)
    if args.quality:
        rows = json.loads(Path(args.quality).read_text())["rows"]
        for name in dict.fromkeys(r["searcher"] for r in rows):
            best = max((r for r in rows if r["searcher"] == name), key=lambda r: r["test_acc"])
            policy = Policy(best["policy"], widths=best.get("widths", {}))
            policies[f"{name} (best of search)"] = policy.kept(task.table)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"# {args.model}: CPU, {args.threads} thread(s), {args.pairs} alternated pairs; {machine()}")
    print("| policy | FLOPs ratio | params ratio | " + " | ".join(f"latency ratio, batch {b}" for b in batches)
          + " |\n|---|---|---|" + "---|" * len(batches))
    results = []
    for name, kept in policies.items():
        model = task.pruner.finalize(task.prune(kept))
        ratios = task.cost_ratios(kept)
        lat = {}
        for b in batches:
            r, d, p = measure_ratio(task.dense, model, task.table.input_shape, "cpu", b, args.threads,
                                    pairs=args.pairs)
            lat[b] = {"ratio": r, "dense_ms": d.median_s * 1e3, "pruned_ms": p.median_s * 1e3}
        results.append({"policy": name, **ratios, "latency": lat})
        print(f"| {name} | {ratios['flops']:.3f} | {ratios['params']:.3f} | "
              + " | ".join(f"{lat[b]['ratio']:.3f} ({lat[b]['pruned_ms']:.1f} / {lat[b]['dense_ms']:.1f} ms)"
                           for b in batches) + " |", flush=True)
    out = {"machine": machine(), "args": vars(args), "speedup": results}
    if args.latency_search_episodes:
        out["latency_search"] = latency_search(task, args)
    if args.out:
        write_results(args.out, out)


def latency_search(task, args) -> dict:
    env = LayerSparsityEnv(task, budget=args.latency_budget, latency_batch=1, latency_threads=args.threads,
                           progress=True)
    model = env.cost
    result = run_search(env, SearchConfig(searcher="tpe", episodes=args.latency_search_episodes,
                                          storage=args.storage, resume=True, progress=False,
                                          study_name=f"{args.model}-{env.budget.slug}-tpe"))
    trials = [t for t in result.study.trials if t.user_attrs.get("ratios")]
    measured = np.array([t.user_attrs["ratios"]["latency"] for t in trials])
    predicted = np.array([t.user_attrs["ratios"]["latency_predicted"] for t in trials])
    within = float(np.mean(measured <= env.budget.ratio * 1.03))
    best = result.best.user_attrs
    summary = {
        "budget": str(env.budget), "episodes": len(trials), "lut_fit_error_max_mean": model.fit_error,
        "best_trial": result.best.number, "best_proxy_acc": best["accuracy"],
        "best_predicted": best["ratios"]["latency_predicted"], "best_measured": best["ratios"]["latency"],
        "best_flops": best["ratios"]["flops"], "episodes_within_3pct": within,
        "prediction_error_mean": float(np.mean(np.abs(measured / predicted - 1))),
        "prediction_error_max": float(np.max(np.abs(measured / predicted - 1))),
    }
    print(f"\nlatency search {env.budget}: {len(trials)} episodes; lookup-table fit error (max, mean) "
          f"{model.fit_error[0]:.3f}, {model.fit_error[1]:.3f}; measured/predicted error mean "
          f"{summary['prediction_error_mean']:.3f} max {summary['prediction_error_max']:.3f}; "
          f"{within:.0%} of episodes measured within 3% of the budget; best trial {result.best.number}: "
          f"proxy acc {best['accuracy']:.2%}, latency predicted {best['ratios']['latency_predicted']:.3f} "
          f"measured {best['ratios']['latency']:.3f}, FLOPs {best['ratios']['flops']:.3f}")
    return summary


if __name__ == "__main__":
    main()
