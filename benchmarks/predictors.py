"""What predicts a policy's accuracy after fine-tuning? The predictor study of issue 24.

    R=benchmarks/results/search-resnet56-0.3flops-ce
    python -m benchmarks.predictors --quality $R-heldout.json,$R-train.json \\
        --work bench-state/ft --epochs 30 --short 1,3 --threads 1 --shard 0/2 \\
        --out benchmarks/results/predictors-resnet56-0.3flops.json

The policies: every row of the ``search_quality`` files (the one-shot rules and each seed's best
searched policy), one of each distinct policy. Every one is scored, on the held-out task (search-val:
1,000 of the test images, the test report on the other 9,000), by each candidate predictor of its
accuracy after ``--epochs`` of the export recipe:

* ``train_acc``, ``train_ce``, ``heldout_acc``, ``heldout_ce``: the refit proxy before fine-tuning,
  top-1 and exp(-cross-entropy), on the 1,000 training images of the default search-val and on
  the 1,000 held-out images (as ``proxy_heldout`` scores them);
* ``params``: the fraction of the dense model's parameters kept (at one FLOPs budget, the
  capacity left for the fine-tune to use);
* ``heldout_eN``, ``train_eN`` for each N of ``--short``: top-1 on those images after a separate
  N-epoch run of the recipe (its schedule compressed to N epochs, its best epoch kept on held-out
  images), which is what ``export --top-k K --select-epochs N`` runs on each candidate;

and then fine-tuned ``--epochs`` in full, as ``benchmarks.finetune_recipe`` does it, into the same
``WORK/<label>`` folders (a run that tool already made is read, not run again). The target is the
test accuracy after the last epoch (``test_final``; the kept epoch's is ``test_kept``).

Stages run in order (all proxies, then every short run, then every long one) so predictors come
first; each result is written to ``--out`` at once, runs checkpoint every epoch, and the same
command resumes. ``--shard i/n`` takes every n-th policy (of ``--labels``, where given) from the
i-th, so n processes (one thread each) share the work and one file: start them with the same
``--out``; each rereads it before it writes; a long run already in ``--out`` is not run again.
When every policy has its long run, the Spearman table over all policies is printed and stored
(``--report`` prints it from the file alone).
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from autoprune.export.apply import apply_policy, run_finetune
from autoprune.finetune.loop import LOG, FinetuneConfig, has_checkpoint
from autoprune.units.policy import Policy
from benchmarks.common import finished_run, machine, make_task, read_results, run_label, write_results
from benchmarks.proxy_heldout import score
from benchmarks.proxy_top import spearman

BEFORE = ("train_acc", "train_ce", "heldout_acc", "heldout_ce")
# at one FLOPs budget, how much of the model a policy keeps: capacity left for the fine-tune to use
CAPACITY = ("params",)


def policies(paths: list[str]) -> tuple[dict, list[dict]]:
    """The first file's ``args`` and one row per distinct policy over all files, in file order."""
    first, rows, seen = None, [], set()
    for path in paths:
        q = json.loads(Path(path).read_text())
        first = first or q["args"]
        if (q["args"]["model"], q["args"]["budget"]) != (first["model"], first["budget"]):
            raise SystemExit(f"{path}: another model or budget than {paths[0]}")
        for row in q["rows"]:
            widths = tuple(sorted(row["widths"].items()))
            if widths not in seen:
                seen.add(widths)
                rows.append({**row, "label": run_label(row), "source": Path(path).name,
                             "as_policy": Policy(row["policy"], {"model": first["model"]}, row["widths"])})
    return first, rows


@contextmanager
def locked(path: Path):
    """The results file, reread under an exclusive lock on its folder: shards write it in turn."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        earlier = read_results(path)
        saved = {**earlier, "policies": dict(earlier["policies"])} if earlier else {"policies": {}}
        yield saved
        write_results(path, saved, earlier=earlier)
    finally:
        os.close(fd)  # closing releases the lock


def record(out: Path, name: str, **values) -> None:
    with locked(out) as saved:
        saved["policies"].setdefault(name, {}).update(values)


def finished_long(run_dir: Path) -> dict | None:
    """A finished long run's figures, from its folder (``metrics.json`` and ``finetune.csv``)."""
    m = finished_run(run_dir)
    if m is None:
        return None
    with open(run_dir / LOG, newline="") as f:
        last = list(csv.DictReader(f))[-1]
    return {"test_kept": m["pruned"]["test_acc_finetuned"], "kept_epoch": m["finetune_run"]["best_epoch"],
            "test_final": float(last["test_acc"]), "epochs": int(last["epoch"])}


def report(saved: dict) -> dict:
    rows = [r for r in saved["policies"].values() if "test_final" in r]
    short = sorted({k for r in rows for k in r if k.startswith(("heldout_e", "train_e"))})
    # test_before: the test set's own verdict before fine-tuning, no user's predictor but the bound
    # of what any proxy before fine-tuning can say
    names = [k for k in (*BEFORE, "test_before", *CAPACITY, *short) if all(k in r for r in rows)]
    out = {"policies": len(rows)}
    if len(rows) < 3:
        return out
    target = [r["test_final"] for r in rows]
    best = max(range(len(rows)), key=lambda i: target[i])
    for k in names:
        vals = [r[k] for r in rows]
        out[k] = {"spearman": spearman(vals, target),
                  "picks": rows[int(np.argmax(vals))]["label"],
                  "regret": target[best] - target[int(np.argmax(vals))]}
    return out


