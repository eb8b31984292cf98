"""The latency table against the clock, stage by stage: where its predictions go wrong.

    python -m benchmarks.latency_table_fidelity --model resnet56 --latency-runtime onnxruntime \\
        --latency-batch 64 --pairs 40 \\
        --policies benchmarks/results/search-resnet56-0.75latency-ort64-auto-stage.json \\
        --out benchmarks/results/latency-table-fidelity-resnet56-ort64.json

A latency budget prices every policy with the table (``LatencyModel.ratio``), and a search plays
what the table calls cheap: a stage the table overprices is one the search leaves narrow. For
each stage's block-inner convs (the stage space's knobs) cut to each width the runtime rewards,
the rest of the network dense, and for every row's policy in the ``--policies`` results files,
this prints the table's predicted latency ratio beside the one measured against the dense model
(``--pairs`` alternated pairs), and their relative error; with ``--other-table``, what another
table (an older build, say) predicts for the same policies in the same run. The table is the cached one (or built
as a search builds it), so the figures describe what a search on this machine would be told.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from autoprune.cost.latency import LatencyModel, RatioMeter, _width
from autoprune.envs import LayerSparsityEnv
from autoprune.envs.space import COUPLED, SearchSpace
from benchmarks.common import machine, make_task, read_results, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--latency-runtime", default="onnxruntime")
    ap.add_argument("--latency-batch", type=int, default=64)
    ap.add_argument("--latency-threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--policies", default="", help="search_quality results files, comma-separated")
    ap.add_argument("--widths", choices=("levels", "grid"), default="levels",
                    help="cut each stage to the widths the table rewards (levels) or to every grid width")
    ap.add_argument("--other-table", default=None,
                    help="a latency table's JSON (as the cache keeps it) whose predictions to print beside")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = make_task(args.model, round_to="auto")
    env = LayerSparsityEnv(task, budget="0.75latency", latency_runtime=args.latency_runtime,
                           latency_batch=args.latency_batch, latency_threads=args.latency_threads)
    cost, table = env.cost, task.table
    meter = RatioMeter(task.dense, table.input_shape, task.device)
    print(f"# {args.model}, {args.latency_runtime} batch {args.latency_batch}: the table's prediction "
          f"against the clock; table fit error max {cost.fit_error[0]:.1%} mean {cost.fit_error[1]:.1%}; "
          f"{machine()}", flush=True)

    policies: list[tuple[str, np.ndarray]] = []
    other = LatencyModel.from_json(table, json.loads(Path(args.other_table).read_text())) if args.other_table else None
    if args.widths == "grid":
        levels = [[(w, None) for w in sorted({_width(u.size, f) for f in cost.grid})] for u in table.units]
    else:
        levels = cost.width_levels()
    # the stage space's knobs: each stage's block-inner convs, the residual stream fixed whole
    stage_space = SearchSpace.build(table, 0.0, 1.0, ranges=[f"{COUPLED}=0"], share=["stage"])
    for lead, units in stage_space.groups.items():
        if len(units) < 2:
            continue  # a unit of its own (the stem, the classifier, a residual stream), not a stage
        for width, _ in levels[lead][:-1]:
            kept = table.sizes().copy()
            kept[units] = [min(width, table.units[u].size) for u in units]
            policies.append((f"{table.units[lead].name.split('.')[0]} inner at {width}/{table.units[lead].size}",
                             kept))
    for path in filter(None, args.policies.split(",")):
        for row in (read_results(path) or {}).get("rows", []):
            if "widths" in row:
                kept = np.array([row["widths"][n] for n in table.names])
                policies.append((f"{row['searcher']} seed {row['seed']} ({path.rsplit('/', 1)[-1]})", kept))

    rows = []
    for what, kept in policies:
        predicted = cost.ratio(kept)
        also = {} if other is None else {"other_predicted": other.ratio(kept)}
        measured = meter.measure(task.prune(kept), args.latency_batch, args.latency_threads, pairs=args.pairs,
                                 runtime=args.latency_runtime).ratio
        rows.append({"what": what, "predicted": predicted, "measured": measured,
                     "error": predicted / measured - 1.0, **also, "flops": task.cost_ratios(kept)["flops"],
                     "widths": dict(zip(table.names, (int(k) for k in kept)))})
        print(f"{what:60s} flops {rows[-1]['flops']:.3f} predicted {predicted:.3f} measured {measured:.3f} "
              f"({rows[-1]['error']:+.1%})" + (f"; other table {also['other_predicted']:.3f}" if also else ""),
              flush=True)
        if args.out:
            write_results(args.out, {"args": vars(args), "machine": machine(), "fit_error": list(cost.fit_error),
                                     "other_fit_error": other and list(other.fit_error), "rows": rows})


if __name__ == "__main__":
    main()
