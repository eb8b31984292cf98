"""Fine-tuning a pruned model: SGD with a cosine schedule, optional distillation from the dense model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from autoprune.data import Splits
from autoprune.errors import AutopruneError


@dataclass(frozen=True)
class FinetuneConfig:
    """One recipe for every model fine-tuned by autoprune.

    Attributes:
        epochs: passes over the training split (ignored when ``steps`` is set).
        steps: exact number of optimiser steps instead of epochs (used per episode).
        lr: peak learning rate; decays to 0 on a cosine.
        momentum: SGD momentum (Nesterov).
        weight_decay: L2 weight decay.
        batch_size: images per step.
        distill: weight of the KL term towards the dense teacher (0 = plain cross-entropy).
        temperature: distillation temperature.
        seed: seeds the order of training batches.
    """

    epochs: float = 1.0
    steps: int | None = None
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    distill: float = 0.0
    temperature: float = 4.0
    seed: int = 0


def _loss(logits, y, teacher_logits, cfg: FinetuneConfig):
    loss = F.cross_entropy(logits, y)
    if teacher_logits is not None and cfg.distill > 0:
        t = cfg.temperature
        kd = F.kl_div(F.log_softmax(logits / t, 1), F.softmax(teacher_logits / t, 1),
                      reduction="batchmean") * t * t
        loss = (1 - cfg.distill) * loss + cfg.distill * kd
    return loss


def finetune(model: nn.Module, splits: Splits, cfg: FinetuneConfig = FinetuneConfig(),
             teacher: nn.Module | None = None, device: str = "cpu",
             progress: bool = True, desc: str = "fine-tune") -> nn.Module:
    """Train ``model`` in place on ``splits.train`` and return it in eval mode.

    A non-finite loss stops training with a user error rather than writing a broken model.
    """
    if cfg.batch_size < 1 or (cfg.steps is not None and cfg.steps < 1) or cfg.lr <= 0:
        raise AutopruneError("fine-tuning needs a batch size and steps of at least 1 and a positive lr")
    model.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
    )
    loader = splits.train_loader(min(cfg.batch_size, len(splits.train)), seed=cfg.seed)
    if len(loader) == 0:
        raise AutopruneError("the training split is smaller than one batch; lower --finetune-batch-size")
    total = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * len(loader)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / total)))
    bar = tqdm(total=total, desc=desc, disable=not progress, unit="step", leave=False)
    step, epoch = 0, 0
    try:
        while step < total:
            loader.generator.manual_seed(cfg.seed + epoch)
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with torch.no_grad():
                    t_logits = teacher(x) if (teacher is not None and cfg.distill > 0) else None
                loss = _loss(model(x), y, t_logits, cfg)
                if not torch.isfinite(loss):
                    raise AutopruneError(
                        f"fine-tuning loss became {loss.item()} at step {step}; lower the "
                        "learning rate (--finetune-lr)"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                if step >= total:
                    break
            epoch += 1
    finally:
        bar.close()
    return model.eval()