def table(saved: dict) -> str:
    """Markdown: one row per policy with every predictor and the targets, then each predictor's
    Spearman rho with the test accuracy after the last epoch, its pick and that pick's regret."""
    summary = report(saved)
    names = [k for k in summary if k != "policies"]
    rows = sorted(saved["policies"].values(), key=lambda r: -r.get("test_final", -1))
    out = ["| policy | " + " | ".join(names) + " | test, last epoch |",
           "|---|" + "---|" * (len(names) + 1)]
    for r in rows:
        cells = [f"{r[k]:.3f}" if k in r else "" for k in names]
        out.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r.get('test_final', float('nan')):.2%} |")
    if names:
        out.append("| Spearman rho | " + " | ".join(f"**{summary[k]['spearman']:+.2f}**" for k in names) + " | |")
        out.append("| regret of its pick (points) | "
                   + " | ".join(f"{100 * summary[k]['regret']:.2f}" for k in names) + " | |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", required=True, help="comma-separated search_quality result files")
    ap.add_argument("--work", required=True, help="folder of the runs, shared with finetune_recipe")
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--short", default="1,3", help="epochs of the short runs scored as predictors")
    ap.add_argument("--shard", default="0/1", help="i/n: this process takes every n-th policy from the i-th")
    ap.add_argument("--labels", help="comma-separated run labels: only these policies (before --shard splits them)")
    ap.add_argument("--stages", default="proxies,short,long")
    ap.add_argument("--compile", action="store_true", help="train the long runs through torch.compile")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--report", action="store_true", help="print the table from --out and stop")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report:
        print(table(json.loads(out.read_text())))
        return
    torch.set_num_threads(args.threads)
    first, rows = policies(args.quality.split(","))
    if args.labels:
        wanted = args.labels.split(",")
        unknown = sorted(set(wanted) - {row["label"] for row in rows})
        if unknown:
            raise SystemExit(f"--labels: no policy labelled {', '.join(unknown)} in --quality")
        rows = [row for row in rows if row["label"] in wanted]
    i, n = (int(x) for x in args.shard.split("/"))
    mine = rows[i::n]
    task = make_task(first["model"], first["search_val_size"], reconstruct=first.get("reconstruct", "lsq"),
                     device=args.device, search_val="heldout")
    train_val = make_task(first["model"], first["search_val_size"]).splits.search_val
    splits = {"train": train_val, "heldout": task.splits.search_val}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    with locked(out) as saved:
        saved.update(args={k: v for k, v in vars(args).items() if k not in ("shard", "stages", "threads")},
                     machine=machine(), model=first["model"], budget=first["budget"],
                     test_images=len(task.splits.test))
        done = {k: dict(v) for k, v in saved["policies"].items()}
    print(f"# {first['model']} {first['budget']}: {len(rows)} policies, this shard {len(mine)}; {machine()}",
          flush=True)
    stages = args.stages.split(",")

    if "proxies" in stages:
        for row in mine:
            if "heldout_ce" in done.get(row["label"], {}):
                continue
            model, _ = task.pruned(task.kept(row["as_policy"]))
            values = {p: score(model, splits[p.split("_")[0]], p.split("_")[1], task.device) for p in BEFORE}
            values.update(test_before=task.test_accuracy(model), source=row["source"], label=row["label"],
                          searcher=row["searcher"], seed=row["seed"], flops=row["ratios"]["flops"],
                          params=row["ratios"]["params"])
            record(out, row["label"], **values)
            print(f"{row['label']}: " + " ".join(f"{p} {values[p]:.4f}" for p in BEFORE)
                  + f" test {values['test_before']:.4f}", flush=True)

    if "short" in stages:
        for epochs in (float(e) for e in args.short.split(",")):
            key = f"e{epochs:g}"
            for row in mine:
                if f"heldout_{key}" in done.get(row["label"], {}):
                    continue
                kept = task.kept(row["as_policy"])
                model, _ = task.pruned(kept)
                run_dir = work / f"short-{key}-{row['label']}"
                if run_dir.exists() and not has_checkpoint(run_dir):  # ended, but its figures were not kept
                    shutil.rmtree(run_dir)
                ran = run_finetune(task, model, FinetuneConfig.recipe(epochs), run_dir=run_dir,
                                   resume=has_checkpoint(run_dir), desc=f"{row['label']} {key}",
                                   kept=kept)
                values = {f"heldout_{key}": ran.val_acc, f"train_{key}": score(model, train_val, "acc", task.device),
                          f"test_{key}": task.test_accuracy(model)}
                record(out, row["label"], **values)
                print(f"{row['label']} after {epochs:g} epoch(s): held-out {values[f'heldout_{key}']:.4f} "
                      f"training images {values[f'train_{key}']:.4f} test {values[f'test_{key}']:.4f}", flush=True)

    if "long" in stages:
        recipe = FinetuneConfig.recipe(args.epochs, compile=args.compile)
        for row in mine:
            if "test_kept" in done.get(row["label"], {}):  # recorded, perhaps from a run folder since removed
                continue
            run_dir = work / row["label"]
            figures = finished_long(run_dir)
            if figures is None:
                apply_policy(task, row["as_policy"], run_dir, recipe, test=True, resume=has_checkpoint(run_dir),
                             quiet=False)
                figures = finished_long(run_dir)
            record(out, row["label"], **figures)
            print(f"{row['label']}: after {figures['epochs']} epochs test {figures['test_final']:.4f} "
                  f"(kept epoch {figures['kept_epoch']}: {figures['test_kept']:.4f})", flush=True)

    with locked(out) as saved:
        saved["spearman"] = report(saved)
    print(table(saved))


if __name__ == "__main__":
    main()
