"""Channel units: groups of coupled output channels, from Torch-Pruning's dependency graph.

What only channel tables have lives here: per unit, the couplings that say which indices of which
module each root channel maps to (what slimming cuts and what reconstruction refits), and the
traced groups that channel importances score. Weight tables have none of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from autoprune.units.tp_adapter import ChannelGroup, Coupling
from autoprune.units.trace import Layer


@dataclass
class ChannelMap:
    """Per unit of a channel table, what its root channels cut.

    Attributes:
        couplings: per unit, every (module, dimension, indices) its root channels map to.
        groups: per unit, the traced dependency group, which channel importances score; dropped
            by :meth:`release_graph` once the units are ranked (it holds autograd nodes).
    """

    couplings: list[list[Coupling]]
    groups: list[ChannelGroup]

    def release_graph(self) -> None:
        self.groups = []

    def weight_stats(self, sizes: Sequence[int], model: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per unit, per root channel: (sum of |w|, sum of w^2) over every conv/linear weight slice
        the channel owns, and the element count, as ``(sums, counts)`` arrays of shape (2, C), (C,).
        """
        modules = dict(model.named_modules())
        stats = []
        for size, deps in zip(sizes, self.couplings):
            sums, counts = np.zeros((2, size)), np.zeros(size)
            for dep in deps:
                m = modules.get(dep.target)
                if dep.is_param or not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                    continue
                w = m.weight.detach()
                dw = m.groups == m.out_channels and m.groups > 1 if isinstance(m, nn.Conv2d) else False
                per = w if (dep.is_out or dw) else w.transpose(0, 1)
                if not dep.is_out and isinstance(m, nn.Conv2d) and m.groups > 1 and not dw:
                    continue  # grouped conv inputs: left to the outputs' slices
                sl = per[torch.as_tensor(dep.target_idxs)].flatten(1)
                np.add.at(sums[0], dep.root_idxs, sl.abs().sum(1).cpu().numpy())
                np.add.at(sums[1], dep.root_idxs, sl.pow(2).sum(1).cpu().numpy())
                np.add.at(counts, dep.root_idxs, sl.shape[1])
            stats.append((sums, np.maximum(counts, 1)))
        return stats

    def kept_outputs(self, layers: Sequence[Layer], removed: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
        """Per module whose outputs ``removed`` shrinks, the output indices it keeps (dense order)."""
        gone: dict[str, set[int]] = {}
        for u, root in removed.items():
            if len(root) == 0:
                continue
            for dep in self.couplings[u]:
                if not dep.is_out or dep.is_param:
                    continue
                hit = np.isin(dep.root_idxs, root)
                if hit.any():
                    gone.setdefault(dep.target, set()).update(dep.target_idxs[hit].tolist())
        widths = {lay.name: lay.out_channels for lay in layers}
        return {name: np.setdiff1d(np.arange(widths[name]), sorted(idxs))
                for name, idxs in gone.items() if name in widths}

    def removal_plan(self, removed: dict[int, np.ndarray]) -> dict[tuple[str, object], tuple]:
        """Module-level indices to prune for the given root indices, merged across units.

        Args:
            removed: unit index -> root channel indices to remove (original coordinates).

        Returns:
            ``(target, handler) -> (pruning_dim, is_param, sorted target indices)``. Indices are
            merged per module dimension before anything is pruned, so a concat's consumer loses
            the right inputs whichever unit is applied first.
        """
        plan: dict[tuple[str, object], tuple] = {}
        for u, root in removed.items():
            if len(root) == 0:
                continue
            for dep in self.couplings[u]:
                hit = np.isin(dep.root_idxs, root)
                if not hit.any():
                    continue
                key = (dep.target, dep.handler)
                idxs = set(dep.target_idxs[hit].tolist())
                if key in plan:
                    idxs |= set(plan[key][2])
                plan[key] = (dep.pruning_dim, dep.is_param, sorted(idxs))
        return plan
