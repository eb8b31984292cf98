"""Does a latency ratio drift as a process runs episodes? And in what: the dense or the pruned time?

    python -m benchmarks.latency_drift            # the same model timed after every 25 episodes
    python -m benchmarks.latency_drift --parts    # dense and pruned medians after each kind of work

Times the best searched ResNet-56 policy (TPE seed 0, 0.5flops, from
``results/quality-resnet56-portfolio.json``) against the dense model (eager, batch 1, one thread,
60 alternated pairs) in a fresh process, then again after work an episode does:

* default: after every 25 episodes (a random policy pruned, refit, recalibrated, scored and timed
  with 30 pairs), the same model object, a fresh copy of it and a fresh prune;
* ``--parts``: after 15 prune-and-time cycles, 15 prune-and-score cycles and 10 full evaluations,
  with the dense and pruned medians.

Results (run on an otherwise idle machine): ``benchmarks/results/latency-drift-resnet56.txt``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from pathlib import Path

import numpy as np
import torch

from autoprune.cost.latency import RatioMeter
from benchmarks.common import make_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = make_task("resnet56")
    q = json.loads((Path(__file__).parent / "results" / "quality-resnet56-portfolio.json").read_text())
    row = next(r for r in q["rows"] if r["searcher"] == "tpe" and r["seed"] == 0)
    kept = [row["widths"][n] for n in task.table.names]
    meter = RatioMeter(task.dense, task.table.input_shape, task.device)
    ref = task.prune(kept)
    rng = np.random.default_rng(0)

    def ratio(model) -> float:
        return round(meter.measure(model, 1, 1, pairs=60).ratio, 4)

    def show(tag: str) -> None:
        times = meter.measure(ref, 1, 1, pairs=60)
        dense, pruned = times.latencies()
        print(f"{tag}: ratio {times.ratio:.4f}, dense {dense.median_s * 1e3:.3f} ms, "
              f"pruned {pruned.median_s * 1e3:.3f} ms", flush=True)

    def random_kept():
        return task.table.kept_all(rng.uniform(0, 0.8, len(task.table.units)))

    if args.parts:
        show("fresh")
        for _ in range(15):
            meter.measure(task.prune(random_kept()), 1, 1, pairs=30)
        show("after 15 prune+time")
        for _ in range(15):
            task.proxy_accuracy(task.prune(random_kept()))
        show("after 15 prune+proxy_accuracy")
        for _ in range(10):
            task.evaluate(random_kept())
        show("after 10 evaluate (refit + recalibrate + score)")
        return
    print("fresh process:", ratio(ref), ratio(ref), flush=True)
    for block in range(4):
        start = time.time()
        for _ in range(25):  # episodes: a new pruned model, evaluated and timed, then dropped
            model, _ = task.evaluate(random_kept())
            meter.measure(model, 1, 1, pairs=30)
        print(f"after {25 * (block + 1)} episodes ({time.time() - start:.0f}s): same model {ratio(ref)}, "
              f"a fresh copy {ratio(copy.deepcopy(ref))}, re-pruned {ratio(task.prune(kept))}", flush=True)
    gc.collect()
    print("after gc.collect:", ratio(ref), flush=True)


if __name__ == "__main__":
    main()
