"""Search quality on a CIFAR-10 fixture: searchers against baselines at equal episode budgets.

    python -m benchmarks.search_quality --model resnet56 --budget 0.5flops --episodes 200 \\
        --searchers uncoupled,uniform,erk,lamp,global,tpe,cmaes,random --seeds 0,1,2 \\
        --storage sqlite:///bench-state/r56-search.db --out results.json

Every searcher runs on the same task (same split, same reconstruction and BN recalibration, same
importance), each (searcher, seed) in its own study of one SQLite file. The best trial of each
study (by reward, within budget) is pruned again, reconstructed and recalibrated as its episode
was, and scored on the 10,000 test images. Prints a
markdown table (mean and spread over seeds, and each searcher against the best one-shot rule on
test accuracy) and writes every figure to a JSON file after each search, so a long run killed
part-way keeps what it finished; run it again with the same ``--storage`` and it resumes every
study where it stopped.

Latency budgets on a runtime, with the widths it rewards, every row timed again:

    python -m benchmarks.search_quality --model resnet56 --budget 0.75latency --round-to auto \
        --latency-runtime onnxruntime --latency-batch 64 --retime-pairs 60 \
        --searchers knapsack,uncoupled,uniform,lamp,erk,global,tpe --seeds 0,1,2 ...

``--retime-pairs N`` measures each row's model against the dense one again (N alternated pairs,
the dense model prepared once) and reports that latency ratio and the speedup per FLOPs speedup
(FLOPs ratio over latency ratio; 1 means the time falls as the FLOPs do).

Early stopping at equal wall-clock (after the plain searches of the same seeds exist in the storage):

    python -m benchmarks.search_quality --model resnet56 --searchers tpe --seeds 0,1,2 \\
        --early-stop median --match-time --storage sqlite:///bench-state/r56-search.db --out es.json

Each ``tpe+es-median`` study then runs until its summed episode time equals the plain study's.
Episode times are read from the studies, so a machine busier in one run than the other biases the
comparison: run both on the same quiet machine when the figure matters.
"""

from __future__ import annotations

import argparse
import statistics
import time

import optuna
import torch
from optuna.trial import TrialState

