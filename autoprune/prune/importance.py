"""Importance criteria: which channels (or weights) of a unit go first.

A criterion scores the elements of one unit; the lowest scores are removed. Scores are computed
once on the dense model and cached as a ranking, so an episode only takes the first k indices of
each ranking. Channel scores come from Torch-Pruning's group importances (through
:mod:`autoprune.units.tp_adapter`, so coupled layers are scored together); weight scores, for
granularities whose elements are single weights, are computed here. The table's granularity
says which of the two a unit takes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import nn

from autoprune.common.registry import Registry
from autoprune.data.datasets import TensorSplit
from autoprune.errors import AutopruneError
from autoprune.units import UnitTable
from autoprune.units.tp_adapter import (
    ChannelGroup,
    Scorer,
    bn_scale_scorer,
    fpgm_scorer,
    magnitude_scorer,
    taylor_scorer,
)


class Importance(ABC):
    """Scores the elements of a unit; higher means more important (kept longer).

    Subclasses implement :meth:`channel_scores` (one score per root channel of a dependency
    group) and, where it makes sense, :meth:`weight_scores` (one per weight entry); criteria
    that only make sense for channels set ``ranks_weights`` to ``False``. Criteria that need
    gradients set ``needs_grad``; the ranking then runs one backward pass over the calibration
    data first.
    """

    needs_grad = False
    ranks_weights = True

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def prepare(self, table: UnitTable, model: nn.Module, calib: TensorSplit | None) -> None:
        """Optional: look at the dense model and the calibration data once, before any unit is
        scored. Does nothing by default."""

    @abstractmethod
    def channel_scores(self, group: ChannelGroup) -> torch.Tensor:
        """Scores for each root channel of a coupled group (``group.size`` of them)."""

    def unit_scores(self, table: UnitTable, u: int) -> torch.Tensor:
        """Scores for each root channel of unit ``u``; by default its group's :meth:`channel_scores`."""
        return self.channel_scores(table.channels.groups[u])

    def weight_scores(self, module: nn.Module) -> torch.Tensor:
        """Scores shaped like ``module.weight``; the default is |w|."""
        return module.weight.detach().abs()


IMPORTANCE: Registry[type[Importance]] = Registry("importance")


class _TorchPruning(Importance):
    """A Torch-Pruning group importance (see :mod:`autoprune.units.tp_adapter`)."""

    def scorer(self) -> Scorer:  # pragma: no cover - overridden
        raise NotImplementedError

    def channel_scores(self, group: ChannelGroup) -> torch.Tensor:
        scores = self.scorer()(group)
        if scores is None:  # a group without weights to score: keep the order as traced
            return torch.arange(group.size, dtype=torch.float32).flip(0)
        return scores.detach().float().cpu()


@IMPORTANCE.register("l1", help="L1 norm of each channel's weights across the coupled group")
class L1(_TorchPruning):
    def scorer(self) -> Scorer:
        return magnitude_scorer(p=1)


