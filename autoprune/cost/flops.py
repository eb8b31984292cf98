"""Cost accounting: FLOPs (MACs of conv/linear layers), parameters and latency.

Three ways to know a cost, which must agree:

* dense: the traced model's own figures (:class:`UnitTable`);
* closed form: :func:`closed_form` turns per-unit kept widths into costs with arithmetic over the
  table, cheap enough to call many times inside the action wall;
* counted: :func:`count_flops` / :func:`count_params` on a real (slimmed or masked) model.

The table's granularity (:mod:`autoprune.prune.granularity`) picks the rule: :func:`slimmed_costs` and
dense counts for slimmed models, :func:`masked_costs` and effective counts for masked ones, whose
FLOPs and params are weighted by each layer's density: what a sparse kernel could save, not what
dense hardware runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autoprune.common.registry import Registry
from autoprune.units import UnitTable


@dataclass(frozen=True)
class Costs:
    """Absolute costs of one model (MACs per input sample, parameter count)."""

    flops: float
    params: float

    def ratio(self, dense: Costs) -> dict[str, float]:
        return {"flops": self.flops / dense.flops, "params": self.params / dense.params}

    def asdict(self) -> dict[str, float]:
        return asdict(self)


def dense_costs(table: UnitTable) -> Costs:
    return Costs(float(table.dense_macs), float(table.dense_params))


def closed_form(table: UnitTable, kept: np.ndarray) -> Costs:
    """Costs of the model with unit ``u`` keeping ``kept[u]`` elements, from the table alone, by
    the rule of the table's granularity."""
    return table.strategy.closed_form(table, kept)


def _layer_costs(table: UnitTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per layer: dense MACs, weight parameters, and parameters that scale with outputs alone."""
    macs = np.array([lay.macs for lay in table.layers], dtype=np.float64)
    wp = np.array([lay.weight_params for lay in table.layers], dtype=np.float64)
    bp = np.array([lay.bias_params for lay in table.layers], dtype=np.float64)
    return macs, wp, bp


def masked_costs(table: UnitTable, kept: np.ndarray) -> Costs:
    """Effective costs of a masked model: unit ``u`` is layer ``unit_layer[u]``, whose MACs and
    weights count at its density, ``kept[u]`` of ``size`` weights."""
    macs, wp, bp = _layer_costs(table)
    density = np.ones(len(table.layers))
    density[table.unit_layer] = np.asarray(kept, dtype=np.float64) / table.sizes()
    return Costs(float(macs @ density), float(wp @ density + bp.sum() + table.other_params))


def slimmed_costs(table: UnitTable, kept: np.ndarray) -> Costs:
    """Costs of a slimmed model: each layer's MACs and weights scale with its kept outputs times
    its kept inputs, its biases and norm scales with its kept outputs."""
    macs, wp, bp = _layer_costs(table)
    f_out, f_in = layer_fractions(table, np.asarray(kept, dtype=np.float64))
    return Costs(
        float(macs @ (f_out * f_in)),
        float(wp @ (f_out * f_in) + bp @ f_out + table.other_params),
    )


def layer_fractions(table: UnitTable, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the kept fraction of its outputs and of its inputs (slimmed models).

    A depthwise conv's (and a norm's) input fraction is reported as 1: its cost follows its
    outputs alone.
    """
    removed = table.sizes() - np.asarray(kept, dtype=np.float64)
    cache = table.__dict__.setdefault("_cost_cache", {})
    if "outc" not in cache:
        cache["outc"] = np.array([lay.out_channels for lay in table.layers], dtype=np.float64)
        cache["inc"] = np.array([lay.in_channels for lay in table.layers], dtype=np.float64)
        # A depthwise conv's (and a norm's) cost follows its outputs alone.
        cache["in_applies"] = np.array(
            [lay.kind in ("conv", "linear") for lay in table.layers], dtype=np.float64
        )
    f_out = 1.0 - (removed @ table.out_mult) / cache["outc"]
    f_in = 1.0 - cache["in_applies"] * (removed @ table.in_mult) / cache["inc"]
    return f_out, f_in


def cost_ratios(table: UnitTable, kept: np.ndarray) -> dict[str, float]:
    """Closed-form ``{"flops": r, "params": r}`` as fractions of the dense model."""
    return closed_form(table, kept).ratio(dense_costs(table))


# ------------------------------------------------------------------------------------------------
# counted on a real model
# ------------------------------------------------------------------------------------------------
def count_flops(model: nn.Module, example: torch.Tensor) -> float:
    """MACs per input sample counted by torch's FlopCounterMode (conv and matmul FLOPs / 2)."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example)
    return counter.get_total_flops() / 2 / example.shape[0]


def count_params(model: nn.Module, effective: bool = False) -> int:
    """Parameters of ``model``; ``effective`` counts only non-zero entries of masked weights."""
    if not effective:
        return sum(p.numel() for p in model.parameters())
    total = 0
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            mask = getattr(m, name.removesuffix("_orig") + "_mask", None) if name.endswith("_orig") else None
            total += int(mask.sum()) if mask is not None else p.numel()
    return total


def count_effective_flops(model: nn.Module, example: torch.Tensor) -> float:
    """MACs weighted by each conv/linear weight's density (masked models)."""
    total, hooks = 0.0, []

    def hook(m, inputs, out):
        nonlocal total
        w = m.weight
        density = float((w != 0).sum()) / w.numel()
        if isinstance(m, nn.Linear):
            dense = w.numel() * (out.numel() // out.shape[-1]) / example.shape[0]
        else:
            dense = out[0].numel() * w[0].numel()
        total += dense * density

    for m in model.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return total


# ------------------------------------------------------------------------------------------------
# cost models: the closed form the action wall calls many times per step
# ------------------------------------------------------------------------------------------------
class CostModel(ABC):
    """The cost of a policy as a fraction of the dense model's, from kept widths alone.

    ``ratio`` must be cheap (the action wall calls it tens of times per step) and monotone: keeping
    fewer elements of any unit never raises the cost.
    """

    metric: str

    @classmethod
    def build(cls, task, **options) -> CostModel:
        """The cost model of a :class:`~autoprune.task.PruningTask` (closed forms need only its table)."""
        return cls(task.table)

    @abstractmethod
    def ratio(self, kept: np.ndarray) -> float:
        """Predicted cost of keeping ``kept[u]`` elements of unit ``u``, relative to dense."""

    def margin(self) -> float:
        """The relative error of :meth:`ratio` the action wall should leave room for: it aims at
        ``budget / (1 + margin)``. Non-negative; 0 (the default) for a cost that is exact."""
        return 0.0


COST_MODELS: Registry = Registry("budget metric")


@COST_MODELS.register("flops", help="MACs of conv and linear layers (effective for unstructured)")
class FlopsCost(CostModel):
    metric = "flops"

    def __init__(self, table: UnitTable) -> None:
        self.table, self.dense = table, float(table.dense_macs)

    def ratio(self, kept: np.ndarray) -> float:
        return closed_form(self.table, kept).flops / self.dense


@COST_MODELS.register("params", help="parameters (non-zero ones for unstructured)")
class ParamsCost(CostModel):
    metric = "params"

    def __init__(self, table: UnitTable) -> None:
        self.table, self.dense = table, float(table.dense_params)

    def ratio(self, kept: np.ndarray) -> float:
        return closed_form(self.table, kept).params / self.dense
