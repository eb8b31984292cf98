"""Random-action episodes of LayerSparsity-v0 on a CIFAR-10 fixture: budget met, episode cost.

    python -m benchmarks.env_episode --model resnet56 --budget 0.5flops --episodes 20

Prints, for each episode, the achieved cost ratios and proxy accuracy, then the mean episode wall
time as a ratio to one dense forward pass over the same search-val images (measured in the same
run, interleaved with the episodes so machine drift hits both alike).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from autoprune.envs import LayerSparsityEnv
from autoprune.evaluate.metrics import accuracy
from benchmarks.common import machine, make_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--budget", default="0.5flops")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--search-val-size", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    task = make_task(args.model, args.search_val_size)
    env = LayerSparsityEnv(task, budget=args.budget)
    print(f"# {args.model} {args.budget}, {len(task.table.units)} units, search-val "
          f"{len(task.splits.search_val)} images, calib {len(task.splits.calib)} images; {machine()}")
    episode_s, dense_s, met = [], [], 0
    for ep in range(args.episodes):
        start = time.perf_counter()
        accuracy(task.dense, task.splits.search_val, task.config.eval_batch_size)
        dense_s.append(time.perf_counter() - start)
        env.reset(seed=ep)
        env.action_space.seed(ep)
        start = time.perf_counter()
        done = False
        while not done:
            _, reward, done, _, info = env.step(env.action_space.sample())
        episode_s.append(time.perf_counter() - start)
        met += info["within_budget"]
        r = info["ratios"]
        print(f"episode {ep:3d}: flops {r['flops']:.4f} params {r['params']:.4f} proxy acc "
              f"{info['accuracy']:.4f} reward {reward:+.4f} within budget {info['within_budget']} "
              f"{episode_s[-1]:.2f}s")
    ratio = statistics.mean(e / d for e, d in zip(episode_s, dense_s))
    print(f"\n{met}/{args.episodes} episodes within budget; mean episode {statistics.mean(episode_s):.2f}s, "
          f"dense forward over search-val {statistics.mean(dense_s):.2f}s; "
          f"episode / dense-forward ratio {ratio:.2f} (mean of per-episode ratios)")


if __name__ == "__main__":
    main()
