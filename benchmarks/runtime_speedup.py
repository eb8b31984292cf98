"""Runtime speedup: how much of a pruned model's FLOPs cut each runtime turns into latency (issue 15).

The full run (84 rows and two profiles, about 20 minutes on a 2-core x86 CPU), on an otherwise
idle machine, since every figure is a timing:

    R=benchmarks/results
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.runtime_speedup --models resnet56,resnet18 \\
        --runtimes eager,onnxruntime,compile --batches 1,64 --round-to 1,4,8,16 --pairs 30 --threads 1 \\
        --quality resnet56=$R/quality-resnet56-portfolio.json,resnet18=$R/quality-resnet18-lsq.json \\
        --profile eager --out $R/runtime-speedup.json

(``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads sleep rather than spin when idle, so they take no
core from the timed work.) Two tables per model, at ``--budget`` (0.5flops):

1. per runtime, each policy (the ``uncoupled`` and ``uniform`` rules, and the best searched policy
   of a ``search_quality`` file, by proxy score) at each batch size: FLOPs ratio, latency ratio,
   dense and pruned ms, speedup (1 / latency ratio), FLOPs speedup (1 / FLOPs ratio) and their
   quotient, ``speedup / FLOPs-speedup`` (1: every FLOP cut is time saved);
2. the round-to sweep: the ``uncoupled`` rule on a task whose widths are multiples of each
   ``--round-to``, with the same columns per runtime and batch size.

A latency ratio is the median of per-pair ratios over ``--pairs`` alternated runs of the dense and
pruned model (:class:`~autoprune.cost.latency.RatioMeter`: the dense model is prepared once per
runtime and batch size), with ``--threads`` intra-op threads. A runtime that fails (``compile``
without a C++ compiler) gets its error string in its rows and the run goes on.

The JSON (``--out``) is rewritten after every row, so a killed run keeps what it measured; run the
same command again and it measures only the rows it lacks (a row is keyed by model, budget,
policy, round_to, runtime, batch size, threads and device, not by ``--pairs``; rows that failed, or
that timed other widths than the policy has now, are measured again; ``--fresh`` starts over).
``--device cuda`` times on a GPU (the runtimes ``eager`` and ``compile``, in float32; ``--threads``
does not apply), e.g. at ``--batches 256`` for issue 25. ``--profile RUNTIME`` (CPU only) adds, per
model, where the pruned ``uncoupled`` model spends its time at ``--profile-batch`` against the
dense one (:mod:`benchmarks.runtime_profile`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from autoprune.cost.latency import RatioMeter
from autoprune.cost.runtimes import RUNTIMES
from autoprune.model.zoo import ModelSpec, build_model
from autoprune.units.policy import Policy
from benchmarks import runtime_profile
from benchmarks.common import fixture, machine, make_task, pick, read_results, rule_widths, write_results

RULES = ("uncoupled", "uniform")


class Results:
    """The JSON file of rows keyed by what they measured, rewritten (atomically) after each row."""

    KEY = ("section", "model", "budget", "policy", "round_to", "runtime", "batch", "threads", "device")

    def __init__(self, path: Path, args: argparse.Namespace, fresh: bool) -> None:
        self.path = path
        self.earlier = None if fresh else read_results(path)
        old = self.earlier or {}
        self.rows = {self.key(r): r for r in old.get("rows", [])}
        self.profiles: dict = old.get("profiles", {})
        self.args = vars(args)

    @classmethod
    def key(cls, row: dict) -> str:
        # rows written before --device have no device: they were timed on the CPU
        return "|".join(str(row.get(k, "cpu") if k == "device" else row[k]) for k in cls.KEY)

    def done(self, key: dict) -> dict | None:
        """The stored row, unless it is absent or failed (a failed row is measured again)."""
        row = self.rows.get(self.key(key))
        return row if row is not None and "error" not in row else None

    def add(self, row: dict) -> None:
        self.rows[self.key(row)] = row
        self.save()

    def save(self) -> None:
        doc = {"machine": machine(), "args": self.args, "rows": list(self.rows.values()), "profiles": self.profiles}
        write_results(self.path, doc, earlier=self.earlier)


class ModelBench:
    """One model's tasks (built lazily, one per width multiple), its policies and its meter."""

    def __init__(self, name: str, budget: str, quality: str | None, device: str = "cpu") -> None:
        self.name, self.budget = name, budget
        self.random_dense = None
        if not fixture(name).exists():
            # a model without a fixture (smoke tests): seeded random weights, which time the same
            print(f"note: no fixture for {name}; timing it with random weights", flush=True)
            torch.manual_seed(0)
            self.random_dense = build_model(name, ModelSpec(10, 3, 32)).eval()
        self._tasks: dict = {}
        self.task = self.task_for(None)
        self.round_to = self.task.table.round_to
        self._tasks[self.round_to] = self.task
        self.meter = RatioMeter(self.task.dense, self.task.table.input_shape, device)
        self.policies = {rule: rule_widths(self.task, rule, budget) for rule in RULES}
        if quality:
            q = json.loads(Path(quality).read_text())
            if (q["args"]["model"], q["args"]["budget"]) != (name, budget):
                raise SystemExit(f"{quality} is a search of {q['args']['model']} at {q['args']['budget']}, "
                                 f"not {name} at {budget}")
            best = pick(q["rows"], "best")
            label = f"{best['searcher']} s{best['seed']} (best of search)"
            self.policies[label] = Policy(best["policy"], widths=best.get("widths", {})).kept(self.task.table)
        self._pruned: dict = {}

    def task_for(self, round_to: int | None):
        if round_to not in self._tasks:
            self._tasks[round_to] = make_task(self.name, search_val_size=100, calib_batches=1, round_to=round_to,
                                              dense=self.random_dense)
        return self._tasks[round_to]

    def pruned(self, task, kept: np.ndarray):
        """The slimmed model of ``kept`` on ``task`` (built once, kept for every runtime and batch)."""
        key = (task.table.round_to, tuple(int(k) for k in kept))
        if key not in self._pruned:
            self._pruned[key] = task.pruner.finalize(task.prune(kept)).eval()
        return self._pruned[key]