from autoprune.agents import SEARCHERS
from autoprune.cost.latency import RatioMeter
from autoprune.envs import LayerSparsityEnv
from autoprune.studies.runner import SearchConfig, run_search
from benchmarks.common import add_space_args, is_rule, machine, make_task, read_results, write_results


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
    ap.add_argument("--proxy", default="acc", help="acc, ce or kl (studies of acc keep their old names)")
    ap.add_argument("--search-val", default="train", choices=("train", "heldout"),
                    help="search-val's images: training images, or held-out test images (studies get -heldout; "
                         "test accuracy is then on the other test images)")
    add_space_args(ap)
    ap.add_argument("--storage", default="sqlite:///benchmarks-search.db")
    ap.add_argument("--out", default=None, help="JSON file for every figure")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--early-stop", default=None, choices=("median", "halving"),
                    help="score search-val in chunks and stop trailing policies (studies get an -es-MODE suffix)")
    ap.add_argument("--match-time", action="store_true",
                    help="with --early-stop: instead of --episodes, run until the study's summed episode time "
                         "reaches that of the same searcher and seed without early stopping (equal wall-clock)")
    ap.add_argument("--latency-runtime", default="eager", help="what runs latency budgets and --retime-pairs")
    ap.add_argument("--latency-batch", type=int, default=1)
    ap.add_argument("--latency-threads", type=int, default=1)
    ap.add_argument("--retime-pairs", type=int, default=0,
                    help="time each row's model again against the dense one (this many alternated pairs on "
                         "the latency runtime and batch): its latency ratio and speedup per FLOPs speedup")
    ap.add_argument("--searcher-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a searcher option (e.g. sigma_decay=0.99 for RL agents); repeatable; needs --tag, "
                         "which names the variant's studies")
    args = ap.parse_args()
    try:
        options = {k: float(v) for k, v in (o.split("=", 1) for o in args.searcher_option)}
    except ValueError:
        ap.error(f"--searcher-option takes KEY=NUMBER, not {args.searcher_option}")
    if options and not args.tag:
        ap.error("--searcher-option needs --tag, so the variant's studies get names of their own")
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    task = make_task(args.model, args.search_val_size, args.calib_batches, args.importance,
                     reconstruct=args.reconstruct, proxy=args.proxy, round_to=args.round_to,
                     search_val=args.search_val)
    env = LayerSparsityEnv(task, budget=args.budget, ranges=args.range, share=args.share,
                           latency_runtime=args.latency_runtime, latency_batch=args.latency_batch,
                           latency_threads=args.latency_threads)
    meter = RatioMeter(task.dense, task.table.input_shape, task.device) if args.retime_pairs else None
    print(f"# {args.model} {args.budget}: {len(task.table.units)} units, search-val "
          f"{len(task.splits.search_val)}, {args.episodes} episodes per search; {machine()}", flush=True)
    earlier = read_earlier(args)
    dense_test = earlier["dense_test"] if earlier else task.test_accuracy(task.dense)
    scored = {(r["searcher"], r["seed"], r["trial"]): r for r in earlier["rows"]} if earlier else {}
    rows = []
    suffix = "" if args.reconstruct == "none" else f"-{args.reconstruct}"
    suffix += "" if args.proxy == "acc" else f"-{args.proxy}"
    suffix += "" if args.search_val == "train" else f"-{args.search_val}"
    suffix += f"-{args.tag}" if args.tag else ""
    suffix += f"-r{args.round_to}" if args.round_to is not None else ""
    timed = (args.latency_runtime, args.latency_batch) != ("eager", 1)
    suffix += f"-{args.latency_runtime}-b{args.latency_batch}" if timed and env.budget.metric == "latency" else ""
    for name in args.searchers.split(","):
        SEARCHERS.get(name)
        seeds = [0] if SEARCHERS.get(name).one_shot else [int(s) for s in args.seeds.split(",")]
        for seed in seeds:
            start = time.perf_counter()
            plain = f"{args.model}-{env.budget.slug}-{args.importance}{suffix}-{name}-s{seed}"
            study_name = plain if not args.early_stop else plain.replace(f"-s{seed}", f"-es-{args.early_stop}-s{seed}")
            config = SearchConfig(searcher=name, episodes=args.episodes, seed=seed, storage=args.storage,
                                  resume=True, study_name=study_name, progress=False, early_stop=args.early_stop,
                                  searcher_options=options)
            if args.match_time:
                result = run_for(env, config, spent(optuna.load_study(study_name=plain, storage=args.storage)))
            else:
                result = run_search(env, config)
            best = result.best
            states = [t.state.name for t in result.study.trials]
            label = name + (f"+es-{args.early_stop}" if args.early_stop else "") + (
                f"+{args.proxy}" if args.proxy != "acc" else "") + (
                f"+{args.search_val}" if args.search_val != "train" else "") + (f"+{args.tag}" if args.tag else "") + (
                f"+r{args.round_to}" if args.round_to is not None else "")
            before = scored.get((label, seed, best.number), {})  # a rerun does not score a finished search again
            test_acc, retimed = before.get("test_acc"), before.get("latency_retimed")
            if test_acc is None or (meter and retimed is None):
                model, _ = task.pruned(best.user_attrs["widths"])  # as the episode scored it
                test_acc = task.test_accuracy(model) if test_acc is None else test_acc
                if meter:
                    retimed = meter.measure(model, args.latency_batch, args.latency_threads, pairs=args.retime_pairs,
                                            runtime=args.latency_runtime).ratio
            row = {"searcher": label, "seed": seed, "proxy": args.proxy,
                   "trial": best.number, "episodes": len(result.study.trials),
                   "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
                   "episode_seconds": spent(result.study), "proxy_acc": best.user_attrs["accuracy"],
                   "test_acc": test_acc, "ratios": best.user_attrs["ratios"],
                   **({"latency_retimed": retimed,
                       "speedup_per_flops": best.user_attrs["ratios"]["flops"] / retimed} if meter else {}),
                   "policy": best.user_attrs["policy"],
                   "widths": dict(zip(task.table.names, best.user_attrs["widths"])),
                   "seconds": time.perf_counter() - start}
            rows.append(row)
            print(f"{name:8s} seed {seed}: proxy {row['proxy_acc']:.4f} test {row['test_acc']:.4f} "
                  f"flops {row['ratios']['flops']:.3f}"
                  + (f" latency {retimed:.3f} (re-timed)" if meter else "") + f" ({row['seconds']:.0f}s)", flush=True)
            if args.out:  # after every search: a run killed part-way keeps what it finished
                write_results(args.out, {"args": vars(args), "machine": machine(), "dense_test": dense_test,
                                         "rows": rows}, earlier=earlier)
    print(table(rows, dense_test))


