"""A one-shot rule's knob bisected to fractions of a latency aim, each filled back up to the aim.

    python -m benchmarks.rule_aims --model resnet56 --target 0.599 --rule uncoupled,uniform \\
        --aims 1,0.985,0.97,0.94 --latency-runtime onnxruntime --latency-batch 64 \\
        --out benchmarks/results/rule-aims-resnet56-ort64-0.599.json

Under a latency budget a rule's knob is bisected to the wall's aim and its policy then widened
into the slack the coarse widths left (``autoprune.agents.baselines.filled``). Where the knob
stops decides what the fill has to spend, so the rule's accuracy need not rise with its aim. For
each rule and each fraction of ``--aims`` this bisects the rule to that fraction of ``--target``
(a predicted latency ratio, on a wall aimed at exactly it: no margin, no correction) and fills it
up to ``--target``, as a search's replay does (``rule_policy``), and scores the policy as an
episode does (the proxy on search-val) and on the test images. Latency is the table's
prediction, not timed: every row is filled to one aim. This is what ``RULE_AIMS`` (the fractions
a search replays its best rule at) was chosen from.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from autoprune.agents.baselines import rule_policy
from autoprune.envs import LayerSparsityEnv
from benchmarks.common import machine, make_task, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--target", type=float, required=True, help="the aim, a predicted latency ratio to dense")
    ap.add_argument("--rule", default="uncoupled", help="one-shot rules, comma-separated")
    ap.add_argument("--aims", default="1,0.97,0.94", help="fractions of the target each rule is bisected to")
    ap.add_argument("--round-to", default="auto")
    ap.add_argument("--proxy", default="ce")
    ap.add_argument("--latency-runtime", default="onnxruntime")
    ap.add_argument("--latency-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    round_to = args.round_to if args.round_to == "auto" else int(args.round_to)
    task = make_task(args.model, proxy=args.proxy, round_to=round_to)
    env = LayerSparsityEnv(task, budget=f"{args.target:.6f}latency", latency_margin=0.0, latency_correct=False,
                           latency_runtime=args.latency_runtime, latency_batch=args.latency_batch,
                           latency_threads=1)
    print(f"# {args.model}: rules bisected to fractions of {args.target} and filled to it; {machine()}", flush=True)
    rows, seen = [], {}
    for rule in args.rule.split(","):
        for fraction in (float(a) for a in args.aims.split(",")):
            start = time.perf_counter()
            kept = env.feasible_policy(rule_policy(env, rule, fraction))
            key = tuple(int(k) for k in kept)
            row = {"rule": rule, "aim": fraction, "predicted": env.cost.ratio(kept),
                   "flops": task.cost_ratios(kept)["flops"], "widths": dict(zip(task.table.names, key))}
            if key in seen:  # the same widths as an earlier row: its scores
                row.update({k: seen[key][k] for k in ("proxy", "test")}, same_as=seen[key]["label"])
            else:
                row["proxy"] = env.finish(kept).accuracy
                row["test"] = task.test_accuracy(task.pruned(kept)[0])
                seen[key] = {**row, "label": f"{rule}@{fraction:g}"}
            rows.append(row)
            print(f"{rule} at {fraction:g} of the aim: predicted {row['predicted']:.4f}, flops {row['flops']:.3f}, "
                  f"proxy {row['proxy']:.4f}, test {row['test']:.4f}"
                  f"{' (same widths as ' + row['same_as'] + ')' if 'same_as' in row else ''}; "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            if args.out:
                write_results(args.out, {"args": vars(args), "machine": machine(), "rows": rows})
    for rule in args.rule.split(","):
        row = max((r for r in rows if r["rule"] == rule), key=lambda r: r["proxy"])
        at_one = next((r for r in rows if r["rule"] == rule and np.isclose(r["aim"], 1.0)), None)
        print(f"{rule}: best by the proxy at {row['aim']:g} of the aim, test {row['test']:.4f}"
              + (f" (at the aim itself {at_one['test']:.4f})" if at_one else ""))


if __name__ == "__main__":
    main()
