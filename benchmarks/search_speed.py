"""Search speed: episode cost against a dense forward pass, episodes per minute, memory over time.

    python -m benchmarks.search_speed --model resnet56 --episodes 200

Runs a TPE search through the study runner (SQLite, the real recording path), timing the first
10 episodes and the whole run, measuring one dense forward pass over the same search-val images
before, after 10 episodes and at the end, and reading the process's resident and peak memory
after 10 and after all episodes.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time

import optuna
import torch

from autoprune.envs import LayerSparsityEnv
from autoprune.evaluate.metrics import accuracy
from autoprune.studies.runner import SearchConfig, run_search
from benchmarks.common import machine, make_task


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--budget", default="0.5flops")
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--search-val-size", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    task = make_task(args.model, args.search_val_size)
    env = LayerSparsityEnv(task, budget=args.budget)
    dense = []

    def dense_pass():
        start = time.perf_counter()
        accuracy(task.dense, task.splits.search_val, task.config.eval_batch_size)
        dense.append(time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        def search(n):
            start = time.perf_counter()
            run_search(env, SearchConfig(searcher="tpe", episodes=n, storage=f"sqlite:///{tmp}/s.db",
                                         study_name="speed", resume=True, progress=False))
            return time.perf_counter() - start

        dense_pass()
        t10 = search(10)
        rss10, peak10 = rss_mb(), peak_mb()
        dense_pass()
        t_rest = search(args.episodes)
        dense_pass()
        rss_n, peak_n = rss_mb(), peak_mb()
    per_ep = (t10 + t_rest) / args.episodes
    d = statistics.median(dense)
    print(f"# {args.model} {args.budget}, tpe, search-val {len(task.splits.search_val)} images, calibration "
          f"{len(task.splits.calib)} images, {args.threads} threads; {machine()}")
    print("| figure | value |\n|---|---|")
    print(f"| dense forward over search-val (median of 3) | {d:.2f} s |")
    print(f"| mean episode, first 10 | {t10 / 10:.2f} s ({t10 / 10 / d:.2f} x dense forward) |")
    print(f"| mean episode, all {args.episodes} | {per_ep:.2f} s ({per_ep / d:.2f} x dense forward) |")
    print(f"| episodes per minute | {60 / per_ep:.1f} |")
    print(f"| resident memory after 10 / {args.episodes} episodes | {rss10:.0f} MB / {rss_n:.0f} MB "
          f"({rss_n / rss10 - 1:+.1%}) |")
    print(f"| peak memory after 10 / {args.episodes} episodes | {peak10:.0f} MB / {peak_n:.0f} MB "
          f"({peak_n / peak10 - 1:+.1%}) |")


if __name__ == "__main__":
    main()
