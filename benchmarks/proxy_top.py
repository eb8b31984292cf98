"""Does the search's proxy rank the *top* policies as the test set does, and would a proxy that
does not saturate rank them better?

    python -m benchmarks.proxy_top --storage sqlite:///bench-state/r56-search.db --studies tpe-s0,tpe-s1,tpe-s2 \\
        --top 15 --out benchmarks/results/proxy-top-resnet56.json

The dense checkpoint scores 100 % on search-val (training images it has fit), so the best policies
of a search differ there by a few of 1,000 images. For the ``--top`` best complete trials of each
ResNet-56 0.5flops study (re-pruned, refit and recalibrated as their episodes were), it scores on
search-val: top-1 accuracy (the search's proxy), the mean KL divergence from the dense model's
softmax (negated: higher is better) and the mean cross-entropy (negated), each as the library's
proxies (``acc``, ``kl`` and ``ce`` of :data:`autoprune.evaluate.metrics.PROXIES`) compute it,
and top-1 on a flipped and shifted copy of search-val; then top-1 on the 10,000 test images. It
reports each proxy's Spearman rho with test accuracy over all the policies and within each study.
Rows are written as they finish; run it again with the same ``--out`` and finished policies are
skipped.

``--more N`` also scores each policy by top-1 and cross-entropy on N further training images (a
seeded draw outside search-val), to see whether more images, not other ones, would order a
search's best policies as test does; ``--model``, ``--granularity`` and ``--search-val`` rebuild
the task of other studies (an N:M search with a held-out search-val, say):

    python -m benchmarks.proxy_top --model resnet56 --granularity nm --search-val heldout \
        --storage sqlite:///bench-state/patterns.db --prefix resnet56-nm-1of4-ce-tpe-ks-heldout- \
        --studies s0,s1,s2 --top 4 --more 10000 --threads 1 \
        --out benchmarks/results/proxy-top-resnet56-nm-1of4-heldout.json
"""

from __future__ import annotations

import argparse
import math

import optuna
import torch

from autoprune.data.datasets import TensorSplit
from autoprune.evaluate.metrics import log_probs, running_score
from benchmarks.common import machine, make_task, read_results, write_results

PROXIES = ("accuracy", "neg_kl", "neg_ce", "accuracy_shifted")
MORE = ("accuracy_more", "neg_ce_more")
BATCH = 500


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)  # ties (equal accuracies) get their mean rank


def scores(model, val: TensorSplit, shifted: TensorSplit, dense_logp: torch.Tensor, device) -> dict:
    """``model``'s score by each of :data:`PROXIES`. The library's ``kl`` and ``ce`` proxies are
    exp(-mean); their logarithm is the negated mean this file has always recorded (same ranks)."""
    def score(split: TensorSplit, proxy: str) -> float:
        *_, last = running_score(model, split.batches(BATCH), proxy, device,
                                 dense_logp if proxy == "kl" else None)
        return last

    return {"accuracy": score(val, "acc"), "neg_kl": math.log(score(val, "kl")),
            "neg_ce": math.log(score(val, "ce")), "accuracy_shifted": score(shifted, "acc")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", required=True)
    ap.add_argument("--prefix", default="resnet56-0.5flops-l1-lsq-")
    ap.add_argument("--studies", default="tpe-s0,tpe-s1,tpe-s2")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--granularity", default="channel")
    ap.add_argument("--search-val", default="train", help="where the studies' search-val came from")
    ap.add_argument("--more", type=int, default=0, help="also score on this many further training images")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    task = make_task(args.model, granularity=args.granularity, search_val=args.search_val)
    more = None
    if args.more:
        train = task.splits.tensors[0].plain()  # the fine-tune's training rows: never search-val
        rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.more]
        more = list(train.subset(rows.numpy()).loader(BATCH, shuffle=False, drop_last=False, device=task.device))
    val = task.splits.search_val  # the search-val the episodes were scored on
    shifted = TensorSplit(torch.roll(torch.flip(val.x, dims=[3]), shifts=(2, 2), dims=(2, 3)), val.y)
    dense_logp = log_probs(task.dense, val.batches(BATCH), task.device)
    earlier = read_results(args.out)
    saved = dict(earlier) if earlier else {"machine": machine(), "rows": []}
    done = {(r["study"], r["trial"]) for r in saved["rows"]}
    for name in args.studies.split(","):
        study = optuna.load_study(study_name=args.prefix + name, storage=args.storage)
        trials = [t for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs.get("within_budget")]
        trials.sort(key=lambda t: -t.user_attrs["accuracy"])
        seen: set[tuple] = set()
        for t in trials:
            widths = tuple(t.user_attrs["widths"])
            if widths in seen:
                continue
            seen.add(widths)
            if len(seen) > args.top:
                break
            if (name, t.number) in done:
                continue
            model, _ = task.pruned(list(widths))
            row = {"study": name, "trial": t.number, "recorded_proxy": t.user_attrs["accuracy"],
                   **scores(model, val, shifted, dense_logp, task.device), "test_acc": task.test_accuracy(model)}
            if more is not None:
                *_, acc = running_score(model, more, "acc", task.device)
                *_, ce = running_score(model, more, "ce", task.device)
                row.update(accuracy_more=acc, neg_ce_more=math.log(ce))
            saved["rows"].append(row)
            write_results(args.out, saved, earlier=earlier)
            print(f"{name} trial {t.number}: proxy {row['accuracy']:.3f} kl {-row['neg_kl']:.4f} "
                  f"shifted {row['accuracy_shifted']:.3f} test {row['test_acc']:.4f}", flush=True)
    rows = saved["rows"]
    test = [r["test_acc"] for r in rows]
    proxies = [p for p in (*PROXIES, *MORE) if all(p in r for r in rows)]
    result = {"all": {p: spearman([r[p] for r in rows], test) for p in proxies}}
    for name in args.studies.split(","):
        sub = [r for r in rows if r["study"] == name]
        result[name] = {p: spearman([r[p] for r in sub], [r["test_acc"] for r in sub]) for p in proxies}
        # what each proxy would keep of this study's best, and its test accuracy
        result[name]["picks"] = {p: max(sub, key=lambda r: r[p])["test_acc"] for p in proxies}
    saved["spearman"] = result
    write_results(args.out, saved, earlier=earlier)
    print("Spearman rho with test accuracy:")
    for k, v in result.items():
        print(f"  {k}: " + ", ".join(f"{p} {r:+.3f}" for p, r in v.items() if p != "picks"))
        if "picks" in v:
            print("    test of each proxy's pick: " + ", ".join(f"{p} {r:.4f}" for p, r in v["picks"].items()))


if __name__ == "__main__":
    main()