@IMPORTANCE.register("l2", help="L2 norm of each channel's weights across the coupled group")
class L2(_TorchPruning):
    def scorer(self) -> Scorer:
        return magnitude_scorer(p=2)

    def weight_scores(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach().pow(2)


@IMPORTANCE.register("bn_scale", help="|gamma| of the BatchNorm after the channel (network slimming)")
class BNScale(_TorchPruning):
    ranks_weights = False

    def scorer(self) -> Scorer:
        return bn_scale_scorer()


@IMPORTANCE.register("fpgm", help="distance to the geometric median of the layer's filters (FPGM)")
class FPGM(_TorchPruning):
    ranks_weights = False

    def scorer(self) -> Scorer:
        return fpgm_scorer()


@IMPORTANCE.register("taylor", help="first-order Taylor |w * dL/dw| on the calibration batches")
class Taylor(_TorchPruning):
    needs_grad = True

    def scorer(self) -> Scorer:
        return taylor_scorer()

    def weight_scores(self, module: nn.Module) -> torch.Tensor:
        return (module.weight.detach() * module.weight.grad).abs()


@IMPORTANCE.register("random", help="seeded random order: the floor any criterion should beat")
class Random(Importance):
    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.rng = np.random.default_rng(seed)  # units are scored in order: same seed, same ranks

    def channel_scores(self, group: ChannelGroup) -> torch.Tensor:
        return torch.from_numpy(self.rng.random(group.size))

    def weight_scores(self, module: nn.Module) -> torch.Tensor:
        return torch.from_numpy(self.rng.random(module.weight.numel())).view_as(module.weight)


@IMPORTANCE.register("thinet", help="greedy order by the error the next layers' outputs suffer (ThiNet)")
class ThiNet(Importance):
    """ThiNet (Luo et al., 2017): a channel matters as much as the layers it feeds miss it.

    On the dense model and the calibration images, every layer that consumes a unit's channels
    records, at sampled (position, output channel) pairs, each input channel's contribution to its
    output. Channels are then removed greedily, each time the one whose removal adds least to the
    squared error of the consumers' outputs (each consumer's error relative to its output's
    energy, so coupled groups weigh their consumers alike). The removal order is the ranking.
    Like every criterion it is computed once per task; the least-squares refit that follows a cut
    (``--reconstruct lsq``) then fits the kept channels, as ThiNet does after its selection.
    """

    ranks_weights = False
    rows = 4096  # sampled (position, output channel) pairs per consumer
    images = 256

    def prepare(self, table: UnitTable, model: nn.Module, calib: TensorSplit | None) -> None:
        from autoprune.reconstruct.lsq import in_width, patches, refittable, sample_rows

        if calib is None:
            raise ValueError("importance 'thinet' needs calibration data")
        modules = dict(model.named_modules())
        names = {d.target for deps in table.channels.couplings for d in deps if not d.is_out and not d.is_param}
        gen = torch.Generator().manual_seed(self.seed)
        self._contrib: dict[str, torch.Tensor] = {}

        def record(name: str):
            def hook(m, inputs, out):
                if name in self._contrib:
                    return
                rows = sample_rows(out.shape, self.rows, gen).to(out.device)
                cols = patches(inputs[0], m, rows)  # (R, C_in * k * k)
                w = m.weight.detach().reshape(m.weight.shape[0], -1).float()
                o = torch.randint(w.shape[0], (len(cols),), generator=gen).to(w.device)
                self._contrib[name] = (cols * w[o]).reshape(len(cols), in_width(m), -1).sum(-1).cpu()
            return hook

        hooks = [modules[n].register_forward_hook(record(n)) for n in names
                 if n in modules and refittable(modules[n])]
        try:
            with torch.no_grad():
                model.eval()(calib.x[: self.images])
        finally:
            for h in hooks:
                h.remove()

    def channel_scores(self, group: ChannelGroup) -> torch.Tensor:  # pragma: no cover - unit_scores is used
        raise NotImplementedError

    def unit_scores(self, table: UnitTable, u: int) -> torch.Tensor:
        size = table.units[u].size
        blocks = []
        for d in table.channels.couplings[u]:
            c = self._contrib.get(d.target)
            if d.is_out or d.is_param or c is None:
                continue
            per_root = torch.zeros(len(c), size).index_add_(
                1, torch.as_tensor(d.root_idxs), c[:, torch.as_tensor(d.target_idxs)])
            blocks.append(per_root / c.sum(1).pow(2).mean().sqrt().clamp_min(1e-12))
        if not blocks:  # no layer to reconstruct (a depthwise consumer, the classifier): magnitude
            return L1(self.seed).channel_scores(table.channels.groups[u])
        x = torch.cat(blocks).double()
        energy = x.pow(2).sum(0)
        removed = torch.zeros(size, dtype=torch.bool)
        total = torch.zeros(len(x), dtype=torch.float64)
        scores = torch.empty(size)
        for step in range(size):
            err = 2 * (total @ x) + energy  # ||total + x_c||^2 - ||total||^2, for every c at once
            err[removed] = float("inf")
            c = int(err.argmin())
            removed[c] = True
            total += x[:, c]
            scores[c] = step
        return scores


def _backward(model: nn.Module, calib: TensorSplit, batch_size: int = 64) -> None:
    """Accumulate dL/dw over the calibration data on the dense model, in eval mode."""
    model.zero_grad(set_to_none=True)
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for x, y in calib.batches(batch_size):
        (loss_fn(model(x), y) / len(calib)).backward()


def rank_units(
    table: UnitTable,
    model: nn.Module,
    importance: str | Importance = "l1",
    calib: TensorSplit | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Per unit, its element indices from least to most important.

    For channel units the indices are root channels; for units of single weights they index the
    flattened weight. The dense model's gradients are cleared again after gradient criteria.
    """
    crit = IMPORTANCE.get(importance)(seed) if isinstance(importance, str) else importance
    name = importance if isinstance(importance, str) else type(crit).__name__.lower()
    strategy = table.strategy
    if strategy.per_weight and not crit.ranks_weights:
        able = [n for n in IMPORTANCE.names() if IMPORTANCE.get(n).ranks_weights]
        raise AutopruneError(f"importance {name!r} scores channels; with {table.granularity} granularity "
                             f"use {', '.join(able[:-1])} or {able[-1]}")
    if crit.needs_grad:
        if calib is None:
            raise ValueError(f"importance {name!r} needs calibration data")
        _backward(model, calib)
    crit.prepare(table, model, calib)
    try:
        # stable sort: ties keep index order, so rankings are reproducible
        return [np.argsort(scores.numpy(), kind="stable") for scores in strategy.scores(crit, table, model)]
    finally:
        if crit.needs_grad:
            model.zero_grad(set_to_none=True)
