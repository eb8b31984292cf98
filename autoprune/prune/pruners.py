"""Applying kept widths to a copy of the dense model: physical slimming or masks.

A :class:`Pruner` never touches the model it is given; it returns a pruned copy. A granularity
(:mod:`autoprune.prune.granularity`) says which one its tables take. :class:`Slimmer` removes channels
physically with Torch-Pruning's per-layer pruning functions (through :mod:`autoprune.units.tp_adapter`),
driven by the module-level indices the :class:`~autoprune.units.UnitTable` recorded when it traced
the model (no graph traversal per episode). :class:`Masker` masks single weights in the manner of
``torch.nn.utils.prune`` (``weight_orig`` and ``weight_mask``, applied by a forward pre-hook),
which :meth:`Pruner.finalize` makes permanent for export; :class:`NMMasker` and
:class:`BlockMasker` build the same masks in N:M and block patterns
(:mod:`autoprune.prune.patterns`).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from autoprune.prune import patterns
from autoprune.units import UnitTable
from autoprune.units.tp_adapter import cut


def removed_indices(table: UnitTable, ranks: Sequence[np.ndarray],
                    kept: Sequence[int]) -> dict[int, np.ndarray]:
    """Per unit, the ``size - kept`` least important element indices."""
    return {u.index: ranks[u.index][: u.size - int(kept[u.index])] for u in table.units}


class Pruner(ABC):
    """Turns per-unit kept widths into a pruned copy of the dense model."""

    @abstractmethod
    def apply(self, model: nn.Module, table: UnitTable, ranks: Sequence[np.ndarray],
              kept: Sequence[int]) -> nn.Module:
        """A pruned deep copy of ``model``; ``model`` itself is left as it was."""

    def finalize(self, model: nn.Module) -> nn.Module:
        """Make the pruning permanent for export (nothing to do for slimmed models)."""
        return model


class Slimmer(Pruner):
    """Physically removes channels: every coupled layer gets smaller tensors."""

    def apply(self, model, table, ranks, kept):
        pruned = copy.deepcopy(model)
        plan = table.channels.removal_plan(removed_indices(table, ranks, kept))
        for (target, handler), (dim, is_param, idxs) in plan.items():
            cut(pruned, target, handler, dim, is_param, idxs)
        return pruned


class Masker(Pruner):
    """Zeroes individual weights through masks; shapes stay dense."""

    def apply(self, model, table, ranks, kept):
        pruned = copy.deepcopy(model)
        for u in table.units:
            module = pruned.get_submodule(u.name)
            mask = self.mask(module.weight, table, u.index, ranks[u.index], int(kept[u.index]))
            torch_prune.custom_from_mask(module, "weight", mask.to(module.weight.device))
        return pruned

    def mask(self, weight: torch.Tensor, table: UnitTable, u: int, rank: np.ndarray, kept: int) -> torch.Tensor:
        """The weight-shaped 0/1 mask of unit ``u`` keeping ``kept`` elements, least important
        first in ``rank``: here the ``size - kept`` first weights go."""
        mask = torch.ones(weight.numel())
        mask[torch.as_tensor(rank[: table.units[u].size - kept], dtype=torch.long)] = 0
        return mask.view_as(weight)

    def finalize(self, model: nn.Module) -> nn.Module:
        for m in model.modules():
            if torch_prune.is_pruned(m) and hasattr(m, "weight_mask"):
                torch_prune.remove(m, "weight")
        return model


class NMMasker(Masker):
    """Masks each unit to the N:M pattern of the level it keeps: within every group of ``m``
    input channels the ``n`` weights ranked most important stay."""

    def mask(self, weight, table, u, rank, kept):
        rung = table.pattern(u, kept)
        if rung is None:
            raise ValueError(f"unit {table.units[u].name} keeps {kept} weights, which is no level of its ladder")
        if rung == "dense":
            return torch.ones_like(weight)
        position = torch.empty(len(rank))
        position[torch.as_tensor(rank, dtype=torch.long)] = torch.arange(len(rank), dtype=torch.float32)
        n, m = (int(v) for v in rung.split(":"))
        return patterns.nm_mask(position.view_as(weight), patterns.NM(n, m))


class BlockMasker(Masker):
    """Masks whole RxC tiles: a unit's elements are its blocks, the least important go."""

    def __init__(self, block: tuple[int, int]) -> None:
        self.block = block

    def mask(self, weight, table, u, rank, kept):
        keep = torch.ones(table.units[u].size)
        keep[torch.as_tensor(rank[: table.units[u].size - kept], dtype=torch.long)] = 0
        return patterns.block_mask(keep, weight.shape, self.block)


def pruner_for(table: UnitTable) -> Pruner:
    """The pruner of the table's granularity."""
    return table.strategy.pruner()
