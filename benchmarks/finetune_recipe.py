"""Fine-tuning with the export recipe: the best searched policy against the best one-shot rule.

    python -m benchmarks.finetune_recipe --quality benchmarks/results/quality-resnet56-portfolio.json \\
        --epochs 30 --work runs/ft --out benchmarks/results/finetune-resnet56-recipe.json

Takes a ``search_quality`` result file and fine-tunes, each with the same recipe and seed, the
best searched policy (the search row with the highest *proxy* score: the choice a user can make
without the test set) and the best one-shot rule (highest proxy among the rules). Each run is
what ``autoprune apply --finetune-epochs N`` does: prune, refit, recalibrate, then the recipe,
with a checkpoint every epoch and ``finetune.csv`` (held-out and test accuracy per epoch) in
``WORK/<label>/``. Killed, it resumes: run the same command again (a run that ended is read, not
run again). ``--distill``, ``--hint`` and friends
override the recipe for ablations (give each its own ``--label``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from autoprune.export.apply import apply_policy
from autoprune.finetune.loop import FinetuneConfig, has_checkpoint
from autoprune.units.policy import Policy
from benchmarks.common import finished_run, machine, make_task, pick, read_results, run_label, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", required=True)
    ap.add_argument("--which", default="best,rule", help="best, rule or both (default best,rule)")
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--work", required=True, help="folder of the runs (checkpoints, CSVs); kept between runs")
    ap.add_argument("--out", default=None, help="JSON file of the results (updated after each run)")
    ap.add_argument("--label", default="", help="suffix of each run's folder, for ablations")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--distill", type=float, default=None)
    ap.add_argument("--label-smoothing", type=float, default=None)
    ap.add_argument("--hint", type=float, default=None, help="weight of feature-map hints (default 0)")
    ap.add_argument("--seed", type=int, default=0,
                    help="the fine-tune's seed (data order, augmentation); runs of seed N>0 are labelled -fsN")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true",
                    help="train through torch.compile (a resumed run may switch: the math is the same)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = json.loads(Path(args.quality).read_text())
    overrides = {k: v for k, v in {"lr": args.lr, "distill": args.distill,
                                   "label_smoothing": args.label_smoothing, "hint": args.hint}.items()
                 if v is not None}
    recipe = FinetuneConfig.recipe(args.epochs, seed=args.seed, compile=args.compile, **overrides)
    # the task the searches scored on: a held-out search-val picks the best epoch on held-out
    # images too, and the test report is on the other test images
    task = make_task(q["args"]["model"], q["args"]["search_val_size"],
                     reconstruct=q["args"].get("reconstruct", "lsq"), device=args.device,
                     search_val=q["args"].get("search_val", "train"))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else None
    earlier = read_results(out)
    results = {**earlier, "runs": dict(earlier["runs"])} if earlier else {"machine": machine(), "runs": {}}
    print(f"# {q['args']['model']} {q['args']['budget']}, recipe {recipe}; {machine()}", flush=True)
    for which in args.which.split(","):
        row = pick(q["rows"], which)
        label = run_label(row, args.seed, args.label)
        run_dir = work / label
        policy = Policy(row["policy"], {"model": q["args"]["model"]}, row["widths"])
        start = time.perf_counter()
        metrics = finished_run(run_dir) or apply_policy(task, policy, run_dir, recipe, test=True,
                                                        resume=has_checkpoint(run_dir), quiet=False)
        csv = (run_dir / "finetune.csv").read_text()
        results["runs"][label] = {
            "which": which, "searcher": row["searcher"], "seed": row["seed"], "trial": row["trial"],
            "finetune_seed": args.seed, "search_val": q["args"].get("search_val", "train"),
            "recipe": metrics["finetune"], "flops_ratio": metrics["ratios"]["flops"],
            "test_before": metrics["pruned"]["test_acc"], "test_after": metrics["pruned"]["test_acc_finetuned"],
            "best_epoch": metrics["finetune_run"]["best_epoch"], "epochs_run": metrics["finetune_run"]["epochs"],
            "dense_test": metrics["dense"]["test_acc"], "csv": csv, "seconds_this_call": time.perf_counter() - start,
        }
        print(f"{label}: test {metrics['pruned']['test_acc']:.2%} -> {metrics['pruned']['test_acc_finetuned']:.2%} "
              f"(dense {metrics['dense']['test_acc']:.2%}), best epoch {metrics['finetune_run']['best_epoch']}",
              flush=True)
        if out:
            write_results(out, results, earlier=earlier)
            shutil.copy(run_dir / "finetune.csv", out.with_name(f"{out.stem}-{label}.csv"))


if __name__ == "__main__":
    main()