SAME_TASK = ("model", "budget", "search_val_size", "calib_batches", "importance", "reconstruct", "proxy",
             "round_to", "range", "share", "search_val", "latency_runtime", "latency_batch", "latency_threads")


def read_earlier(args: argparse.Namespace) -> dict | None:
    """The ``--out`` file of an earlier run of the same task, whose test figures a rerun reuses
    (a study's best trial, once scored on test, scores the same: the task is deterministic)."""
    earlier = read_results(args.out)
    if earlier is None:
        return None
    # files written before an option existed ran with its default
    before = {"search_val": "train", "latency_runtime": "eager", "latency_batch": 1, "latency_threads": 1,
              **earlier["args"]}
    same = all(before.get(k) == getattr(args, k) for k in SAME_TASK)
    return earlier if same else None


def spent(study: optuna.Study) -> float:
    """Summed duration of a study's finished episodes (complete and pruned): its search time,
    whatever sessions and restarts it was run in."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    # a trial failed by a kill is closed when the search resumes: its span is downtime, not search
    return sum((t.datetime_complete - t.datetime_start).total_seconds() for t in finished)


def run_for(env: LayerSparsityEnv, config: SearchConfig, seconds: float):
    """Add episodes, ten at a time, until the study has spent ``seconds`` (resumable: the time
    is read back from the study)."""
    from dataclasses import replace

    episodes = 10
    while True:
        result = run_search(env, replace(config, episodes=episodes))
        if spent(result.study) >= seconds:
            return result
        episodes = sum(t.state.name == "COMPLETE" for t in result.study.trials) + 10


def sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def table(rows: list[dict], dense_test: float) -> str:
    rules = [r for r in rows if is_rule(r["searcher"])]
    timed = all("latency_retimed" in r for r in rows)
    best_rule = max(rules, key=lambda r: r["test_acc"]) if rules else None
    lines = [f"dense test accuracy {dense_test:.2%}"
             + (f"; best one-shot rule: {best_rule['searcher']}" if best_rule else ""), "",
             "| searcher | seeds | proxy acc (mean ± sd) | test acc (mean ± sd) | vs best rule (test, points) "
             "| FLOPs ratio |" + (" latency ratio (re-timed) | speedup per FLOPs speedup |" if timed else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if timed else "")]
    names = list(dict.fromkeys(r["searcher"] for r in rows))
    for name in names:
        rs = [r for r in rows if r["searcher"] == name]
        p = [r["proxy_acc"] for r in rs]
        t = [r["test_acc"] for r in rs]
        delta = (statistics.mean(t) - best_rule["test_acc"]) * 100 if best_rule else float("nan")
        lines.append(f"| {name} | {len(rs)} | {statistics.mean(p):.2%} ± {sd(p):.2%} | "
                     f"{statistics.mean(t):.2%} ± {sd(t):.2%} | {delta:+.2f} | "
                     f"{statistics.mean(r['ratios']['flops'] for r in rs):.3f} |"
                     + (f" {statistics.mean(r['latency_retimed'] for r in rs):.3f} | "
                        f"{statistics.mean(r['speedup_per_flops'] for r in rs):.2f} |" if timed else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
