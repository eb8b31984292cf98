"""Evaluation: BatchNorm recalibration (adaptive BN) and top-1 accuracy.

Pruning changes every downstream activation's statistics, so BatchNorm running means and
variances stored in the dense model are wrong for the pruned one. EagleEye (Li et al., 2020)
showed that re-estimating them on a few training batches makes the accuracy of a pruned,
un-fine-tuned network a far better predictor of its accuracy after fine-tuning. The proxy
accuracy of the search is measured after this recalibration.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from autoprune.data import TensorSplit
from autoprune.errors import AutopruneError


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, calib: TensorSplit | torch.Tensor, batch_size: int = 64,
                   device: str | torch.device = "cpu") -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``calib``'s inputs (in place).

    Statistics are reset and then averaged over all calibration batches with equal weight
    (momentum ``None``); other layers stay in eval mode, so dropout is off.
    """
    bns = _bn_layers(model)
    if not bns:
        return model
    model.eval()
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        inputs = calib.x if isinstance(calib, TensorSplit) else calib
        for i in range(0, len(inputs), batch_size):
            model(inputs[i : i + batch_size].to(device, non_blocking=True))
    finally:
        for bn, momentum in zip(bns, saved):
            bn.momentum = momentum
        model.eval()
    return model


def _check_finite(logits: torch.Tensor) -> None:
    if not torch.isfinite(logits).all():
        raise AutopruneError(
            "the model produced NaN/inf outputs during evaluation; check the weights and the "
            "input normalisation (or lower the fine-tuning learning rate)"
        )


@torch.no_grad()
def accuracy(model: nn.Module, split: TensorSplit, batch_size: int = 500,
             device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` on an in-memory split."""
    return accuracy_on(model, split.batches(batch_size), device)


def running_accuracy(model: nn.Module, batches: Iterable, device: str | torch.device = "cpu"):
    """Top-1 accuracy over ``(x, y)`` batches, yielded after each batch (the accuracy so far)."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x.to(device, non_blocking=True))
            _check_finite(logits)
            correct += int((logits.argmax(1).cpu() == y).sum())
            total += len(y)
            yield correct / total
    if total == 0:
        raise AutopruneError("evaluation split is empty")


def accuracy_on(model: nn.Module, batches: Iterable, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy over ``(x, y)`` batches (a DataLoader or a split's batches)."""
    *_, acc = running_accuracy(model, batches, device)  # the last value: over every batch
    assert math.isfinite(acc)
    return acc
