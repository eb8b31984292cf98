"""How well each way of correcting the latency table predicts a search's next episode, replayed
from studies that measured every episode.

    python -m benchmarks.latency_refit_replay --model resnet56 --round-to auto \\
        --latency-runtime onnxruntime --latency-batch 64 \\
        --storage sqlite:///bench-state/r56-lat06-blk-tpe-s0.db,sqlite:///bench-state/r56-lat06-blk-ddpg-s0.db \\
        --out benchmarks/results/latency-refit-replay-resnet56-ort64.json

A latency search prices each policy by the latency table, then measures it. For every episode of
each study in ``--storage`` (in the order they ran), this predicts its latency ratio as each
correction would have from the episodes before it, and compares that with what the episode
measured:

- ``table``: the table as calibrated, no correction;
- ``median``: the table scaled by the median of measured over predicted latency of the episodes
  so far, from the third (the default);
- ``refit``: the table's coefficients fitted again on its calibration policies and every episode so
  far, from the first (:meth:`~autoprune.cost.latency.LatencyModel.refit`, ``--latency-refit``).

An error is measured over predicted, less one; over zero means the episode ran slower than
priced, and beyond the budget's 3 % tolerance where the wall aimed at the budget by it. The
policies are the ones the studies' own walls chose, so this compares predictions on the same
episodes, not searches steered by each. The table is this machine's cached one for the model,
runtime and batch (it is measured if absent), which must be the one the studies ran with.

Each correction is replayed on both forms of the table's fit (:func:`~autoprune.cost.latency.fit_calibration`),
fitted on the table's own calibration: ``one`` table coefficient for the whole network, or one
``per_stage`` (what a table is fitted with wherever the network has stages).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import optuna

from autoprune.cost.latency import fit_calibration
from autoprune.envs import LayerSparsityEnv
from benchmarks.common import machine, make_task, write_results

ARMS = ("table", "median", "refit")
FORMS = ("one", "per_stage")  # the forms of the table's fit (fit_calibration)


def replay(table, episodes: list[tuple[np.ndarray, float]]) -> dict[str, list[float]]:
    """Each arm's error on each episode (measured over predicted, less one), from the third."""
    errors: dict[str, list[float]] = {arm: [] for arm in ARMS}
    by_table = [table.ratio(kept) for kept, _ in episodes]
    for t in range(3, len(episodes)):
        kept, measured = episodes[t]
        seen = episodes[:t]
        scale = statistics.median(m / p for (_, m), p in zip(seen, by_table))
        refit = table.refit([k for k, _ in seen], [m for _, m in seen])
        predicted = {"table": by_table[t], "median": scale * by_table[t], "refit": refit.ratio(kept)}
        for arm in ARMS:
            errors[arm].append(measured / predicted[arm] - 1.0)
    return errors


def summary(errors: list[float]) -> dict:
    e = np.asarray(errors)
    return {"episodes": len(e), "mean": float(e.mean()), "mean_abs": float(np.abs(e).mean()),
            "max": float(e.max()), "min": float(e.min()), "over_3pct": int((e > 0.03).sum()),
            "over_2pct": int((e > 0.02).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--storage", required=True, help="study databases, comma-separated (one study each)")
    ap.add_argument("--round-to", default="auto")
    ap.add_argument("--latency-runtime", default="onnxruntime")
    ap.add_argument("--latency-batch", type=int, default=64)
    ap.add_argument("--latency-threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    round_to = args.round_to if args.round_to == "auto" else int(args.round_to)
    task = make_task(args.model, round_to=round_to)
    env = LayerSparsityEnv(task, budget="0.9latency", latency_runtime=args.latency_runtime,
                           latency_batch=args.latency_batch, latency_threads=args.latency_threads)
    seen = env.table_cost.calibration
    # the table in each form of its fit, on its own calibration (one coefficient; one per stage)
    tables = {form: fit_calibration(env.table_cost, seen["kept"], seen["measured"], by_stage=form == "per_stage")
              for form in FORMS}
    arms = [f"{form}/{arm}" for form in FORMS for arm in ARMS]
    print(f"# {args.model}: latency corrections replayed on {args.storage}; {machine()}", flush=True)
    studies, pooled = {}, {arm: [] for arm in arms}

    def show(name: str, arm: str, s: dict) -> None:
        print(f"{name} {arm:16s}: mean {s['mean']:+.3f} |e| {s['mean_abs']:.3f} max {s['max']:+.3f} "
              f"min {s['min']:+.3f} beyond +3 % {s['over_3pct']} of {s['episodes']}", flush=True)

    for url in args.storage.split(","):
        for name in optuna.get_all_study_names(url):
            study = optuna.load_study(study_name=name, storage=url)
            episodes = [(np.array(t.user_attrs["widths"]), t.user_attrs["ratios"]["latency"])
                        for t in sorted(study.trials, key=lambda t: t.number)
                        if t.state == optuna.trial.TrialState.COMPLETE and "latency" in t.user_attrs.get("ratios", {})]
            errors = {f"{form}/{arm}": e for form in FORMS for arm, e in replay(tables[form], episodes).items()}
            studies[name] = {arm: summary(errors[arm]) for arm in arms}
            for arm in arms:
                pooled[arm] += errors[arm]
                show(name, arm, studies[name][arm])
    total = {arm: summary(pooled[arm]) for arm in arms}
    for arm in arms:
        show("all", arm, total[arm])
    if args.out:
        write_results(args.out, {"machine": machine(), "model": args.model, "runtime": args.latency_runtime,
                                 "batch": args.latency_batch, "storage": args.storage.split(","),
                                 "tables": {form: {"coef": list(t.coef), "fit_error": list(t.fit_error)}
                                            for form, t in tables.items()},
                                 "loo_error": seen["loo_error"], "studies": studies, "all": total})


if __name__ == "__main__":
    main()
