"""Applying kept widths to a copy of the dense model: physical slimming or masks.

A :class:`Pruner` never touches the model it is given; it returns a pruned copy. A granularity
(:mod:`autoprune.prune.granularity`) says which one its tables take. :class:`Slimmer` removes channels
physically with Torch-Pruning's per-layer pruning functions (through :mod:`autoprune.units.tp_adapter`),
driven by the module-level indices the :class:`~autoprune.units.UnitTable` recorded when it traced
the model (no graph traversal per episode). :class:`Masker` masks single weights in the manner of
``torch.nn.utils.prune`` (``weight_orig`` and ``weight_mask``, applied by a forward pre-hook),
which :meth:`Pruner.finalize` makes permanent for export.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

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
            mask = torch.ones(module.weight.numel(), device=module.weight.device)
            mask[torch.as_tensor(ranks[u.index][: u.size - int(kept[u.index])], dtype=torch.long)] = 0
            torch_prune.custom_from_mask(module, "weight", mask.view_as(module.weight))
        return pruned

    def finalize(self, model: nn.Module) -> nn.Module:
        for m in model.modules():
            if torch_prune.is_pruned(m) and hasattr(m, "weight_mask"):
                torch_prune.remove(m, "weight")
        return model


def pruner_for(table: UnitTable) -> Pruner:
    """The pruner of the table's granularity."""
    return table.strategy.pruner()
