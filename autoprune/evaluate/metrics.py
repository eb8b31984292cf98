"""Evaluation: BatchNorm recalibration (adaptive BN), top-1 accuracy and the search's proxies.

Pruning changes every downstream activation's statistics, so BatchNorm running means and
variances stored in the dense model are wrong for the pruned one. EagleEye (Li et al., 2020)
showed that re-estimating them on a few training batches makes the accuracy of a pruned,
un-fine-tuned network a far better predictor of its accuracy after fine-tuning. The proxy
accuracy of the search is measured after this recalibration.

Top-1 on a search-val of a thousand images moves in steps of 0.1 % and saturates when the
checkpoint has fit those images, so near the top of a search it ranks policies poorly; the
cross-entropy (``ce``) and the divergence from the dense outputs (``kl``) keep ranking there
(``benchmarks/proxy_top.py``). :data:`PROXIES` names them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from autoprune.common.registry import Registry
from autoprune.data.datasets import TensorSplit
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


@dataclass(frozen=True)
class Proxy:
    """How search-val scores a pruned model (``--proxy``): a value per image, averaged over the
    split, then mapped into [0, 1] with higher better (the slot rewards read as accuracy).

    ``per_image(logits, labels, dense_logp)`` gets the dense model's log-probabilities of the
    same images when ``needs_dense`` (else ``None``).
    """

    per_image: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    to_score: Callable[[float], float] = float
    needs_dense: bool = False


PROXIES: Registry[Proxy] = Registry("proxy")
PROXIES.register("acc", help="top-1 accuracy on search-val")(
    Proxy(lambda logits, y, _: (logits.argmax(1) == y).double()))
PROXIES.register("ce", help="exp(-cross-entropy) on search-val: the geometric mean of the "
                            "probability the model gives the true class (finer than top-1)")(
    Proxy(lambda logits, y, _: F.cross_entropy(logits.double(), y, reduction="none"),
          lambda mean: math.exp(-mean)))
PROXIES.register("kl", help="exp(-KL(dense || pruned)) on search-val: agreement with the dense "
                            "model's output distribution (labels unused)")(
    Proxy(lambda logits, y, dense: F.kl_div(F.log_softmax(logits.double(), 1), dense.double(),
                                            reduction="none", log_target=True).sum(1),
          lambda mean: math.exp(-mean), needs_dense=True))


def proxy_label(name: str) -> str:
    """How reports name a proxy's score: ``proxy accuracy`` for top-1, ``proxy ce score`` ..."""
    return "proxy accuracy" if name == "acc" else f"proxy {name} score"


def running_score(model: nn.Module, batches: Iterable, proxy: Proxy | str = "acc",
                  device: str | torch.device = "cpu", dense_logp: torch.Tensor | None = None):
    """``proxy``'s score over ``(x, y)`` batches, yielded after each batch (the score so far).

    ``dense_logp`` holds the dense model's log-probabilities of the same images in the same order
    (for proxies that compare with it, see :func:`log_probs`).
    """
    proxy = PROXIES.get(proxy) if isinstance(proxy, str) else proxy
    if proxy.needs_dense and dense_logp is None:
        raise AutopruneError("this proxy compares with the dense model: pass its log-probabilities")
    model.eval()
    total, seen = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x.to(device, non_blocking=True))
            _check_finite(logits)
            dense = None if dense_logp is None else dense_logp[seen : seen + len(y)].to(logits.device)
            total += float(proxy.per_image(logits, y.to(logits.device), dense).sum())
            seen += len(y)
            yield proxy.to_score(total / seen)
    if seen == 0:
        raise AutopruneError("evaluation split is empty")


def running_accuracy(model: nn.Module, batches: Iterable, device: str | torch.device = "cpu"):
    """Top-1 accuracy over ``(x, y)`` batches, yielded after each batch (the accuracy so far)."""
    yield from running_score(model, batches, "acc", device)


@torch.no_grad()
def log_probs(model: nn.Module, batches: Iterable, device: str | torch.device = "cpu") -> torch.Tensor:
    """``model``'s log-probabilities of every image in ``batches``, in order (on the CPU)."""
    model.eval()
    return torch.cat([F.log_softmax(model(x.to(device)).double(), 1).cpu() for x, _ in batches])


def accuracy_on(model: nn.Module, batches: Iterable, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy over ``(x, y)`` batches (a DataLoader or a split's batches)."""
    *_, acc = running_accuracy(model, batches, device)  # the last value: over every batch
    assert math.isfinite(acc)
    return acc
