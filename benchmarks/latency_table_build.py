"""The latency table's cells on ONNX Runtime: built directly (ONNX nodes) against exported.

    python -m benchmarks.latency_table_build --model resnet18 --dataset digits --cells 5 \\
        --out benchmarks/results/latency-table-build-resnet18-digits.json

For every distinct conv/linear layer shape of the model, ``--cells`` cells of the table's grid
(the corners and the middle first) are prepared both ways, the runtime's ``prepare_layer`` (the
cell's Conv nodes, or a Gemm, built with ``onnx.helper``) and its whole-model ``prepare``
(``torch.onnx``'s exporter), and timed in alternation (the minimum of ``--runs`` runs each, ``--rounds`` rounds),
so the two figures of a cell share the machine's state. Reports the preparation seconds of each
path and, per cell, the ratio of the two timings: the table is only as good as that ratio is 1.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from autoprune.cost.latency import GRID, _layer_module, _signature, _time, _width
from autoprune.cost.runtimes import get_runtime
from autoprune.model.zoo import ModelSpec, build_model
from autoprune.prune.granularity import build_unit_table
from benchmarks.common import machine, write_results

ORDER = ((1.0, 1.0), (GRID[0], GRID[0]), (1.0, GRID[0]), (GRID[0], 1.0), (0.5, 0.5), (0.75, 0.375))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--dataset", default="digits", help="digits (1x8x8) or cifar (3x32x32) input shapes")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--cells", type=int, default=5)
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = ModelSpec(10, 1, 8) if args.dataset == "digits" else ModelSpec(10, 3, 32)
    model = build_model(args.model, spec).eval()
    table = build_unit_table(model, torch.randn(1, spec.in_channels, spec.image_size, spec.image_size))
    engine = get_runtime("onnxruntime")
    layers = {}
    for lay in table.layers:
        if _signature(lay) is not None:
            layers.setdefault(_signature(lay), lay)
    rows, prep = [], {"direct": 0.0, "exported": 0.0}
    for lay in layers.values():
        for fi, fo in ORDER[: args.cells]:
            module, shape = _layer_module(lay, _width(lay.in_channels, fi), _width(lay.out_channels, fo))
            module.eval()
            x = torch.randn(args.batch_size, *shape)
            runs = {}
            for name, make in (("direct", engine.prepare_layer), ("exported", engine.prepare)):
                start = time.perf_counter()
                runs[name] = make(module, x, 1)
                prep[name] += time.perf_counter() - start
            best = {name: [] for name in runs}
            with torch.inference_mode():
                for _ in range(args.rounds):
                    for name, run in runs.items():
                        best[name].append(min(_time(run, "cpu", args.runs, 2)))
            row = {"layer": lay.name, "fi": fi, "fo": fo, **{f"{k}_s": min(v) for k, v in best.items()}}
            row["ratio"] = row["direct_s"] / row["exported_s"]
            rows.append(row)
            print(f"{lay.name:24s} {fi:.3f}x{fo:.3f}: direct {row['direct_s'] * 1e6:8.1f} us, exported "
                  f"{row['exported_s'] * 1e6:8.1f} us, ratio {row['ratio']:.3f}", flush=True)
    ratios = [r["ratio"] for r in rows]
    summary = {"cells": len(rows), "prepare_s": prep, "ratio_median": statistics.median(ratios),
               "ratio_min": min(ratios), "ratio_max": max(ratios)}
    print(summary)
    if args.out:
        write_results(args.out, {"args": vars(args), "machine": machine(), "summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
