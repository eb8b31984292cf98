"""A one-shot rule at the searched policy's latency: the comparison at equal latency, timed together.

    python -m benchmarks.rule_at_latency --model resnet56 --round-to auto --latency-runtime onnxruntime \\
        --latency-batch 64 --rule uncoupled --pairs 60 \\
        --against benchmarks/results/search-resnet56-0.75latency-ort64-auto-stage.json \\
        --out benchmarks/results/rule-at-latency-resnet56-ort64-stage.json

A search and the rule it is compared with rarely land at one latency: the rule is bisected and
filled at the wall's first aim, the search plays at the aim its measurements sized. For every
search row of ``--against`` (a ``search_quality`` results file), this fills ``--rule`` up to that
row's predicted latency as this run's table prices its widths (a wall aimed at exactly that figure:
no margin, no correction), scores it on the test images as an episode would, and times the rule's
model and the searched model against the dense one in alternation (with several rules, each; the
one with the best test accuracy is the one compared) (``--rounds`` rounds of
``--pairs`` pairs each, the median of the rounds), so both ratios come from the same minutes of
one machine.

``--match measured`` (the default) goes on until the two are equal as measured: a table prices
some kinds of cut dearer than others (on ResNet-56 at batch 64 the block-multiple table priced
the `uncoupled` rule's inner cuts 7 % over what they measured), so at one predicted latency a
rule can run faster than the searched policy and be compared at a latency it did not need. Each
rule whose measured ratio is more than ``--tolerance`` off the searched one's is filled again to
its predicted latency times their ratio, and everything is timed again, up to ``--steps`` times;
the rows say where each rule ended. ``--match predicted`` stops after the first timing (how the
rows before 2026-12-06 were made).

A rule's knob can jump between unlike policies from one refill to the next (ResNet-56's
``knapsack-stage`` at batch 1, refilled towards a search's 0.683 of dense, ended at 62.68 % at
0.617, where filled to 0.657 it tests 84.71 %). So with ``--choose best-under`` (the default
since 2026-12-07) each rule is compared at its best on test among the policies it was timed at
that measured at or under the searched policy's latency (within ``--tolerance``); where none did,
the last refill's stays. ``--choose last`` keeps the last refill's, as before.

``--pair-out FILE`` writes the searched row with the best proxy score and its rule twin as a
``search_quality``-shaped file, for ``finetune_recipe --quality FILE --which best,rule`` (the
fine-tuned pair at equal latency; ``benchmarks/finetune_on_gpu.sh`` job ``lat``). With
``--pair-from FILES`` (earlier results of this script, comma-separated, e.g. one per seed) it
writes that pair from their rows instead, timing nothing: the best searched row by proxy over all
of them, and its rule twin as that run filled and timed it.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from autoprune.agents.baselines import rule_policy
from autoprune.cost.latency import RatioMeter
from autoprune.envs import LayerSparsityEnv
from benchmarks.common import is_rule, machine, make_task, read_results, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--against", required=True, help="a search_quality results file with latency rows")
    ap.add_argument("--rule", default="uncoupled",
                    help="one-shot rules, comma-separated: each is filled to the latency, the best on test compared")
    ap.add_argument("--round-to", default="auto")
    ap.add_argument("--proxy", default="ce")
    ap.add_argument("--latency-runtime", default="onnxruntime")
    ap.add_argument("--latency-batch", type=int, default=64)
    ap.add_argument("--latency-threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--pair-out", default=None, help="the best searched row and its rule twin, for finetune_recipe")
    ap.add_argument("--pair-from", default=None,
                    help="earlier results of this script, comma-separated: --pair-out from their rows, untimed")
    ap.add_argument("--match", choices=("measured", "predicted"), default="measured",
                    help="fill each rule until it measures as the searched policy does, or to its predicted latency")
    ap.add_argument("--tolerance", type=float, default=0.01, help="--match measured: relative, of the latency ratio")
    ap.add_argument("--steps", type=int, default=3, help="--match measured: refills at most")
    ap.add_argument("--choose", choices=("best-under", "last"), default="best-under",
                    help="--match measured: each rule's policy compared: its best on test of those timed at or "
                         "under the searched policy's latency (within --tolerance), or the last refill's")
    args = ap.parse_args()
    found = read_results(args.against)
    if args.pair_from:
        if not args.pair_out:
            ap.error("--pair-from writes --pair-out; give it")
        write_pair(args.pair_out, found, [row for f in args.pair_from.split(",") for row in read_results(f)["rows"]])
        return
    torch.set_num_threads(args.threads)
    round_to = args.round_to if args.round_to == "auto" else int(args.round_to)
    task = make_task(args.model, proxy=args.proxy, round_to=round_to)
    meter = RatioMeter(task.dense, task.table.input_shape, task.device)
    rules = args.rule.split(",")
    print(f"# {args.model}: the {args.rule} rule(s) at each searched policy's predicted latency; {machine()}",
          flush=True)

    def timed(model) -> float:
        return meter.measure(model, args.latency_batch, args.latency_threads, pairs=args.pairs,
                             runtime=args.latency_runtime).ratio

    def aimed_at(target: float) -> LayerSparsityEnv:
        return LayerSparsityEnv(task, budget=f"{target:.6f}latency", latency_margin=0.0, latency_correct=False,
                                latency_runtime=args.latency_runtime, latency_batch=args.latency_batch,
                                latency_threads=args.latency_threads)

    def filled(rule: str, target: float):
        env = aimed_at(target)
        return env.feasible_policy(rule_policy(env, rule))

    built: dict[tuple[int, ...], torch.nn.Module] = {}
    tests: dict[tuple[int, ...], float] = {}

    def model_of(kept) -> torch.nn.Module:
        """The pruned model of widths ``kept``, built once (timed and scored as the same model)."""
        key = tuple(int(k) for k in kept)
        if key not in built:
            built[key] = task.pruned(list(key))[0]
        return built[key]

    def test_of(kept) -> float:
        """Test accuracy of the model of widths ``kept``, scored once."""
        key = tuple(int(k) for k in kept)
        if key not in tests:
            tests[key] = task.test_accuracy(model_of(key))
        return tests[key]

    def time_all(models: dict) -> dict[str, list[float]]:
        ratios = {name: [] for name in models}
        for _ in range(args.rounds):  # alternated, so drift moves every model alike
            for name, model in models.items():
                ratios[name].append(timed(model))
        return ratios

    # every row's widths priced by this run's table (one table, whatever the budget): a table
    # measured again (another session, another load) predicts other figures than the search's
    price = None
    rows = []
    for row in found["rows"]:
        if is_rule(row["searcher"]) or "latency_predicted" not in row["ratios"]:
            continue
        searched_kept = [row["widths"][n] for n in task.table.names]
        price = price or aimed_at(row["ratios"]["latency_predicted"]).cost.ratio
        target = price(searched_kept)
        targets = dict.fromkeys(rules, target)
        rule_kept = {name: filled(name, target) for name in rules}
        models = {name: model_of(kept) for name, kept in rule_kept.items()}
        models["searched"] = task.pruned(searched_kept)[0]
        ratios = time_all(models)
        # every policy each rule was timed at, with its last median: a knob can jump between shapes
        # from one refill to the next, so the last one is not always the rule at its best
        tried = {name: {tuple(rule_kept[name]): statistics.median(ratios[name])} for name in rules}
        for _ in range(args.steps if args.match == "measured" else 0):
            searched = statistics.median(ratios["searched"])
            off = {name: searched / statistics.median(ratios[name]) for name in rules}
            moved = False
            for name in rules:
                if abs(off[name] - 1.0) > args.tolerance:
                    targets[name] *= off[name]
                    kept = filled(name, targets[name])
                    if not (kept == rule_kept[name]).all():
                        rule_kept[name], models[name], moved = kept, model_of(kept), True
            if not moved:
                break
            ratios = time_all(models)
            for name in rules:
                tried[name][tuple(rule_kept[name])] = statistics.median(ratios[name])
        if args.choose == "best-under":  # each rule at its best among the policies timed at or under the search's
            searched = statistics.median(ratios["searched"])
            for name in rules:
                under = [k for k, r in tried[name].items() if r <= searched * (1.0 + args.tolerance)]
                best = max(under, key=test_of, default=None)
                if best is not None and best != tuple(rule_kept[name]):
                    rule_kept[name], models[name] = np.asarray(best, dtype=np.int64), model_of(best)
                    ratios[name] = [tried[name][best]]  # as it was timed
        each = {name: {"test": test_of(kept), "predicted": price(kept),
                       "target_predicted": targets[name], "flops": task.cost_ratios(kept)["flops"],
                       "latency": statistics.median(ratios[name]),
                       "widths": dict(zip(task.table.names, (int(k) for k in kept)))}
                for name, kept in rule_kept.items()}
        # the rule compared is the one that scores best on test: the comparison the rule is most
        # favoured in
        best_rule = max(each, key=lambda name: each[name]["test"])
        rule_test = each[best_rule]["test"]
        out = {"searcher": row["searcher"], "seed": row["seed"], "target_predicted": target,
               "searched_predicted_in_search": row["ratios"]["latency_predicted"],
               "rule": best_rule, "rule_test": rule_test, "rule_predicted": each[best_rule]["predicted"],
               "rule_flops": each[best_rule]["flops"], "rule_latency": each[best_rule]["latency"],
               "searched_test": row["test_acc"], "searched_flops": row["ratios"]["flops"],
               "searched_latency": statistics.median(ratios["searched"]), "rounds": ratios, "rules": each,
               "rule_widths": each[best_rule]["widths"],
               "rule_policy": {n: task.table.achieved(u, int(k)) for u, (n, k) in
                               enumerate(zip(task.table.names, rule_kept[best_rule]))},
               "searched_proxy": row["proxy_acc"], "searched_row": row}
        rows.append(out)
        print(f"{row['searcher']} seed {row['seed']}: searched {out['searched_test']:.4f} at "
              f"{out['searched_latency']:.3f} (flops {out['searched_flops']:.3f}); {best_rule} "
              f"{rule_test:.4f} at {out['rule_latency']:.3f} (flops {out['rule_flops']:.3f}); "
              f"{100 * (out['searched_test'] - rule_test):+.2f} points", flush=True)
        if args.out:
            write_results(args.out, {"args": vars(args), "machine": machine(), "rows": rows})
    if args.pair_out and rows:
        write_pair(args.pair_out, found, rows)
    if rows:
        gain = [r["searched_test"] - r["rule_test"] for r in rows]
        print(f"mean over {len(rows)}: {100 * statistics.mean(gain):+.2f} points; latency searched "
              f"{statistics.mean(r['searched_latency'] for r in rows):.3f}, rule "
              f"{statistics.mean(r['rule_latency'] for r in rows):.3f}")


def write_pair(path: str, found: dict, rows: list[dict]) -> None:
    """The searched row with the best proxy score among ``rows`` and the rule twin it was compared
    with, as a ``search_quality``-shaped file of the search ``found`` (``finetune_recipe --quality``)."""
    best = max(rows, key=lambda r: r["searched_proxy"])
    twin = {"searcher": f"{best['rule']}+at-latency", "seed": 0, "trial": None, "proxy_acc": None,
            "test_acc": best["rule_test"], "policy": best["rule_policy"], "widths": best["rule_widths"]}
    write_results(path, {"args": found["args"], "machine": machine(), "rows": [best["searched_row"], twin]})
    print(f"{path}: {best['searched_row']['searcher']} seed {best['searched_row']['seed']} "
          f"({best['searched_test']:.4f}) and {twin['searcher']} ({best['rule_test']:.4f})", flush=True)


if __name__ == "__main__":
    main()
