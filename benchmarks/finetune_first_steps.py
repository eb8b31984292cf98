"""The first steps of fine-tuning a refit pruned model: does the loss fall or climb?

    python -m benchmarks.finetune_first_steps --quality benchmarks/results/quality-resnet56-portfolio.json \\
        --steps 25 --out benchmarks/results/finetune-first-steps.json

Takes the best searched policy of a ``search_quality`` file (highest proxy score), prunes, refits
and recalibrates it as its episode did, then trains copies of it on the same first training
batches (same order, same augmentation) with several recipes, and prints the training loss of
every step and the search-val accuracy after the last (the damage the first steps do, in one
number comparable across losses). The full-epoch recipe is too slow on a CPU to tune by trial; the first steps show
whether a learning rate and loss are stable from the refit weights.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from autoprune.finetune.loop import FinetuneConfig, _loss, _schedule
from autoprune.units.policy import Policy
from benchmarks.common import machine, make_task, pick, write_results

VARIANTS = {
    "ce, lr 0.01, no warm-up": (FinetuneConfig(lr=0.01), None),
    "kd 0.9 T4, lr 0.01, no warm-up": (FinetuneConfig(lr=0.01, distill=0.9), None),
    "kd 0.9 T4, lr 0.002, no warm-up": (FinetuneConfig(lr=0.002, distill=0.9), None),
    # a linear ramp that reaches 0.01 at the last measured step (schedule over twice the steps)
    "kd 0.9 T4, lr ramped to 0.01": (FinetuneConfig(lr=0.01, distill=0.9, warmup=0.5), 2),
    "kd 0.9 T4, lr 0.005, no warm-up": (FinetuneConfig(lr=0.005, distill=0.9), None),
    "kd 0.9 T4, lr ramped to 0.005": (FinetuneConfig(lr=0.005, distill=0.9, warmup=0.5), 2),
    "kd 0.5 T4, lr 0.01, no warm-up": (FinetuneConfig(lr=0.01, distill=0.5), None),
    "kd 0.9 T2, lr 0.01, no warm-up": (FinetuneConfig(lr=0.01, distill=0.9, temperature=2), None),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", required=True)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = json.loads(Path(args.quality).read_text())
    row = pick(q["rows"], "best")
    task = make_task(q["args"]["model"], q["args"]["search_val_size"], reconstruct=q["args"].get("reconstruct", "lsq"))
    start, _ = task.pruned(task.kept(Policy(row["policy"], {}, row["widths"])))
    loader = task.splits.train_loader(128, seed=0, workers=0)
    torch.manual_seed(0)
    batches = []
    for x, y in loader:
        batches.append((x, y))
        if len(batches) == args.steps:
            break
    with torch.no_grad():
        teacher = [task.dense.eval()(x) for x, _ in batches]
    results = {"machine": machine(), "policy": f"{row['searcher']} seed {row['seed']} trial {row['trial']}",
               "val_start": task.proxy_accuracy(start), "losses": {}, "val_after": {}}
    for name, (cfg, stretch) in VARIANTS.items():
        model = copy.deepcopy(start).train()
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        total = args.steps * (stretch or 1000)  # no stretch: the lr stays at its peak throughout
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, cfg.warmup))
        losses = []
        for (x, y), t in zip(batches, teacher):
            loss = _loss(model(x), y, t if cfg.distill else None, cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(round(loss.item(), 3))
        results["losses"][name] = losses
        results["val_after"][name] = task.proxy_accuracy(model)
        print(f"{name}: loss first {losses[0]:.2f}, last {losses[-1]:.2f}, max {max(losses):.2f}; search-val "
              f"{results['val_start']:.2%} -> {results['val_after'][name]:.2%}", flush=True)
        if args.out:
            write_results(args.out, results)


if __name__ == "__main__":
    main()