def measure(bench: ModelBench, model, runtime: str, batch: int, threads: int, pairs: int) -> dict:
    """Latency ratio of ``model`` against the dense model, and both models' ms."""
    start = time.perf_counter()
    times = bench.meter.measure(model, batch, threads, pairs=pairs, runtime=runtime)
    dense, pruned = times.latencies()
    q1, q3 = np.percentile(np.asarray(times.other_s) / np.asarray(times.base_s), [25, 75])
    return {"latency_ratio": times.ratio, "ratio_iqr": float(q3 - q1), "dense_ms": dense.median_s * 1e3,
            "pruned_ms": pruned.median_s * 1e3, "pairs": times.pairs, "seconds": time.perf_counter() - start}


def run_row(results: Results, broken: dict, bench: ModelBench, key: dict, task, kept: np.ndarray,
            args) -> dict:
    """The stored row of ``key``, or a new measurement of it (an error row where the runtime fails,
    or where the stored row timed other widths)."""
    row = results.done(key)
    if row is not None and row["widths"] == [int(k) for k in kept]:
        return row
    ratios = task.cost_ratios(kept)
    row = {**key, "flops_ratio": ratios["flops"], "params_ratio": ratios["params"],
           "widths": [int(k) for k in kept]}
    failed = broken.get((bench.name, key["runtime"]))
    if failed is None:
        try:
            row.update(measure(bench, bench.pruned(task, kept), key["runtime"], key["batch"], args.threads,
                               args.pairs))
        except Exception as err:  # a runtime fails in many ways (no compiler, an export error): go on
            first = (str(err).strip().splitlines() or [""])[0][:300]
            failed = broken[(bench.name, key["runtime"])] = f"{type(err).__name__}: {first}"
    if failed is not None:
        row["error"] = failed
    else:
        row["speedup"] = 1.0 / row["latency_ratio"]
        row["flops_speedup"] = 1.0 / row["flops_ratio"]
        row["speedup_over_flops_speedup"] = row["flops_ratio"] / row["latency_ratio"]
    results.add(row)
    return row


def cells(row: dict) -> str:
    if "error" in row:
        return f"error: {row['error']} | | | | | |"
    return (f"{row['latency_ratio']:.3f} | {row['dense_ms']:.2f} | {row['pruned_ms']:.2f} | {row['speedup']:.2f} | "
            f"{row['flops_speedup']:.2f} | **{row['speedup_over_flops_speedup']:.2f}** |")


COLUMNS = "latency ratio | dense ms | pruned ms | speedup | FLOPs speedup | speedup / FLOPs-speedup |"


def policy_tables(results: Results, broken: dict, bench: ModelBench, args) -> None:
    for runtime in args.runtimes:
        print(f"\n## {bench.name}, {runtime}: policies at {args.budget} (round_to {bench.round_to}), "
              f"{args.threads} thread(s), {args.pairs} pairs\n\n| policy | batch | FLOPs ratio | {COLUMNS}\n"
              "|---|---|---|---|---|---|---|---|---|", flush=True)
        for batch in args.batches:
            for name, kept in bench.policies.items():
                key = {"section": "policies", "model": bench.name, "budget": args.budget, "policy": name,
                       "round_to": bench.round_to, "runtime": runtime, "batch": batch, "threads": args.threads,
                       "device": args.device}
                row = run_row(results, broken, bench, key, bench.task, kept, args)
                print(f"| {name} | {batch} | {row['flops_ratio']:.3f} | {cells(row)}", flush=True)


