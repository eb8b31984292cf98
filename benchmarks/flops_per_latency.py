"""What a FLOPs cut buys in measured latency on a runtime: the latency table's calibration policies.

    python -m benchmarks.flops_per_latency --model resnet56 --round-to auto \\
        --latency-runtime onnxruntime --latency-batch 64 \\
        --out benchmarks/results/flops-per-latency-resnet56-ort64.json

The latency table is calibrated on slimmed networks timed against the dense one in alternation
(uniform cuts, random policies, each stage cut alone; :func:`~autoprune.cost.latency.calibration_sparsities`).
For each, this prints its measured latency ratio, its FLOPs ratio and their quotient (the speedup
per FLOPs speedup: 1 where latency falls as fast as FLOPs), and fits ``latency = a + b * flops``
over them all: ``a`` is the part of the dense latency no channel cut removes on this runtime
(what runs whatever the widths: pooling, adds, layout conversions, per-op overhead), and a policy
at latency ratio ``L`` on that line has a speedup per FLOPs speedup of ``(L - a) / (b * L)``. The
table is this machine's cached one (it is measured if absent).
"""

from __future__ import annotations

import argparse

import numpy as np

from autoprune.cost.flops import closed_form
from autoprune.envs import LayerSparsityEnv
from benchmarks.common import machine, make_task, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--round-to", default="auto")
    ap.add_argument("--latency-runtime", default="onnxruntime")
    ap.add_argument("--latency-batch", type=int, default=64)
    ap.add_argument("--latency-threads", type=int, default=1)
    ap.add_argument("--at", default="0.5,0.6,0.75", help="latency ratios to read the line at")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    round_to = args.round_to if args.round_to == "auto" else int(args.round_to)
    task = make_task(args.model, round_to=round_to)
    env = LayerSparsityEnv(task, budget="0.9latency", latency_runtime=args.latency_runtime,
                           latency_batch=args.latency_batch, latency_threads=args.latency_threads)
    table, calibration = env.table, env.table_cost.calibration
    print(f"# {args.model} on {args.latency_runtime}, batch {args.latency_batch}: the latency table's "
          f"calibration policies; {machine()}")
    rows = []
    for kept, latency in zip(calibration["kept"], calibration["measured"]):
        flops = closed_form(table, np.asarray(kept)).flops / table.dense_macs
        rows.append({"latency": float(latency), "flops": float(flops), "speedup_per_flops_speedup": flops / latency})
        print(f"latency {latency:.3f}  flops {flops:.3f}  speedup per FLOPs speedup {flops / latency:.3f}")
    lat = np.array([r["latency"] for r in rows])
    flo = np.array([r["flops"] for r in rows])
    b, a = np.polyfit(flo, lat, 1)
    resid = lat - (a + b * flo)
    line = {f"{x:g}": float((x - a) / (b * x)) for x in (float(v) for v in args.at.split(","))}
    print(f"latency = {a:.3f} + {b:.3f} * flops (residual sd {resid.std():.3f}); on the line, speedup per "
          "FLOPs speedup " + ", ".join(f"{v:.2f} at latency {k}" for k, v in line.items()))
    if args.out:
        write_results(args.out, {"machine": machine(), "model": args.model, "runtime": args.latency_runtime,
                                 "batch": args.latency_batch, "rows": rows, "intercept": float(a), "slope": float(b),
                                 "residual_sd": float(resid.std()), "on_the_line": line})


if __name__ == "__main__":
    main()
