"""Proxy fidelity, training images against held-out images: which search-val ranks policies as
the test set does?

    python -m benchmarks.proxy_heldout --model resnet56 --budget 0.3flops --storage sqlite:///bench-state/r56-03.db \\
        --studies resnet56-0.3flops-l1-lsq-ce-heldout-tpe-s0,resnet56-0.3flops-l1-lsq-ce-heldout-tpe-s1,... \\
        --top 15 --random 24 --out benchmarks/results/proxy-heldout-resnet56-0.3flops.json

The policies: the ``--top`` best distinct complete trials within budget of each study (by their
recorded proxy), and ``--random`` policies drawn at ``--budget`` (uniform, skewed early, skewed
late and random requests through the action wall, as ``proxy_fidelity`` draws them). Each is
pruned, refit and recalibrated once, by the held-out task (search-val: 1,000 of the 10,000 test
images, seed 0), and scored four ways: top-1 (``acc``) and exp(-cross-entropy) (``ce``) on the
1,000 training images that are the default search-val, and on the 1,000 held-out images; then
top-1 on the other 9,000 test images, which neither proxy saw. It prints each proxy's Spearman
rho with that test accuracy over all the policies and within each study's top. Rows are written
as they finish; run it again with the same ``--out`` and scored policies are skipped.
"""

from __future__ import annotations

import argparse

import numpy as np
import optuna
import torch

from autoprune.envs import LayerSparsityEnv
from autoprune.evaluate.metrics import running_score
from benchmarks.common import machine, make_task, read_results, write_results
from benchmarks.proxy_top import spearman

PROXIES = ("train_acc", "train_ce", "heldout_acc", "heldout_ce")
BATCH = 500


def score(model, split, proxy: str, device) -> float:
    *_, last = running_score(model, split.batches(BATCH), proxy, device)
    return float(last)


def random_requests(n_units: int, count: int) -> list[np.ndarray]:
    """Requests of every shape (as ``proxy_fidelity`` draws them), seed 0."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            out.append(np.full(n_units, rng.uniform(0.2, 0.8)))
        elif kind == 1:
            out.append(np.linspace(rng.uniform(0.4, 0.8), rng.uniform(0.0, 0.3), n_units))
        elif kind == 2:
            out.append(np.linspace(rng.uniform(0.0, 0.3), rng.uniform(0.4, 0.8), n_units))
        else:
            out.append(rng.uniform(0.0, 0.8, n_units))
    return out


def policies(args, env) -> list[tuple[str, int, tuple[int, ...]]]:
    """(source, trial or draw, widths) of every policy to score."""
    out, seen = [], set()
    for name in [s for s in args.studies.split(",") if s]:
        study = optuna.load_study(study_name=name, storage=args.storage)
        trials = [t for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs.get("within_budget")]
        trials.sort(key=lambda t: -t.user_attrs["accuracy"])
        mine: set[tuple] = set()
        for t in trials:
            widths = tuple(int(w) for w in t.user_attrs["widths"])
            if widths in mine:
                continue
            mine.add(widths)
            if len(mine) > args.top:
                break
            out.append((name, t.number, widths))
            seen.add(widths)
    for i, request in enumerate(random_requests(env.n_units, args.random)):
        widths = tuple(int(w) for w in env.feasible_policy(request))
        if widths not in seen:
            seen.add(widths)
            out.append(("random", i, widths))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--budget", default="0.3flops")
    ap.add_argument("--storage", required=True)
    ap.add_argument("--studies", default="", help="comma-separated study names whose top policies are scored")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--random", type=int, default=24, help="policies drawn at --budget through the action wall")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    heldout = make_task(args.model, search_val="heldout")
    train_val = make_task(args.model).splits.search_val  # the default search-val: training images
    splits = {"train": train_val, "heldout": heldout.splits.search_val}
    env = LayerSparsityEnv(heldout, budget=args.budget)
    earlier = read_results(args.out)
    saved = dict(earlier) if earlier else {"args": vars(args), "machine": machine(), "rows": []}
    done = {(r["source"], r["index"]) for r in saved["rows"]}
    todo = policies(args, env)
    print(f"# {args.model} {args.budget}: {len(todo)} policies, test on {len(heldout.splits.test)} images; "
          f"{machine()}", flush=True)
    for source, index, widths in todo:
        if (source, index) in done:
            continue
        model, _ = heldout.pruned(list(widths))
        row = {"source": source, "index": index, "flops": heldout.cost_ratios(np.asarray(widths))["flops"]}
        for proxy in PROXIES:
            where, kind = proxy.split("_")
            row[proxy] = score(model, splits[where], kind, heldout.device)
        row["test_acc"] = heldout.test_accuracy(model)
        saved["rows"].append(row)
        write_results(args.out, saved, earlier=earlier)
        print(f"{source} {index}: " + " ".join(f"{p} {row[p]:.4f}" for p in PROXIES)
              + f" test {row['test_acc']:.4f}", flush=True)
    rows = saved["rows"]
    sources = dict.fromkeys(r["source"] for r in rows)
    groups = {"all": rows, **{s: [r for r in rows if r["source"] == s] for s in sources}}
    result = {name: {"policies": len(sub), **{p: spearman([r[p] for r in sub], [r["test_acc"] for r in sub])
                                               for p in PROXIES}}
              for name, sub in groups.items() if len(sub) > 2}
    saved["spearman"] = result
    write_results(args.out, saved, earlier=earlier)
    print("Spearman rho with test accuracy (the 9,000 test images neither proxy saw):")
    print("| policies | n | " + " | ".join(PROXIES) + " |\n|---|---|" + "---|" * len(PROXIES))
    for name, r in result.items():
        print(f"| {name} | {r['policies']} | " + " | ".join(f"{r[p]:+.3f}" for p in PROXIES) + " |")


if __name__ == "__main__":
    main()
