"""Does the search's proxy rank the *top* policies as the test set does, and would a proxy that
does not saturate rank them better?

    python -m benchmarks.proxy_top --storage sqlite:////path/r56-search.db --studies tpe-s0,tpe-s1,tpe-s2 \\
        --top 15 --out benchmarks/results/proxy-top-resnet56.json

The dense checkpoint scores 100 % on search-val (training images it has fit), so the best policies
of a search differ there by a few of 1,000 images. For the ``--top`` best complete trials of each
ResNet-56 0.5flops study (re-pruned, refit and recalibrated as their episodes were), it scores on
search-val: top-1 accuracy (the search's proxy), the mean KL divergence from the dense model's
softmax (negated: higher is better), the mean cross-entropy (negated), and top-1 on a flipped and
shifted copy of search-val; then top-1 on the 10,000 test images. It reports each proxy's Spearman
rho with test accuracy over all the policies and within each study. Rows are written as they
finish; run it again with the same ``--out`` and finished policies are skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import optuna
import torch
import torch.nn.functional as F

from benchmarks.common import machine, make_task

PROXIES = ("accuracy", "neg_kl", "neg_ce", "accuracy_shifted")


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)  # ties (equal accuracies) get their mean rank


@torch.no_grad()
def scores(model, x, y, dense_logits, batch: int = 500) -> dict:
    model.eval()
    logits = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    shifted = torch.roll(torch.flip(x, dims=[3]), shifts=(2, 2), dims=(2, 3))
    logits_s = torch.cat([model(shifted[i:i + batch]) for i in range(0, len(x), batch)])
    kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(dense_logits, 1), log_target=True, reduction="batchmean")
    return {"accuracy": float((logits.argmax(1) == y).float().mean()), "neg_kl": -float(kl),
            "neg_ce": -float(F.cross_entropy(logits, y)),
            "accuracy_shifted": float((logits_s.argmax(1) == y).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", required=True)
    ap.add_argument("--prefix", default="resnet56-0.5flops-l1-lsq-")
    ap.add_argument("--studies", default="tpe-s0,tpe-s1,tpe-s2")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    task = make_task("resnet56")
    val = task.splits.search_val  # the search-val the episodes were scored on
    x, y = val.x.to(task.device), val.y.to(task.device)
    with torch.no_grad():
        dense_logits = torch.cat([task.dense.eval()(x[i:i + 500]) for i in range(0, len(x), 500)])
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.exists() else {"machine": machine(), "rows": []}
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
                   **scores(model, x, y, dense_logits), "test_acc": task.test_accuracy(model)}
            saved["rows"].append(row)
            out.write_text(json.dumps(saved, indent=1) + "\n")
            print(f"{name} trial {t.number}: proxy {row['accuracy']:.3f} kl {-row['neg_kl']:.4f} "
                  f"shifted {row['accuracy_shifted']:.3f} test {row['test_acc']:.4f}", flush=True)
    rows = saved["rows"]
    test = [r["test_acc"] for r in rows]
    result = {"all": {p: spearman([r[p] for r in rows], test) for p in PROXIES}}
    for name in args.studies.split(","):
        sub = [r for r in rows if r["study"] == name]
        result[name] = {p: spearman([r[p] for r in sub], [r["test_acc"] for r in sub]) for p in PROXIES}
    saved["spearman"] = result
    out.write_text(json.dumps(saved, indent=1) + "\n")
    print("Spearman rho with test accuracy:")
    for k, v in result.items():
        print(f"  {k}: " + ", ".join(f"{p} {r:+.3f}" for p, r in v.items()))


if __name__ == "__main__":
    main()