def round_to_table(results: Results, broken: dict, bench: ModelBench, args) -> None:
    print(f"\n## {bench.name}: round-to sweep, uncoupled at {args.budget}, {args.threads} thread(s), "
          f"{args.pairs} pairs\n\n| round_to | FLOPs ratio | runtime | batch | {COLUMNS}\n"
          "|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for round_to in args.round_to:
        task = bench.task_for(round_to)
        kept = rule_widths(task, "uncoupled", args.budget)
        for runtime in args.runtimes:
            for batch in args.batches:
                key = {"section": "round_to", "model": bench.name, "budget": args.budget, "policy": "uncoupled",
                       "round_to": round_to, "runtime": runtime, "batch": batch, "threads": args.threads,
                       "device": args.device}
                row = run_row(results, broken, bench, key, task, kept, args)
                print(f"| {round_to} | {row['flops_ratio']:.3f} | {runtime} | {batch} | {cells(row)}", flush=True)


def profile_section(results: Results, bench: ModelBench, args) -> None:
    key = f"{bench.name}|{args.budget}|uncoupled|{args.profile}|b{args.profile_batch}|t{args.threads}"
    widths = [int(k) for k in bench.policies["uncoupled"]]
    if results.profiles.get(key, {}).get("widths") != widths:  # absent, or of other widths (or unrecorded)
        shape = tuple(bench.task.table.input_shape)[-3:]
        x = torch.randn(args.profile_batch, *shape, generator=torch.Generator().manual_seed(0))
        pruned = bench.pruned(bench.task, bench.policies["uncoupled"])
        try:
            results.profiles[key] = runtime_profile.compare(bench.task.dense, pruned, x, args.profile,
                                                            args.threads, args.profile_runs)
        except Exception as err:
            results.profiles[key] = {"error": f"{type(err).__name__}: {str(err).strip()[:300]}"}
        results.profiles[key]["widths"] = widths
        results.save()
    prof = results.profiles[key]
    print(f"\n## {bench.name}: where the pruned uncoupled model spends its time", flush=True)
    print(prof["error"] if "error" in prof else runtime_profile.markdown(prof), flush=True)


def parse_quality(text: str | None, models: list[str]) -> dict[str, str]:
    """``model=path,model=path``; a bare path names the one model given."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        model, sep, path = item.partition("=")
        if not sep:
            if len(models) != 1:
                raise SystemExit("--quality: with several models, give model=path for each")
            model, path = models[0], item
        out[model] = path
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet56,resnet18")
    ap.add_argument("--runtimes", default="eager,onnxruntime,compile", help=f"of {', '.join(RUNTIMES.names())}")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--round-to", default="1,4,8,16", help="width multiples of the round-to sweep ('' skips it)")
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", default="0.5flops")
    ap.add_argument("--quality", default=None, help="search_quality JSON per model: resnet56=path,resnet18=path")
    ap.add_argument("--profile", default=None, choices=RUNTIMES.names(),
                    help="also profile the pruned uncoupled model against the dense one on this runtime")
    ap.add_argument("--profile-batch", type=int, default=64)
    ap.add_argument("--profile-runs", type=int, default=20)
    ap.add_argument("--out", default="runtime-speedup.json", help="JSON of the results, rewritten after each row")
    ap.add_argument("--fresh", action="store_true", help="ignore the rows already in --out")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for GPU timings (eager and compile)")
    args = ap.parse_args()
    if args.profile and args.device != "cpu":
        raise SystemExit("--profile runs on the CPU only; leave it out with --device cuda")
    args.models = args.models.split(",")
    args.runtimes = args.runtimes.split(",")
    for runtime in args.runtimes:
        RUNTIMES.get(runtime)  # a typo fails now, not after an hour
    args.batches = [int(b) for b in args.batches.split(",")]
    args.round_to = [int(r) for r in args.round_to.split(",") if r]
    quality = parse_quality(args.quality, args.models)
    results = Results(Path(args.out), args, args.fresh)
    broken: dict = {}  # (model, runtime) -> the error of its first failure in this run
    where = "CPU" if args.device == "cpu" else args.device
    print(f"# runtime speedup at {args.budget}: {where}, {args.threads} intra-op thread(s); {machine()}", flush=True)
    for name in args.models:
        bench = ModelBench(name, args.budget, quality.get(name), args.device)
        policy_tables(results, broken, bench, args)
        if args.round_to:
            round_to_table(results, broken, bench, args)
        if args.profile:
            profile_section(results, bench, args)
    print(f"\nresults in {args.out}")


if __name__ == "__main__":
    main()
