"""Cost accounting: FLOPs (MACs of conv/linear layers), parameters and latency.

Three ways to know a cost, which must agree:

* dense: the traced model's own figures (:class:`UnitTable`);
* closed form: :func:`closed_form` turns per-unit kept widths into costs with arithmetic over the
  table, cheap enough to call many times inside the action wall;
* counted: :func:`count_flops` / :func:`count_params` on a real (slimmed or masked) model.

For ``unstructured`` granularity FLOPs and params are *effective*: weighted by each layer's
density, which is what a sparse kernel could save, not what dense hardware runs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autoprune.units import UnitTable

METRICS = ("flops", "params", "latency")


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
    """Costs of the model with unit ``u`` keeping ``kept[u]`` elements, from the table alone."""
    kept = np.asarray(kept, dtype=np.float64)
    macs = np.array([lay.macs for lay in table.layers], dtype=np.float64)
    wp = np.array([lay.weight_params for lay in table.layers], dtype=np.float64)
    bp = np.array([lay.bias_params for lay in table.layers], dtype=np.float64)
    removed = table.sizes() - kept
    if table.granularity == "unstructured":
        density = np.ones(len(table.layers))
        density[table.unit_layer] = kept / table.sizes()
        return Costs(float(macs @ density), float(wp @ density + bp.sum() + table.other_params))
    f_out, f_in = _fractions(table, removed)
    return Costs(
        float(macs @ (f_out * f_in)),
        float(wp @ (f_out * f_in) + bp @ f_out + table.other_params),
    )


def _fractions(table: UnitTable, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
# latency
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Latency:
    """A latency measurement: median seconds per batch over ``runs`` timed runs."""

    median_s: float
    iqr_s: float
    runs: int
    device: str
    batch_size: int
    threads: int


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    device: str = "cpu",
    batch_size: int = 1,
    threads: int | None = None,
    runs: int = 30,
    warmup: int = 5,
) -> Latency:
    """Median wall time of one forward pass over ``runs`` timed runs after ``warmup`` untimed ones.

    Each run is timed on its own (CUDA synchronised before and after), so the median and spread
    are over single forward passes, the figure a deployment sees.

    Args:
        model: the model to time (moved to ``device``; evaluated under ``no_grad``).
        input_shape: one sample's shape, with or without the batch dimension.
        device: ``cpu`` or ``cuda[:i]``.
        batch_size: images per forward pass.
        threads: intra-op threads on CPU (default: torch's current setting).
        runs: timed runs (at least 30 for a stable median).
        warmup: untimed runs first.
    """
    shape = tuple(input_shape[-3:]) if len(input_shape) >= 3 else tuple(input_shape[1:])
    before = torch.get_num_threads()
    threads = threads or before
    cuda = device.startswith("cuda")
    model = model.to(device).eval()
    x = torch.randn(batch_size, *shape, device=device)
    times = []
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for i in range(warmup + runs):
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                model(x)
                if cuda:
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    q1, q3 = np.percentile(times, [25, 75])
    return Latency(statistics.median(times), float(q3 - q1), len(times), device, batch_size, threads)
