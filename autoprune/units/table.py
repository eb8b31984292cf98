"""Prunable units: what one action decides, traced once from the dense model.

Two kinds of unit table are built, and a granularity (:mod:`autoprune.prune.granularity`) picks
one: :func:`~autoprune.units.channels.channel_table` takes its units from Torch-Pruning's
dependency graph (through :mod:`autoprune.units.tp_adapter`): one unit is one group of coupled
output channels (a conv, its BatchNorm, the next layers' inputs; convs joined by a residual add, a
depthwise conv or a concat share one group). :func:`weight_table` has one unit per conv/linear
weight tensor.

Tracing happens once per model. The result, a :class:`UnitTable`, holds everything an episode
needs without touching the graph again: each unit's channel count, the layers it couples, the
coefficients of the closed-form cost model, and, for slimming, which indices of which module each
root channel maps to (:class:`~autoprune.units.channels.ChannelMap`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from autoprune.units.channels import ChannelMap
from autoprune.units.tp_adapter import channel_groups
from autoprune.units.trace import Layer


class UnitKind(Protocol):
    """What a unit table needs to know of the granularity it was built for (the full contract
    is :class:`~autoprune.prune.granularity.Granularity`, which sits above the table)."""

    name: str
    rounded: bool

    def refittable_layers(self, table: UnitTable) -> list[str]: ...


@dataclass(frozen=True)
class Unit:
    """One decision of the search: the sparsity of a group of coupled channels or of one weight.

    Attributes:
        index: position in network order (the order the env visits units).
        name: the root module's qualified name; stable across runs and used in policies.
        kind: ``conv``, ``dwconv`` or ``linear`` (the root layer's kind).
        size: prunable elements: channels (channel granularity) or weights (unstructured).
        members: modules whose outputs this unit prunes (the coupled layers).
        consumers: modules whose inputs shrink with it.
        layer: the root layer, whose shape gives the unit's state features.
        macs: dense MACs of the layers whose outputs it prunes.
        params: dense parameters of those layers.
        touched_macs: dense MACs of every layer it shrinks (members and consumers).
    """

    index: int
    name: str
    kind: str
    size: int
    members: tuple[str, ...]
    consumers: tuple[str, ...]
    layer: Layer
    macs: int
    params: int
    touched_macs: int = 0


@dataclass
class UnitTable:
    """The traced model: layers, units and the coefficients of the closed-form cost model.

    ``out_mult[u, l]`` is how many output channels of layer ``l`` go per channel removed from
    unit ``u`` (1 for a plain member, H*W for a conv feeding a flatten, ...); ``in_mult`` the same
    for input channels. For weight tables (one unit per layer) these are unused: unit ``u`` is
    layer ``unit_layer[u]``. ``strategy`` is the registered granularity the table was built for
    (:mod:`autoprune.prune.granularity`), which decides everything that differs between granularities;
    ``granularity`` is its name, as studies and policy files store it.
    """

    strategy: UnitKind
    layers: tuple[Layer, ...]
    units: tuple[Unit, ...]
    round_to: int
    out_mult: np.ndarray
    in_mult: np.ndarray
    unit_layer: np.ndarray
    other_params: int
    input_shape: tuple[int, ...]
    dense_macs: int = 0
    dense_params: int = 0
    channels: ChannelMap | None = field(default=None, repr=False)  # channel granularity only
    # Per unit, the widths it may keep with the pattern each stands for, ascending, ending at the
    # whole unit: ``((1152, "2:4"), (1728, "6:8"), (2304, "dense"))``; the pattern is ``None``
    # for widths that stand for no pattern (``--round-to auto``'s latency steps). ``None``: any
    # width.
    levels: tuple[tuple[tuple[int, str | None], ...], ...] | None = field(default=None, repr=False)

    @property
    def granularity(self) -> str:
        return self.strategy.name

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]

    def coupled(self) -> np.ndarray:
        """Mask of units whose elements an add or concat ties across more than one conv/linear
        layer (a residual stream); the others prune one layer's outputs only."""
        weighted = {lay.name for lay in self.layers if lay.kind in ("conv", "dwconv", "linear")}
        return np.array([sum(m in weighted for m in u.members) > 1 for u in self.units], dtype=bool)

    def index_of(self, name: str) -> int:
        for u in self.units:
            if u.name == name:
                return u.index
        raise KeyError(name)

    # -- widths ---------------------------------------------------------------------------------
    @property
    def multiple(self) -> int:
        """Kept widths are multiples of this: ``round_to`` where the granularity rounds, else 1."""
        return self.round_to if self.strategy.rounded else 1

    def min_kept(self, u: int) -> int:
        """Fewest elements unit ``u`` may keep: its sparsest level, else one, or ``multiple`` when
        that fits."""
        if self.levels is not None:
            return self.levels[u][0][0]
        return min(self.multiple, self.units[u].size)

    def allowed(self, u: int, kept: int) -> bool:
        """Unit ``u`` may keep ``kept`` elements (one of its levels, where it has levels)."""
        if self.levels is not None:
            return any(k == kept for k, _ in self.levels[u])
        return self.min_kept(u) <= kept <= self.units[u].size

    def pattern(self, u: int, kept: int) -> str | None:
        """The pattern unit ``u`` is cut to when it keeps ``kept`` elements (``2:4``), for
        granularities with patterned levels; ``None`` for the others."""
        if self.levels is None:
            return None
        return dict(self.levels[u]).get(int(kept))

    def kept(self, u: int, sparsity: float) -> int:
        """Elements unit ``u`` keeps at ``sparsity``, rounded to ``round_to`` and never below one.

        Rounding is to the nearest multiple, so an achieved sparsity re-applied gives back the same
        width.
        """
        size = self.units[u].size
        if sparsity <= 0.0:
            return size  # a unit left alone stays whole, whatever round_to says
        keep = (1.0 - float(sparsity)) * size
        if self.levels is not None:  # the nearest level; at a tie the denser one
            return min((k for k, _ in self.levels[u]), key=lambda k: (abs(k - keep), -k))
        r = self.multiple
        if r > 1:
            keep = np.floor(keep / r + 0.5) * r
        keep = int(np.floor(keep + 0.5))
        return max(self.min_kept(u), min(size, keep))

    def kept_all(self, sparsities: Sequence[float]) -> np.ndarray:
        return np.array([self.kept(u, s) for u, s in enumerate(sparsities)], dtype=np.int64)

    def achieved(self, u: int, kept: int) -> float:
        return 1.0 - kept / self.units[u].size

    def sizes(self) -> np.ndarray:
        return np.array([u.size for u in self.units], dtype=np.int64)

    def refittable_layers(self) -> list[str]:
        """Conv/linear layers a policy changes the inputs (slimmed) or the weights (masked) of, in
        network order."""
        return self.strategy.refittable_layers(self)


def weight_table(strategy: UnitKind, layers: Sequence[Layer], skip: Sequence[str], other: int,
                 example: torch.Tensor) -> UnitTable:
    """One unit per conv/linear layer not in ``skip``; its elements are the layer's weights."""
    units = []
    for lay in layers:
        if lay.kind not in ("conv", "dwconv", "linear") or lay.name in skip:
            continue
        units.append(
            Unit(len(units), lay.name, lay.kind, lay.weight_params, (lay.name,), (), lay,
                 lay.macs, lay.weight_params + lay.bias_params, lay.macs)
        )
    n = len(units)
    unit_layer = np.array([[lay.name for lay in layers].index(u.name) for u in units], dtype=np.int64)
    empty = np.zeros((n, len(layers)))
    return UnitTable(strategy, tuple(layers), tuple(units), 1, empty, empty.copy(),
                     unit_layer, other, tuple(example.shape))


def channel_table(strategy: UnitKind, model: nn.Module, example: torch.Tensor, layers: Sequence[Layer],
                  skip: Sequence[str], other: int, round_to: int) -> UnitTable:
    """One unit per group of coupled output channels whose outputs are not in ``skip``."""
    by_name = {lay.name: i for i, lay in enumerate(layers)}
    raw = []
    for group in channel_groups(model, example, ignored=skip, root_types=(nn.Conv2d, nn.Linear)):
        members, consumers = [], []
        for c in group.couplings:
            if c.is_out and not c.is_param:
                members.append(c.target)
            elif c.is_in and not c.is_param:
                consumers.append(c.target)
        prunable = [m for m in members
                    if m in by_name and layers[by_name[m]].kind in ("conv", "dwconv", "linear")]
        if group.size < 2 or not prunable:
            continue
        raw.append((group.size, members, consumers, list(group.couplings), prunable, group))

    # Network order: a unit sits where its first conv/linear member runs; that member names it.
    raw.sort(key=lambda r: min(layers[by_name[m]].order for m in r[4]))
    n_units, n_layers = len(raw), len(layers)
    out_mult = np.zeros((n_units, n_layers))
    in_mult = np.zeros((n_units, n_layers))
    units, all_deps, groups = [], [], []
    for u, (size, members, consumers, deps, prunable, group) in enumerate(raw):
        for dep in deps:
            if dep.target not in by_name:
                continue
            layer = layers[by_name[dep.target]]
            per_channel = len(dep.target_idxs) / size
            if layer.kind in ("dwconv", "norm", "other") or dep.target in members:
                out_mult[u, by_name[dep.target]] = per_channel
            else:
                in_mult[u, by_name[dep.target]] = per_channel
        root = min(prunable, key=lambda m: layers[by_name[m]].order)
        root_layer = layers[by_name[root]]
        member_layers = [layers[by_name[m]] for m in members if m in by_name]
        touched = {m for m in members + consumers if m in by_name}
        units.append(
            Unit(u, root, root_layer.kind, size, tuple(members),
                 tuple(c for c in consumers if c not in members), root_layer,
                 int(sum(lay.macs for lay in member_layers)),
                 int(sum(lay.weight_params + lay.bias_params for lay in member_layers)),
                 int(sum(layers[by_name[m]].macs for m in touched)))
        )
        all_deps.append(deps)
        groups.append(group)
    return UnitTable(strategy, tuple(layers), tuple(units), round_to, out_mult, in_mult,
                     np.zeros(0, dtype=np.int64), other, tuple(example.shape),
                     channels=ChannelMap(all_deps, groups))
