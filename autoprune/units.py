"""Prunable units: what one action decides, traced once from the dense model.

Two kinds of unit table are built here, and a granularity (:mod:`autoprune.granularity`) picks
one: :func:`channel_table` takes its units from Torch-Pruning's dependency graph (through
:mod:`autoprune.tp_adapter`): one unit is one group of coupled output channels (a conv, its
BatchNorm, the next layers' inputs; convs joined by a residual add, a depthwise conv or a concat
share one group). :func:`weight_table` has one unit per conv/linear weight tensor.

Tracing happens once per model. The result, a :class:`UnitTable`, holds everything an episode
needs without touching the graph again: each unit's channel count, the layers it couples, the
coefficients of the closed-form cost model, and, for slimming, which indices of which module each
root channel maps to.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from autoprune.tp_adapter import ChannelGroup, Coupling, channel_groups

if TYPE_CHECKING:
    from autoprune.granularity import Granularity

KIND_CODES = {"conv": 0, "dwconv": 1, "linear": 2, "norm": 3, "other": 4}


@dataclass(frozen=True)
class Layer:
    """One parametrised module of the dense model, as the cost model sees it.

    MACs and weight parameters scale with (kept outputs x kept inputs); ``bias_params`` (biases,
    norm scales) scale with kept outputs alone. A depthwise conv's cost follows its outputs only.
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    macs: int
    weight_params: int
    bias_params: int
    order: int


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
    (:mod:`autoprune.granularity`), which decides everything that differs between granularities;
    ``granularity`` is its name, as studies and policy files store it.
    """

    strategy: Granularity
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
    _deps: list[list[Coupling]] = field(default_factory=list, repr=False)  # per unit, what it cuts
    _groups: list[ChannelGroup] = field(default_factory=list, repr=False)  # for channel importances

    @property
    def granularity(self) -> str:
        return self.strategy.name

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]

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
        """Fewest elements unit ``u`` may keep: one, or ``multiple`` when that fits."""
        return min(self.multiple, self.units[u].size)

    def kept(self, u: int, sparsity: float) -> int:
        """Elements unit ``u`` keeps at ``sparsity``, rounded to ``round_to`` and never below one.

        Rounding is to the nearest multiple, so an achieved sparsity re-applied gives back the same
        width.
        """
        size = self.units[u].size
        if sparsity <= 0.0:
            return size  # a unit left alone stays whole, whatever round_to says
        keep = (1.0 - float(sparsity)) * size
        r = self.multiple
        if r > 1:
            keep = np.floor(keep / r + 0.5) * r
        keep = int(np.floor(keep + 0.5))
        return max(self.min_kept(u), min(size, keep))

    def kept_all(self, sparsities: Sequence[float]) -> np.ndarray:
        return np.array([self.kept(u, s) for u, s in enumerate(sparsities)], dtype=np.int64)

    def achieved(self, u: int, kept: int) -> float:
        return 1.0 - kept / self.units[u].size

    def channel_weight_stats(self, model: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per unit, per root channel: (sum of |w|, sum of w^2) over every conv/linear weight slice
        the channel owns, and the element count, as ``(sums, counts)`` arrays of shape (2, C), (C,).
        """
        modules = dict(model.named_modules())
        stats = []
        for u, deps in zip(self.units, self._deps):
            sums, counts = np.zeros((2, u.size)), np.zeros(u.size)
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

    def sizes(self) -> np.ndarray:
        return np.array([u.size for u in self.units], dtype=np.int64)

    def refittable_layers(self) -> list[str]:
        """Conv/linear layers a policy changes the inputs (slimmed) or the weights (masked) of, in
        network order."""
        return self.strategy.refittable_layers(self)

    def kept_outputs(self, removed: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
        """Per module whose outputs ``removed`` shrinks, the output indices it keeps (dense order)."""
        gone: dict[str, set[int]] = {}
        for u, root in removed.items():
            if len(root) == 0:
                continue
            for dep in self._deps[u]:
                if not dep.is_out or dep.is_param:
                    continue
                hit = np.isin(dep.root_idxs, root)
                if hit.any():
                    gone.setdefault(dep.target, set()).update(dep.target_idxs[hit].tolist())
        widths = {lay.name: lay.out_channels for lay in self.layers}
        return {name: np.setdiff1d(np.arange(widths[name]), sorted(idxs))
                for name, idxs in gone.items() if name in widths}

    # -- slimming ---------------------------------------------------------------------------------
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
            for dep in self._deps[u]:
                hit = np.isin(dep.root_idxs, root)
                if not hit.any():
                    continue
                key = (dep.target, dep.handler)
                idxs = set(dep.target_idxs[hit].tolist())
                if key in plan:
                    idxs |= set(plan[key][2])
                plan[key] = (dep.pruning_dim, dep.is_param, sorted(idxs))
        return plan


# ------------------------------------------------------------------------------------------------
# tracing
# ------------------------------------------------------------------------------------------------
def _layer_kind(m: nn.Module) -> str:
    if isinstance(m, nn.modules.conv._ConvNd):
        return "dwconv" if (m.groups == m.out_channels and m.groups > 1) else "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
        return "norm"
    return "other"


def _hw(shape: torch.Size) -> tuple[int, int]:
    if len(shape) >= 4:
        return int(shape[-2]), int(shape[-1])
    return 1, 1


def trace_layers(model: nn.Module, example: torch.Tensor) -> tuple[list[Layer], int]:
    """One forward pass with hooks: every module holding parameters, in execution order.

    Returns the layers and the count of parameters outside them (left unpruned by the cost model).
    """
    records: dict[str, dict] = {}
    hooks = []

    def hook(name):
        def fn(mod, inputs, output):
            if name in records or not isinstance(output, torch.Tensor):
                return
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else output
            records[name] = {"in": x.shape, "out": output.shape, "order": len(records)}

        return fn

    owners = {}
    for name, m in model.named_modules():
        direct = list(m.parameters(recurse=False))
        if direct:
            owners[name] = m
            hooks.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()

    layers, in_layers = [], 0
    for name, rec in sorted(records.items(), key=lambda kv: kv[1]["order"]):
        m = owners[name]
        kind = _layer_kind(m)
        weight = getattr(m, "weight", None)
        n_weight = weight.numel() if isinstance(weight, torch.Tensor) else 0
        own = sum(p.numel() for p in m.parameters(recurse=False))
        in_layers += own
        if kind in ("conv", "dwconv"):
            k = m.kernel_size[0]
            out_hw = _hw(rec["out"])
            cin, cout = m.in_channels, m.out_channels
            macs = out_hw[0] * out_hw[1] * cout * (cin // m.groups) * int(np.prod(m.kernel_size))
            stride = m.stride[0]
        elif kind == "linear":
            k, stride = 1, 1
            cin, cout = m.in_features, m.out_features
            tokens = int(np.prod(rec["out"][1:-1])) if len(rec["out"]) > 2 else 1
            macs = tokens * cin * cout
            out_hw = (1, 1)
        else:
            k, stride, macs = 1, 1, 0
            cout = cin = int(rec["out"][1]) if len(rec["out"]) > 1 else n_weight
            out_hw = _hw(rec["out"])
            n_weight = 0  # norms and the like scale with their channels alone
        layers.append(
            Layer(name, kind, cin, cout, k, stride, _hw(rec["in"]), out_hw, int(macs),
                  int(n_weight), int(own - n_weight), rec["order"])
        )
    total = sum(p.numel() for p in model.parameters())
    return layers, total - in_layers


def classifier_name(layers: Sequence[Layer]) -> str | None:
    """The last conv/linear executed: its outputs are the class scores and are never pruned."""
    prunable = [lay for lay in layers if lay.kind in ("conv", "dwconv", "linear")]
    return prunable[-1].name if prunable else None


def excluded_by(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def weight_table(strategy: Granularity, layers: Sequence[Layer], skip: Sequence[str], other: int,
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
                     unit_layer, other, tuple(example.shape), _deps=[[] for _ in units])


def channel_table(strategy: Granularity, model: nn.Module, example: torch.Tensor, layers: Sequence[Layer],
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
                     _deps=all_deps, _groups=groups)
