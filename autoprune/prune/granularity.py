"""Granularity: what one unit of the search is, how a unit is cut, and what the cut saves.

A granularity is a strategy object, registered in :data:`GRANULARITIES` under the name that
``--granularity`` accepts and that unit tables, studies and policy files store
(``UnitTable.granularity``). The engine never compares that name: it asks the table's strategy
(``UnitTable.strategy``) for its unit-table builder, its pruner, its cost rule and the few facts
other code needs (how ``inspect`` labels a unit's size, whether shapes shrink, ...). A new
granularity, N:M sparsity say, is one subclass of :class:`Granularity` and one :func:`register`
call; nothing else in the engine changes.

* ``channel``: a unit is a group of coupled output channels (Torch-Pruning's dependency graph),
  physically slimmed (:class:`~autoprune.prune.pruners.Slimmer`); FLOPs and params are what dense
  hardware runs.
* ``unstructured``: a unit is one conv/linear weight tensor and its elements are single weights,
  masked (:class:`~autoprune.prune.pruners.Masker`); FLOPs and params are *effective*: weighted by each
  layer's density, what a sparse kernel could save.
* ``nm`` (``nm:2:4,1:4`` for another ladder): a unit is one weight tensor cut to an N:M
  pattern, a rung of a ladder ordered by density (:mod:`autoprune.prune.patterns`), masked;
  effective costs at the rung's density.
* ``block:RxC``: a unit is one weight tensor, its elements are RxC tiles, masked by tile.

``nm`` and ``block`` take an argument after a colon; :func:`granularity_of` reads the whole
spec and returns a strategy whose ``name`` is the spec that studies and policy files store.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from autoprune.common.registry import Registry
from autoprune.cost.flops import (
    Costs,
    count_effective_flops,
    count_flops,
    count_params,
    masked_costs,
    slimmed_costs,
)
from autoprune.errors import AutopruneError
from autoprune.prune import patterns
from autoprune.prune.pruners import BlockMasker, Masker, NMMasker, Pruner, Slimmer
from autoprune.units import Layer, UnitTable, channel_table, classifier_name, excluded_by, trace_layers, weight_table

log = logging.getLogger(__name__)


class Granularity(ABC):
    """What a unit is, how it is cut and what that saves: one extension point of the engine.

    A strategy is stateless; one instance is registered and shared by every table of its name.
    Subclasses set the attributes below and implement the abstract methods.

    Attributes:
        name: the registry name, stored in unit tables, studies and policy files.
        help: one line for ``--help`` and ``autoprune models``.
        size_label: what a unit's size counts, as ``autoprune inspect`` heads the column.
        flops_kind: ``dense`` (what dense hardware runs) or ``effective`` (weighted by each
            layer's density), as ``autoprune apply`` records it.
        physical: cutting shrinks tensors, so a pruned state_dict fits only a slimmed model and
            latency can drop; ``False`` for masks, which keep every shape dense.
        per_weight: a unit's elements are the entries of one weight tensor, ranked by
            ``Importance.weight_scores``; ``False`` when they are root channels, ranked by
            ``Importance.unit_scores``.
        rounded: kept widths are multiples of the table's ``round_to``.
        example: a spec that selects it (its name, or with an argument: ``block:4x4``).
    """

    name: str = ""
    help: str = ""
    size_label: str = "width"
    flops_kind: str = "dense"
    physical: bool = True
    per_weight: bool = False
    rounded: bool = True

    @property
    def example(self) -> str:
        return self.name

    def configure(self, arg: str | None) -> Granularity:
        """The strategy for ``NAME:ARG`` (``arg`` the text after the colon; ``None``: no colon).
        Granularities without an argument refuse one."""
        if arg is not None:
            raise AutopruneError(f"granularity {self.name!r} takes no argument (got {self.name}:{arg})")
        return self

    def pattern(self, table: UnitTable, u: int, kept: int) -> str | None:
        """The pattern unit ``u``'s weight is cut to at width ``kept`` (``2:4``, ``4x4``,
        ``dense``), which :func:`check_patterns` verifies; ``None``: no pattern to check."""
        return None

    @abstractmethod
    def build_table(self, model: nn.Module, example: torch.Tensor, layers: Sequence[Layer],
                    excluded: Sequence[str], other: int, round_to: int) -> UnitTable:
        """The units of ``model``; :func:`~autoprune.units.build_unit_table` adds the dense totals.

        Args:
            model: the dense model; read, never modified.
            example: one input batch.
            layers: every parametrised module, in execution order.
            excluded: layers whose outputs the user excluded from pruning.
            other: parameters outside ``layers``.
            round_to: the width multiple asked for.
        """

    @abstractmethod
    def pruner(self) -> Pruner:
        """A pruner that applies kept widths to a copy of the dense model."""

    @abstractmethod
    def closed_form(self, table: UnitTable, kept: np.ndarray) -> Costs:
        """Costs with unit ``u`` keeping ``kept[u]`` elements, from the table alone.

        Called tens of times per step by the action wall, so arithmetic only; it must agree with
        :meth:`counted_costs` on the model :meth:`pruner` makes.
        """

    @abstractmethod
    def counted_costs(self, model: nn.Module, example: torch.Tensor) -> Costs:
        """Costs counted on a real model that :meth:`pruner` pruned."""

    @abstractmethod
    def refittable_layers(self, table: UnitTable) -> list[str]:
        """Conv/linear layers whose inputs or weights a policy changes, in network order: what
        reconstruction refits."""

    @abstractmethod
    def scores(self, importance, table: UnitTable, model: nn.Module) -> list[torch.Tensor]:
        """Per unit, one score per element from ``importance`` (an
        :class:`~autoprune.prune.importance.Importance`), flat; the lowest are removed first."""

    @abstractmethod
    def weight_stats(self, table: UnitTable, model: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per unit, per element: (sum of |w|, sum of w^2) over the weights it owns, shape
        (2, n), and how many weights that is, shape (n,)."""

    @abstractmethod
    def kept_outputs(self, table: UnitTable, removed: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
        """Per module whose outputs the removal shrinks, the output indices it keeps (dense
        order): what reconstruction refits the next layers to. Masks shrink no outputs."""

    @abstractmethod
    def skeleton(self, dense: nn.Module, table: UnitTable, kept: Sequence[int]) -> nn.Module:
        """The model that a pruned state_dict saved at widths ``kept`` loads into strictly."""


GRANULARITIES: Registry[Granularity] = Registry("granularity")


def register(strategy: Granularity) -> Granularity:
    """File ``strategy`` under its name, with its help line."""
    return GRANULARITIES.register(strategy.name, help=strategy.help)(strategy)


class Channel(Granularity):
    """Coupled output channels: a unit is one group of Torch-Pruning's dependency graph."""

    name = "channel"
    help = "coupled output channels, physically slimmed"

    def build_table(self, model, example, layers, excluded, other, round_to):
        head = classifier_name(layers)  # the class scores are never pruned
        skip = list(excluded) + ([head] if head else [])
        return channel_table(self, model, example, layers, skip, other, round_to)

    def pruner(self):
        return Slimmer()

    def closed_form(self, table, kept):
        return slimmed_costs(table, kept)

    def counted_costs(self, model, example):
        return Costs(count_flops(model, example), float(count_params(model)))

    def refittable_layers(self, table):
        shrinkable = table.in_mult.any(0) if table.in_mult.size else np.zeros(len(table.layers), bool)
        return [lay.name for lay, s in zip(table.layers, shrinkable) if s and lay.kind in ("conv", "linear")]

    def scores(self, importance, table, model):
        return [importance.unit_scores(table, u.index) for u in table.units]

    def weight_stats(self, table, model):
        return table.channels.weight_stats(table.sizes(), model)

    def kept_outputs(self, table, removed):
        return table.channels.kept_outputs(table.layers, removed)

    def skeleton(self, dense, table, kept):
        # Which channels were removed no longer matters: the saved tensors replace them all.
        order = [np.arange(u.size) for u in table.units]
        return self.pruner().apply(dense, table, order, kept)


class Unstructured(Granularity):
    """Single weights: a unit is one conv/linear weight tensor, cut with masks."""

    name = "unstructured"
    help = "individual weights of each conv/linear, masked"
    size_label = "weights"
    flops_kind = "effective"
    physical = False
    per_weight = True
    rounded = False

    def build_table(self, model, example, layers, excluded, other, round_to):
        # Masks leave every shape whole, so the classifier's weights are a unit like any other.
        return weight_table(self, layers, excluded, other, example)

    def pruner(self):
        return Masker()

    def closed_form(self, table, kept):
        return masked_costs(table, kept)

    def counted_costs(self, model, example):
        return Costs(count_effective_flops(model, example), float(count_params(model, effective=True)))

    def refittable_layers(self, table):
        return [u.name for u in table.units if u.kind in ("conv", "linear")]

    def scores(self, importance, table, model):
        modules = dict(model.named_modules())
        return [importance.weight_scores(modules[u.name]).flatten() for u in table.units]

    def weight_stats(self, table, model):
        modules = dict(model.named_modules())
        stats = []
        for u in table.units:
            w = modules[u.name].weight.detach().flatten().cpu().numpy().astype(np.float64)
            stats.append((np.stack([np.abs(w), w * w]), np.ones(len(w))))
        return stats

    def kept_outputs(self, table, removed):
        return {}

    def skeleton(self, dense, table, kept):
        return dense  # masks were made permanent before saving: the shapes are the dense ones


class NMPattern(Unstructured):
    """N:M patterns: a unit is one weight tensor, its action picks a rung of the ladder."""

    name = "nm"
    help = ("N:M patterns per conv/linear (a ladder: dense, 6:8, 4:8, 2:4, 2:8, 1:4, 1:8; "
            "nm:2:4,1:4 for another), masked")
    size_label = "weights"

    def __init__(self, ladder: tuple[patterns.NM, ...] | None = None) -> None:
        self.ladder = ladder or patterns.parse_ladder(patterns.DEFAULT_LADDER)
        if ladder is not None and ladder != patterns.parse_ladder(patterns.DEFAULT_LADDER):
            self.name = f"nm:{patterns.ladder_text(ladder)}"

    def configure(self, arg):
        return self if arg is None else NMPattern(patterns.parse_ladder(arg))

    def build_table(self, model, example, layers, excluded, other, round_to):
        rungs = {name: [r for r in self.ladder if patterns.fits_nm(shape, r)]
                 for name, shape in _weight_shapes(model, layers, excluded).items()}
        table = _masked_table(self, layers, excluded, other, example, rungs,
                              "fits no N:M rung of the ladder (too few input channels)")
        table.levels = tuple(
            tuple(sorted({u.size * r.n // r.m: str(r) for r in reversed(rungs[u.name])}.items()))
            + ((u.size, "dense"),)
            for u in table.units)
        return table

    def pruner(self):
        return NMMasker()

    def pattern(self, table, u, kept):
        return table.pattern(u, kept)


class BlockPattern(Unstructured):
    """RxC blocks: a unit is one weight tensor, its elements are tiles, ranked by their norm."""

    name = "block"
    help = "RxC tiles of each conv/linear weight (block:4x4, block:1x8), masked"
    size_label = "blocks"

    def __init__(self, block: tuple[int, int] | None = None) -> None:
        self.block = block
        if block is not None:
            self.name = f"block:{block[0]}x{block[1]}"

    @property
    def example(self):
        return self.name if self.block else "block:4x4"

    def configure(self, arg):
        if not arg:
            raise AutopruneError("granularity block needs a tile shape: block:RxC, e.g. block:4x4")
        return BlockPattern(patterns.parse_block(arg))

    def build_table(self, model, example, layers, excluded, other, round_to):
        shapes = _weight_shapes(model, layers, excluded)
        fits = {name: patterns.fits_block(shape, self.block) for name, shape in shapes.items()}
        r, c = self.block
        table = _masked_table(self, layers, excluded, other, example, fits,
                              f"is not divided into {r}x{c} blocks (outputs by input channels)")
        table.units = tuple(replace(u, size=int(np.prod(patterns.block_grid(shapes[u.name], self.block))))
                            for u in table.units)
        return table

    def pruner(self):
        return BlockMasker(self.block)

    def pattern(self, table, u, kept):
        return "dense" if kept == table.units[u].size else f"{self.block[0]}x{self.block[1]}"

    def scores(self, importance, table, model):
        return [patterns.block_scores(s.view_as(model.get_submodule(u.name).weight), self.block)
                for u, s in zip(table.units, super().scores(importance, table, model))]

    def weight_stats(self, table, model):
        stats = []
        for u in table.units:
            w = model.get_submodule(u.name).weight.detach().cpu().double()
            stats.append((np.stack([patterns.block_scores(w.abs(), self.block).numpy(),
                                    patterns.block_scores(w * w, self.block).numpy()]),
                          np.full(u.size, float(self.block[0] * self.block[1]))))
        return stats


def _weight_shapes(model: nn.Module, layers: Sequence[Layer], excluded: Sequence[str]) -> dict[str, torch.Size]:
    """The weight shape of every conv/linear layer not excluded, by name."""
    return {lay.name: model.get_submodule(lay.name).weight.shape for lay in layers
            if lay.kind in ("conv", "dwconv", "linear") and lay.name not in excluded}


def _masked_table(strategy, layers, excluded, other, example, fits, why):
    """A weight table over the layers ``fits`` says take a pattern (a true value: the rungs that
    fit, or ``True``); the others stay dense, said once."""
    unfit = [name for name, ok in fits.items() if not ok]
    if unfit and len(unfit) == len(fits):
        raise AutopruneError(f"granularity {strategy.name}: the model has no prunable units: every "
                             f"conv/linear layer {why}")
    if unfit:
        log.warning("%s: %d layer(s) stay dense: %s %s", strategy.name, len(unfit),
                    ", ".join(unfit[:6]) + (" ..." if len(unfit) > 6 else ""),
                    "each " + why if len(unfit) > 1 else why)
    return weight_table(strategy, layers, list(excluded) + unfit, other, example)


register(Channel())
register(Unstructured())
register(NMPattern())
register(BlockPattern())


def check_patterns(model: nn.Module, table: UnitTable, kept: Sequence[int]) -> int:
    """Refuse a model in which some unit's weight breaks the pattern it was cut to (an N:M group
    with more than N non-zeros, a block partly zero); returns how many layers were checked."""
    checked, broken = 0, []
    for u in table.units:
        pattern = table.strategy.pattern(table, u.index, int(kept[u.index]))
        if pattern is None:
            continue
        checked += 1
        bad = patterns.violations(model.get_submodule(u.name).weight, pattern)
        if bad:
            broken.append(f"{u.name} ({bad} groups break {pattern})")
    if broken:
        raise AutopruneError(f"{len(broken)} layer(s) do not satisfy their pattern: {', '.join(broken[:4])}")
    return checked


def granularity_of(spec: str) -> Granularity:
    """The strategy for a granularity spec: a registered name, with ``:ARG`` for those that take
    one (``nm:2:4,1:4``, ``block:4x4``)."""
    name, sep, arg = str(spec).partition(":")
    return GRANULARITIES.get(name).configure(arg if sep else None)


def build_unit_table(
    model: nn.Module,
    example: torch.Tensor,
    granularity: str = "channel",
    exclude: Sequence[str] = (),
    round_to: int = 1,
) -> UnitTable:
    """Trace ``model`` once and return its units in network order.

    Args:
        model: the dense model; it is read, never modified.
        example: one input batch (its shape fixes the feature-map sizes of the cost model).
        granularity: a granularity spec (``channel``, ``unstructured``, ``nm``, ``block:4x4``).
        exclude: module-name patterns (fnmatch) whose outputs are never pruned.
        round_to: widths are multiples of this (granularities that round).
    """
    strategy = granularity_of(granularity)
    if round_to < 1:
        raise AutopruneError(f"round_to must be >= 1, got {round_to}")
    model.eval()
    layers, other = trace_layers(model, example)
    excluded = [lay.name for lay in layers if excluded_by(lay.name, exclude)]
    table = strategy.build_table(model, example, layers, excluded, other, round_to)
    table.dense_macs = int(sum(lay.macs for lay in layers))
    table.dense_params = int(sum(lay.weight_params + lay.bias_params for lay in layers) + other)
    if not table.units:
        raise AutopruneError("the model has no prunable units (everything excluded?)")
    return table

