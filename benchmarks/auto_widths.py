"""The widths ``--round-to auto`` plays: per unit, the latency table's widths at which the runtime
runs the unit's layers faster than at the next wider one.

    python -m benchmarks.auto_widths --model resnet56 --runtime onnxruntime --batches 1,64 \\
        --out benchmarks/results/auto-widths-resnet56-ort.json

For each batch size it builds (or reads from the cache) the latency table ``round_to auto``
uses, one intra-op thread on the CPU, and lists each distinct (unit size, widths) pair with the
units that have it, and how many of the table's grid widths were kept.
"""

from __future__ import annotations

import argparse

import torch

from autoprune.cost.latency import GRID, _width
from autoprune.envs import LayerSparsityEnv
from benchmarks.common import machine, make_task, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--runtime", default="onnxruntime")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = make_task(args.model, round_to="auto")
    results = {"args": vars(args), "machine": machine(), "tables": []}
    for batch in (int(b) for b in args.batches.split(",")):
        env = LayerSparsityEnv(task, budget="0.75latency", latency_runtime=args.runtime, latency_batch=batch,
                               latency_threads=1)
        groups: dict[tuple, list[str]] = {}
        for unit, levels in zip(env.table.units, env.table.levels):
            groups.setdefault((unit.size, tuple(w for w, _ in levels)), []).append(unit.name)
        grid = sum(len({_width(u.size, f) for f in GRID}) for u in env.table.units)
        kept = sum(len(lv) for lv in env.table.levels)
        print(f"# {args.model} on {args.runtime}, batch {batch}: {kept} of {grid} grid widths kept "
              f"(table fit error max {env.cost.fit_error[0]:.1%}, mean {env.cost.fit_error[1]:.1%})")
        for (size, widths), names in groups.items():
            print(f"  {size:4d} channels, {len(names):2d} units ({names[0]}, ...): {', '.join(map(str, widths))}")
        results["tables"].append({"batch": batch, "kept": kept, "grid": grid, "fit_error": list(env.cost.fit_error),
                                  "groups": [{"size": s, "widths": list(w), "units": n}
                                             for (s, w), n in groups.items()]})
    if args.out:
        write_results(args.out, results)


if __name__ == "__main__":
    main()
