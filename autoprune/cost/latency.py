"""Latency: measuring it, and predicting it from kept widths for latency budgets.

:func:`measure_latency` times real forward passes; :func:`measure_ratio` times two models in
alternation and takes the median of the per-pair ratios, which stays stable (about 1%) on a
shared machine whose absolute timings drift by tens of percent between seconds.

:class:`LatencyModel` is what the action wall uses for a ``latency`` budget, since measuring a
model at every step would be far too slow. It is a lookup table in the manner of NetAdapt: every
conv/linear layer shape of the network is timed over a grid of kept input and output fractions
(minimum of repeated runs), a conv between two 1x1 convs at its full widths, so that what a
runtime pays for a width that breaks its channel blocks shows (:func:`_layer_module`); a narrower
cell is never priced dearer than a wider one. A policy's latency ratio is predicted as

    1 - a * (1 - L(kept) / L(dense)) - b * (1 - A(kept) / A(dense))

where L sums the layers' table lookups and A is the activation volume, which stands for the
memory-bound work (BatchNorm, ReLU, adds) that shrinks with output widths. The non-negative a and
b are fitted on paired measurements of real slimmed networks at a dozen policies, so the
prediction is 1 at the dense model by construction. Where the network has stages (layers of one
output resolution), ``a`` is one per stage, each on the share of the table time that stage saves:
a runtime may run a stage's cuts otherwise than its cells alone say. Everything is measured once
per (model, input shape, device, batch size, threads, runtime, torch and runtime versions) and
cached on disk as JSON.

Every timing, of a whole model or of one cell of the table, runs through a runtime
(:mod:`autoprune.cost.runtimes`: eager PyTorch, ``torch.compile``, ONNX Runtime), so a latency budget
is a budget for the runtime the model will be served with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoprune.common.fileio import atomic_write_text
from autoprune.cost.flops import COST_MODELS, CostModel, layer_fractions
from autoprune.cost.runtimes import get_runtime
from autoprune.data.datasets import default_cache_dir
from autoprune.errors import AutopruneError
from autoprune.units import Layer, UnitTable

log = logging.getLogger(__name__)

GRID = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


@dataclass(frozen=True)
class Latency:
    """A latency measurement: median seconds per batch over ``runs`` timed runs."""

    median_s: float
    iqr_s: float
    runs: int
    device: str
    batch_size: int
    threads: int
    runtime: str = "eager"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _time(fn, device: str, runs: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + runs):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _input(input_shape: tuple[int, ...], batch_size: int, device: str) -> torch.Tensor:
    shape = tuple(input_shape[-3:]) if len(input_shape) >= 3 else tuple(input_shape[1:])
    # a generator of its own: timing a model never moves the search's random stream
    return torch.randn(batch_size, *shape, generator=torch.Generator().manual_seed(0)).to(device)


def default_threads(device: str) -> int:
    """One intra-op thread on CPU: single-stream inference, the most repeatable figure."""
    return 1 if device == "cpu" else torch.get_num_threads()


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    device: str = "cpu",
    batch_size: int = 1,
    threads: int | None = None,
    runs: int = 30,
    warmup: int = 5,
    runtime: str = "eager",
) -> Latency:
    """Median wall time of one forward pass over ``runs`` timed runs after ``warmup`` untimed ones.

    Each run is timed on its own (CUDA synchronised before and after), so the median and spread
    are over single forward passes, the figure a deployment sees.

    Args:
        model: the model to time (moved to ``device``; run under ``inference_mode``).
        input_shape: one sample's shape, with or without the batch dimension.
        device: ``cpu`` or ``cuda[:i]``.
        batch_size: images per forward pass.
        threads: intra-op threads on CPU (default: torch's current setting).
        runs: timed runs (at least 30 for a stable median).
        warmup: untimed runs first.
        runtime: what runs the model, a name in :data:`~autoprune.cost.runtimes.RUNTIMES`.
    """
    engine = get_runtime(runtime)
    engine.check(device)
    before = torch.get_num_threads()
    threads = threads or before
    model = model.to(device).eval()
    x = _input(input_shape, batch_size, device)
    torch.set_num_threads(threads)
    try:
        run = engine.prepare(model, x, threads)
        with torch.inference_mode():
            times = _time(run, device, runs, warmup)
    finally:
        torch.set_num_threads(before)
    return _latency(times, device, batch_size, threads, runtime)


def _latency(times, device: str, batch_size: int, threads: int, runtime: str) -> Latency:
    q1, q3 = np.percentile(times, [25, 75])
    return Latency(statistics.median(times), float(q3 - q1), len(times), device, batch_size, threads, runtime)


def _time_pairs(run_base, run_other, device: str, pairs: int, warmup: int) -> tuple[list[float], list[float]]:
    """Seconds of ``pairs`` alternated runs of two prepared callables, after ``warmup`` untimed
    pairs: (base's, other's), pair by pair."""
    ta, tb = [], []
    for i in range(warmup + pairs):
        a = _time(run_base, device, 1, 0)[0]
        b = _time(run_other, device, 1, 0)[0]
        if i >= warmup:
            ta.append(a)
            tb.append(b)
    return ta, tb


@dataclass(frozen=True)
class PairedTimes:
    """Alternated runs of a base model and another: each one's seconds, pair by pair.

    The ratio is the median of the per-pair ratios: machine drift between seconds hits both
    runs of a pair alike. Two sessions of the same two models pool with ``+``.
    """

    base_s: tuple[float, ...]
    other_s: tuple[float, ...]
    device: str
    batch_size: int
    threads: int
    runtime: str

    @property
    def pairs(self) -> int:
        return len(self.base_s)

    @property
    def ratio(self) -> float:
        return float(statistics.median(np.asarray(self.other_s) / np.asarray(self.base_s)))

    def latencies(self) -> tuple[Latency, Latency]:
        """The base's and the other's latency (medians of their runs)."""
        return tuple(_latency(ts, self.device, self.batch_size, self.threads, self.runtime)
                     for ts in (self.base_s, self.other_s))

    def __add__(self, more: PairedTimes) -> PairedTimes:
        setting = (self.device, self.batch_size, self.threads, self.runtime)
        if setting != (more.device, more.batch_size, more.threads, more.runtime):
            raise ValueError(f"cannot pool timings of {setting} with those of {more}")
        return PairedTimes(self.base_s + more.base_s, self.other_s + more.other_s, *setting)


class RatioMeter:
    """Latency ratios of many models against one base model, whose prepared callable is kept.

    Preparing a model for a runtime is one-off work that can dwarf the timing itself (an ONNX
    export of ResNet-56 takes about 4.5 s, ``torch.compile`` about 16 s). A search measures every
    episode's pruned model against the same dense model, so the base is prepared once per (batch
    size, threads, runtime), on one input batch that every other model is then run on, and only
    the other model is prepared per measurement. (A ``compile`` base recompiles from Inductor's
    on-disk cache after another model's preparation resets Dynamo; the warm-up pairs absorb it.)

    Args:
        base: the model every ratio is relative to (moved to ``device``, in eval mode); it must
            not change while the meter is in use.
        input_shape: one sample's shape, with or without the batch dimension.
        device: ``cpu`` or ``cuda[:i]``.
    """

    def __init__(self, base: nn.Module, input_shape: tuple[int, ...], device: str = "cpu") -> None:
        self.base, self.input_shape, self.device = base, tuple(input_shape), device
        self._prepared: dict[tuple[int, int, str], tuple[torch.Tensor, object]] = {}

    def _base(self, engine, batch_size: int, threads: int) -> tuple[torch.Tensor, object]:
        key = (batch_size, threads, engine.name)
        if key not in self._prepared:
            x = _input(self.input_shape, batch_size, self.device)
            self._prepared[key] = x, engine.prepare(self.base.to(self.device).eval(), x, threads)
        return self._prepared[key]

    def measure(self, other: nn.Module, batch_size: int = 1, threads: int | None = None, pairs: int = 30,
                warmup: int = 3, runtime: str = "eager",
                more: Callable[[PairedTimes], int] | None = None) -> PairedTimes:
        """Time ``other`` against the base in ``pairs`` alternated runs after ``warmup`` pairs.

        Args:
            other: the model to compare (moved to the meter's device, in eval mode).
            batch_size, threads: what to time (threads: intra-op threads on CPU, default torch's
                current setting).
            pairs, warmup: timed and untimed pairs.
            runtime: what runs both models, a name in :data:`~autoprune.cost.runtimes.RUNTIMES`.
            more: given the first ``pairs``, how many more to time (0: none); they are pooled
                with the first, without preparing ``other`` again.
        """
        engine = get_runtime(runtime)
        engine.check(self.device)
        before = torch.get_num_threads()
        threads = threads or before
        other = other.to(self.device).eval()
        torch.set_num_threads(threads)
        try:
            x, run_base = self._base(engine, batch_size, threads)
            run_other = engine.prepare(other, x, threads)
            setting = (self.device, batch_size, threads, runtime)
            with torch.inference_mode():
                ta, tb = _time_pairs(run_base, run_other, self.device, pairs, warmup)
                times = PairedTimes(tuple(ta), tuple(tb), *setting)
                extra = more(times) if more is not None else 0
                if extra > 0:
                    ta, tb = _time_pairs(run_base, run_other, self.device, extra, warmup)
                    times = times + PairedTimes(tuple(ta), tuple(tb), *setting)
        finally:
            torch.set_num_threads(before)
        return times


def measure_ratio(base: nn.Module, other: nn.Module, input_shape: tuple[int, ...],
                  device: str = "cpu", batch_size: int = 1, threads: int | None = None,
                  pairs: int = 30, warmup: int = 3, runtime: str = "eager") -> tuple[float, Latency, Latency]:
    """Latency of ``other`` relative to ``base``: the median over ``pairs`` alternated runs, both
    run by ``runtime`` (a name in :data:`~autoprune.cost.runtimes.RUNTIMES`).

    Returns the ratio and both models' latencies (medians of their runs in the same session).
    Both models are prepared for the runtime here; to compare many models with one base, keep
    a :class:`RatioMeter`.
    """
    times = RatioMeter(base, input_shape, device).measure(other, batch_size, threads, pairs, warmup, runtime)
    return (times.ratio, *times.latencies())


# ------------------------------------------------------------------------------------------------
# the lookup-table model
# ------------------------------------------------------------------------------------------------
def _signature(layer: Layer) -> str | None:
    if layer.kind not in ("conv", "dwconv", "linear"):
        return None
    return (f"{layer.kind}:{layer.in_channels}:{layer.out_channels}:{layer.kernel}:{layer.stride}:"
            f"{layer.in_hw[0]}x{layer.in_hw[1]}")


def _layer_module(layer: Layer, cin: int, cout: int) -> tuple[nn.Module, tuple[int, ...]]:
    """One cell of the table: ``layer`` at ``cin`` inputs and ``cout`` outputs, and the input shape.

    A conv is timed in context, between two 1x1 convs that restore the layer's full widths (its
    dense neighbours' layout): a runtime that computes in channel blocks (ONNX Runtime's NCHWc
    convs on a CPU) converts a tensor whose width is not a multiple of the block to and from the
    plain layout, and that conversion, which a conv timed alone never pays, can cost more than
    the cut saves (ResNet-56's 16-channel convs cut to 12 run slower in the network than whole).
    """
    if layer.kind == "linear":
        return nn.Linear(cin, cout), (cin,)
    if layer.kind == "dwconv":
        return nn.Conv2d(cout, cout, layer.kernel, layer.stride, layer.kernel // 2, groups=cout,
                         bias=False), (cout, *layer.in_hw)
    conv = nn.Conv2d(cin, cout, layer.kernel, layer.stride, layer.kernel // 2, bias=False)
    return (nn.Sequential(nn.Conv2d(layer.in_channels, cin, 1, bias=False), conv,
                          nn.Conv2d(cout, layer.out_channels, 1, bias=False)),
            (layer.in_channels, *layer.in_hw))


def _width(n: int, f: float) -> int:
    return max(1, int(round(n * f)))


def _bilinear(arr: np.ndarray, grid: np.ndarray, fi: float, fo: float) -> float:
    rows = np.array([np.interp(fo, grid, arr[i]) for i in range(arr.shape[0])])
    return float(np.interp(fi, grid, rows))


def stages(table: UnitTable, cells: np.ndarray, least: float = 0.05) -> np.ndarray:
    """Per layer, its stage: the layers of one output resolution (a CNN's stage), numbered in the
    order they first appear. A stage with less than ``least`` of the dense table time ``cells``
    (a classifier, say) joins the stage before it; a first stage that small, the next one."""
    order = list(dict.fromkeys(lay.out_hw for lay in table.layers))
    stage = np.array([order.index(lay.out_hw) for lay in table.layers])
    share = np.bincount(stage, weights=cells, minlength=len(order)) / max(float(cells.sum()), 1e-30)
    keep = [i for i in range(len(order)) if share[i] >= least] or [0]
    # each stage that is too small joins the kept stage before it, or the first kept one
    target = {i: max([k for k in keep if k <= i], default=keep[0]) for i in range(len(order))}
    renumber = {k: j for j, k in enumerate(keep)}
    return np.array([renumber[target[i]] for i in stage])


def check_timeable(strategy) -> None:
    """Refuse a latency budget for a granularity whose cuts do not change tensor shapes (masks):
    the runtimes autoprune times run them as fast as the dense model."""
    if not strategy.physical:
        raise AutopruneError(f"a latency budget needs channel granularity: {strategy.name} masks run as "
                             "fast as dense weights on the runtimes a search times (the semi-structured "
                             "runtime times a 2:4 model at export on a GPU, not in a search); use a flops "
                             "or params budget")


@COST_MODELS.register("latency", help="measured latency, predicted by a calibrated lookup table")
@dataclass
class LatencyModel(CostModel):
    """Predicted latency ratio of a slimmed network from its kept widths (see module docstring).

    Attributes:
        luts: per layer signature, seconds over (input fraction x output fraction) of ``grid``
            (one row for depthwise convs, whose cost follows their outputs alone).
        coef: the fitted coefficients: one ``a`` per stage of :func:`stages` then ``b``, or (a, b)
            for a network of one stage (see :func:`fit_calibration`).
        dense_s: the dense model's measured latency, seconds per batch.
        fit_error: (max, mean) relative error of the fit on its calibration policies.
        runtime: what ran every timing (a name in :data:`~autoprune.cost.runtimes.RUNTIMES`).
        grid: the kept fractions the table was measured at.
        calibration: what the fit saw, for inspection: each calibration policy's kept widths and
            measured ratio, and the leave-one-out mean error of each form of the fit (see
            :func:`fit_calibration`).
        channel_block: :meth:`width_levels` keeps only multiples of it and widths narrower than
            it (the runtime's :meth:`~autoprune.cost.runtimes.Runtime.channel_block`; 1: any
            width).
    """

    table: UnitTable
    device: str
    batch_size: int
    threads: int
    luts: dict[str, list[list[float]]]
    coef: tuple[float, ...]
    dense_s: float
    fit_error: tuple[float, float]
    runtime: str = "eager"
    grid: tuple[float, ...] = GRID
    metric: str = "latency"
    calibration: dict = field(default_factory=dict, repr=False)
    channel_block: int = 1
    _sigs: list = field(default_factory=list, repr=False)

    @classmethod
    def build(cls, task, batch_size: int = 1, threads: int | None = None, progress: bool = True,
              runtime: str = "eager", auto_widths: bool = False, **options) -> LatencyModel:
        """Measured once per model, device, batch size, thread count and runtime, then read from
        the cache. ``auto_widths``: the model's table keeps only :meth:`width_levels`."""
        check_timeable(task.table.strategy)
        return build_latency_model(task.table, task.dense, task.prune, task.device, batch_size, threads,
                                   progress=progress, runtime=runtime, auto_widths=auto_widths)

    def __post_init__(self) -> None:
        self._sigs = [_signature(lay) for lay in self.table.layers]
        self._act = np.array([lay.out_channels * lay.out_hw[0] * lay.out_hw[1]
                              for lay in self.table.layers], dtype=np.float64)
        self._arrays = {k: np.asarray(v) for k, v in self.luts.items()}
        self._grid = np.asarray(self.grid)
        cells = self._cells(*layer_fractions(self.table, self.table.sizes()))
        self._l0, self._a0 = float(cells.sum()), float(self._act.sum())
        self._stage = stages(self.table, cells)
        self._dense_by_stage = np.bincount(self._stage, weights=cells)

    @property
    def staged(self) -> bool:
        """Whether the network has stages (layers of more than one output resolution)."""
        return bool(self._stage.max() > 0)

    @property
    def per_stage(self) -> bool:
        """Whether :attr:`coef` holds a table coefficient per stage (else one for the table)."""
        return len(self.coef) > 2

    def _cells(self, f_out: np.ndarray, f_in: np.ndarray) -> np.ndarray:
        """Per layer, its table time at the kept output and input fractions of
        :func:`~autoprune.cost.flops.layer_fractions` (0 for layers the table does not time)."""
        out = np.zeros(len(self._sigs))
        for i, (sig, fo, fi) in enumerate(zip(self._sigs, f_out, f_in)):
            if sig is None:
                continue
            arr = self._arrays[sig]
            out[i] = float(np.interp(fo, self._grid, arr[0])) if arr.shape[0] == 1 else \
                _bilinear(arr, self._grid, fi, fo)
        return out

    def _raw(self, kept: np.ndarray) -> tuple[float, float]:
        f_out, f_in = layer_fractions(self.table, kept)
        return float(self._cells(f_out, f_in).sum()), float(self._act @ f_out)

    def features(self, kept: np.ndarray, by_stage: bool | None = None) -> np.ndarray:
        """How much of the table time is gone, as a fraction of the dense table time (one figure,
        or one per stage of :func:`stages` with ``by_stage``; default: as :attr:`coef` is
        fitted), then how much of the activation volume is gone."""
        if by_stage is None:
            by_stage = self.per_stage
        f_out, f_in = layer_fractions(self.table, kept)  # once: the action wall prices tens of policies a step
        cells = self._cells(f_out, f_in)
        if by_stage:
            dense = self._dense_by_stage
            gone = (dense - np.bincount(self._stage, weights=cells, minlength=len(dense))) / self._l0
        else:
            gone = np.array([1.0 - cells.sum() / self._l0])
        return np.append(gone, 1.0 - float(self._act @ f_out) / self._a0)

    def ratio(self, kept: np.ndarray) -> float:
        return 1.0 - float(np.dot(self.coef, self.features(kept)))

    def refit(self, kept: Sequence[np.ndarray], measured: Sequence[float]) -> LatencyModel:
        """This table with its coefficients fitted again, in the form they were fitted in (one, or
        one per stage), on its calibration policies and the policies of widths ``kept``, measured
        at latency ratios ``measured``, each policy weighing alike.

        A search's own episodes correct the table where the policies it plays differ from the
        calibration's: on ResNet-56 at ONNX Runtime batch 64 the table's fit priced the one-shot
        rules that cut only inner convs 5-7 % dear and some stream cuts 5-9 % cheap. Refitted on
        every episode measured before it, 2 of 148 episodes of four searches measured more than
        3 % over the refit table's figure, against 8 over the table scaled by the median of
        measured over predicted latency (BENCHMARKS.md, "The table refit on the search's own
        episodes", where searches steered by the refit are measured too)."""
        cal = self.calibration
        policies = [np.asarray(k) for k in cal.get("kept", [])] + [np.asarray(k) for k in kept]
        ratios = np.concatenate([np.asarray(cal.get("measured", []), dtype=np.float64),
                                 np.asarray(measured, dtype=np.float64)])
        if len(ratios) < len(self.coef):
            return self  # fewer policies than coefficients: nothing to fit
        features = np.array([self.features(k, self.per_stage) for k in policies])
        return replace(self, coef=tuple(float(c) for c in _fit(features, ratios)))

    def width_levels(self, min_step: float = 0.02) -> tuple[tuple[tuple[int, None], ...], ...]:
        """Per unit, the widths the runtime rewards (``--round-to auto``): of the table's grid
        widths that are multiples of :attr:`channel_block` or narrower than one block, ascending,
        those at which the table says the unit's layers run faster than at the next wider width
        kept, by more than ``min_step`` of what the unit saves at its narrowest width (a step below
        that is timing noise); always ending at the whole unit. A unit whose layers save nothing at any width
        keeps only its whole width. In the form of :attr:`~autoprune.units.UnitTable.levels`, with
        no pattern.

        The block is kept apart from the table because a cell is one layer between dense
        neighbours, where a width off the block costs one layout conversion; in the network such
        a width also unfuses what follows it (a residual add), which no cell times. A width
        narrower than one block is kept all the same: a tensor that narrow has no blocked layout
        to lose, and it buys time in the network. On an AVX-512 CPU (block 16) at batch 1,
        ResNet-56 with every stage-1 inner conv at 4 of 16 measured 0.90 of dense, and with the
        stage-2 inner convs at 8 of 32 as well and stage 3's at 48 of 64, 0.64 at 84.29 % on test,
        where the searches on multiples of 16 alone reached 76-77 % at 0.69 (BENCHMARKS.md)."""
        out = []
        dense = self.table.sizes()
        for u, unit in enumerate(self.table.units):
            widths = sorted({w for w in (_width(unit.size, f) for f in self._grid)
                             if w == unit.size or w % self.channel_block == 0 or w < self.channel_block},
                            reverse=True)
            saved = {}
            for w in widths:
                kept = dense.copy()
                kept[u] = w
                saved[w] = self._l0 - self._raw(kept)[0]
            most = max(saved.values())
            levels, last = [unit.size], saved[unit.size]
            for w in widths[1:]:
                if most > 0 and saved[w] - last > min_step * most:
                    levels.append(w)
                    last = saved[w]
            out.append(tuple((w, None) for w in sorted(levels)))
        return tuple(out)

    def margin(self) -> float:
        """The table's mean relative fit error on its calibration policies (never below 0).

        The mean rather than the maximum: the maximum of a dozen policies is the noisiest figure
        the fit gives and would cut every episode's latency by the worst case. An episode counts
        as within a latency budget up to 3 % over it, so aiming the mean error lower covers
        errors up to about ``(1 + mean) * 1.03 - 1``, near the maximum the fit sees (ResNet-56 on
        a CPU: mean 2.9 %, max 6.4 %, covered up to 6 %).
        """
        return max(0.0, float(self.fit_error[1]))

    @classmethod
    def from_json(cls, table: UnitTable, data: dict) -> LatencyModel:
        """The model :meth:`to_json` wrote (as the cache keeps it), over ``table``."""
        return cls(table, data["device"], data["batch_size"], data["threads"], data["luts"], tuple(data["coef"]),
                   data["dense_s"], tuple(data["fit_error"]), data["runtime"], tuple(data["grid"]),
                   calibration=data.get("calibration", {}), channel_block=int(data.get("channel_block", 1)))

    def to_json(self) -> dict:
        return {"device": self.device, "batch_size": self.batch_size, "threads": self.threads,
                "runtime": self.runtime, "luts": self.luts, "coef": list(self.coef), "dense_s": self.dense_s,
                "fit_error": list(self.fit_error), "grid": list(self.grid), "calibration": self.calibration,
                "channel_block": self.channel_block}


def _cache_key(table: UnitTable, device: str, batch_size: int, threads: int, runtime: str,
               grid: tuple[float, ...], auto_widths: bool = False, channel_block: int = 1) -> str:
    shape = "|".join(f"{lay.name}:{_signature(lay)}" for lay in table.layers)
    units = "|".join(f"{u.name}:{u.size}" for u in table.units)
    version = get_runtime(runtime).version()
    # the width multiple shapes the calibration models (kept_all rounds), so it shapes the fit: a
    # table calibrated on widths in multiples of 16 under-predicts odd widths on ONNX Runtime
    key = (f"v5#{shape}#{units}#{table.input_shape}#{device}#{batch_size}#{threads}#{torch.__version__}"
           f"#{runtime}#{version}#{list(grid)}#{table.multiple}")
    if auto_widths:  # "sub": the widths narrower than one block are kept too (from 2026-12-07)
        key += f"#auto#b{channel_block}#sub"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def _measure_luts(table: UnitTable, device: str, batch_size: int, threads: int, runs: int, progress: bool,
                  runtime: str = "eager", grid: tuple[float, ...] = GRID) -> dict:
    """Seconds of every distinct conv/linear layer over the grid (torch's threads already set)."""
    from tqdm.auto import tqdm

    engine = get_runtime(runtime)
    sigs = {}
    for lay in table.layers:
        sig = _signature(lay)
        if sig is not None and sig not in sigs:
            sigs[sig] = lay
    luts = {}
    for sig, lay in tqdm(sigs.items(), desc="latency table", disable=not progress, leave=False):
        in_grid = (1.0,) if lay.kind == "dwconv" else grid
        rows = []
        for fi in in_grid:
            row = []
            for fo in grid:
                module, shape = _layer_module(lay, _width(lay.in_channels, fi), _width(lay.out_channels, fo))
                module = module.to(device).eval()
                x = torch.randn(batch_size, *shape, device=device)
                run = engine.prepare_layer(module, x, threads)
                with torch.inference_mode():
                    # the minimum is the run least disturbed by the rest of the machine
                    row.append(min(_time(run, device, runs, 2)))
            rows.append(row)
        luts[sig] = cheapest_of_wider(np.asarray(rows)).tolist()
    return luts


def cheapest_of_wider(cells: np.ndarray) -> np.ndarray:
    """A table's cells (input fraction x output fraction, both increasing) with each cell the least
    of itself and every cell at least as wide on both axes.

    A narrower cell is then never priced dearer than a wider one, which the action wall assumes
    (narrowing never costs time), and a width the runtime runs slower in context (a channel block
    broken) is priced as the wider width: it buys nothing. Timing noise cannot make a narrow cell
    dear either.
    """
    flipped = np.asarray(cells)[::-1, ::-1]
    return np.minimum.accumulate(np.minimum.accumulate(flipped, axis=1), axis=0)[::-1, ::-1]


def _read_cache(path: Path, runtime: str) -> dict | None:
    """The cached table, or None if absent, unreadable or another runtime's (then it is measured
    again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = {"luts", "coef", "dense_s", "fit_error", "grid"} <= set(data) and data.get("runtime") == runtime
    return data if ok else None


def build_latency_model(table: UnitTable, dense: nn.Module, prune, device: str = "cpu",
                        batch_size: int = 1, threads: int | None = None, cache_dir: Path | None = None,
                        progress: bool = True, calibration_policies: int = 12, runtime: str = "eager",
                        grid: tuple[float, ...] = GRID, auto_widths: bool = False,
                        channel_block: int | None = None) -> LatencyModel:
    """Measure (or load from the cache) the latency model of ``dense``.

    Args:
        table: the dense model's unit table (channel granularity).
        dense: the dense model.
        prune: ``kept -> slimmed model`` (the task's pruner), for calibration measurements.
        device, batch_size, threads: what the latency is measured for (threads default to 1 on
            CPU, see :func:`default_threads`).
        cache_dir: where the JSON table is kept (default: the autoprune cache dir).
        progress: show a progress bar while measuring.
        calibration_policies: slimmed models measured to fit the coefficients (at least the four
            uniform ones).
        runtime: what runs every timing, a name in :data:`~autoprune.cost.runtimes.RUNTIMES`.
        grid: the increasing kept fractions, ending at 1, each layer is timed at (per axis).
        auto_widths: the model's table keeps only the widths at which the runtime gets faster
            (:meth:`LatencyModel.width_levels`, read from the layer timings before the fit), and
            the coefficients are fitted on policies of those widths.
        channel_block: under ``auto_widths``, the widths kept are multiples of it or narrower than
            it (default: the runtime's :meth:`~autoprune.cost.runtimes.Runtime.channel_block` on
            ``device``).
    """
    get_runtime(runtime).check(device)
    grid = tuple(float(f) for f in grid)
    if not grid or grid[-1] != 1.0 or any(a >= b for a, b in zip(grid, grid[1:])):
        raise ValueError(f"a latency grid increases to 1.0, got {grid}")
    threads = threads or default_threads(device)
    block = (channel_block or get_runtime(runtime).channel_block(device)) if auto_widths else 1
    key = _cache_key(table, device, batch_size, threads, runtime, grid, auto_widths, block)
    path = (cache_dir or default_cache_dir()) / "latency" / f"{key}.json"
    cached = _read_cache(path, runtime)
    if cached is not None:
        model = LatencyModel.from_json(table, cached)  # the key holds device, batch, threads and runtime
        seen = model.calibration
        if seen.get("kept") and model.per_stage != model.staged:
            # fitted in the other form (before bfb435e): fitted again as this version fits, on
            # the measurements the cache keeps; a table in this form is read as it is
            model = fit_calibration(model, seen["kept"], seen["measured"])
            atomic_write_text(path, json.dumps(model.to_json()))
        return _with_width_levels(model) if auto_widths else model
    # said even without progress bars (-q): the table takes minutes before the first episode
    log.warning("note: measuring a latency table for this model (%s on %s, batch %d, %d thread(s)) once; "
                "cached at %s", runtime, device, batch_size, threads, path)
    started = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        luts = _measure_luts(table, device, batch_size, threads, 12, progress, runtime, grid)
    finally:
        torch.set_num_threads(before)
    uncalibrated = LatencyModel(table, device, batch_size, threads, luts, (1.0, 0.0), 1.0, (0.0, 0.0), runtime, grid,
                                channel_block=block)
    if auto_widths:  # calibrated on the widths it will predict
        uncalibrated = _with_width_levels(uncalibrated)
    result = _calibrate(uncalibrated, dense, prune, calibration_policies, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result.to_json()))
    log.warning("note: latency table of %d layer shapes and %d calibration models measured in %.0f s; "
                "predicted ratios within %.1f%% of measured ones (mean %.1f%%, %s)", len(luts),
                len(result.calibration["measured"]), time.perf_counter() - started,
                100 * result.fit_error[0], 100 * result.fit_error[1],
                "a coefficient per stage" if result.per_stage else "one table coefficient")
    return result


def _with_width_levels(model: LatencyModel) -> LatencyModel:
    """``model`` over a copy of its table whose levels are :meth:`LatencyModel.width_levels`."""
    return replace(model, table=replace(model.table, levels=model.width_levels()))


def _calibrate(model: LatencyModel, dense: nn.Module, prune, policies: int, progress: bool) -> LatencyModel:
    """``model`` with its coefficients fitted (:func:`fit_calibration`) on real slimmed networks,
    each timed in alternation with the dense model: the four uniform levels, random policies up to
    ``policies``, and where the network has several stages (:func:`stages`), each stage cut alone
    at two levels."""
    from tqdm.auto import tqdm

    table = model.table
    sparsities = calibration_sparsities(model, policies)
    kept_all, measured, dense_times = [], [], []
    meter = RatioMeter(dense, table.input_shape, model.device)  # the dense model is prepared once
    for sparsity in tqdm(sparsities, desc="latency calibration", disable=not progress, leave=False):
        kept = table.kept_all(sparsity)
        times = meter.measure(prune(kept), model.batch_size, model.threads, pairs=20, runtime=model.runtime)
        kept_all.append(kept)
        measured.append(times.ratio)
        dense_times.append(times.latencies()[0].median_s)
    return fit_calibration(replace(model, dense_s=float(np.median(dense_times))), kept_all, measured)


def fit_calibration(model: LatencyModel, kept: Sequence[np.ndarray], measured: Sequence[float],
                    by_stage: bool | None = None) -> LatencyModel:
    """``model`` with its coefficients fitted on calibration policies of widths ``kept``, measured
    at latency ratios ``measured``: one table coefficient per stage of :func:`stages` where the
    network has several (or as ``by_stage`` says), else one for the whole table (then the
    activation coefficient).

    A runtime may run one stage's cuts faster or slower than the table's cells say, and the
    stage's own coefficient takes that up. It is kept even where the calibration's own
    leave-one-out error does not favour it: the calibration's random policies are unlike the
    policies a search plays. Replayed on the 629 measured episodes of 17 searches (ResNet-56 and
    ResNet-18 on ONNX Runtime at batches 1 and 64), the per-stage fit predicted each model's and
    batch's episodes at least as well as one coefficient did. On ResNet-56 at batch 1, where the
    calibration's leave-one-out error favoured it by only 9 % (4.8 % against 5.2 %), it cut the
    mean error on the episodes from 6.1 % to 3.8 %, and those measured more than 3 % over their
    price from 42 to 5 of 185 (BENCHMARKS.md, "The latency table's form").

    The leave-one-out errors of both forms are kept in :attr:`LatencyModel.calibration`, and
    :attr:`LatencyModel.fit_error` is the kept fit's error on its own policies.
    """
    y = np.asarray(measured, dtype=np.float64)
    kept = [np.asarray(k) for k in kept]

    def loo(X: np.ndarray) -> float:
        """The mean leave-one-out relative error of the fit on features ``X``."""
        errors = []
        for i in range(len(y)):
            rest = np.arange(len(y)) != i
            errors.append(abs((1.0 - X[i] @ _fit(X[rest], y[rest])) / y[i] - 1.0))
        return float(np.mean(errors))

    forms = {name: np.array([model.features(k, by_stage) for k in kept])
             for name, by_stage in (("one", False), ("per_stage", True))}
    if by_stage is None:
        by_stage = model.staged
    X = forms["per_stage" if by_stage else "one"]
    coef = _fit(X, y)
    errors = np.abs((1.0 - X @ coef) / y - 1.0)
    seen = {"kept": [[int(w) for w in k] for k in kept], "measured": [float(r) for r in y],
            "loo_error": {name: loo(F) for name, F in forms.items()}}
    return replace(model, coef=tuple(float(c) for c in coef),
                   fit_error=(float(errors.max()), float(errors.mean())), calibration=seen)


def _fit(features: np.ndarray, ratios: np.ndarray) -> np.ndarray:
    """Non-negative coefficients ``c`` with ``1 - features @ c`` nearest the measured latency
    ratios ``ratios`` (least squares): what is gone of the table time and the activations buys
    time, never costs it."""
    from scipy.optimize import nnls

    return nnls(features, 1.0 - ratios)[0]


def calibration_sparsities(model: LatencyModel, policies: int) -> list[np.ndarray]:
    """The per-unit sparsities :func:`_calibrate` measures: the four uniform levels, random ones up
    to ``policies``, then each stage's own units cut alone at 0.5 and 0.75 where there are stages."""
    table = model.table
    rng = np.random.default_rng(0)
    n = len(table.units)
    sparsities = [np.full(n, s) for s in (0.2, 0.4, 0.6, 0.8)]
    sparsities += [rng.uniform(0.0, 0.8, n) for _ in range(max(0, policies - len(sparsities)))]
    if model.staged:
        for units in _stage_units(table, model._stage):
            for s in (0.5, 0.75):
                sparsity = np.zeros(n)
                sparsity[units] = s
                sparsities.append(sparsity)
    return sparsities


def _stage_units(table: UnitTable, stage: np.ndarray) -> list[list[int]]:
    """Per stage, the units whose every layer (what their channels are outputs or inputs of) is
    in that stage: the ones a cut of that stage alone narrows."""
    touched = (table.out_mult != 0) | (table.in_mult != 0)
    out: list[list[int]] = [[] for _ in range(int(stage.max()) + 1)]
    for u in range(len(table.units)):
        where = set(stage[touched[u]].tolist())
        if len(where) == 1:
            out[where.pop()].append(u)
    return [units for units in out if units]
