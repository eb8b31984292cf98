"""Reconstruction: refit every layer a policy changed, so that it reproduces the dense output.

Removing a unit's channels takes inputs away from the layers that consume them. Channel Pruning
(He et al., 2017), ThiNet (Luo et al., 2017) and AMC's engine (He et al., 2018) all follow the cut
with the same step: sample output positions on calibration images, and refit the consumer's kept
weights by least squares so that, fed the *pruned* network's inputs, it reproduces the *dense*
layer's output there. It is what keeps a one-shot pruned network close to its dense accuracy.

How ``lsq`` does it here:

* **Network order, one pass.** The pruned network runs once over the calibration images; each
  layer to refit is solved at the moment its input arrives, so it sees the real inputs of the
  pruned network with every earlier layer already refit. In the same pass each BatchNorm that does
  not sit right after a refit layer has its statistics re-estimated from the activations it now
  receives (adaptive BN), so no separate recalibration pass is needed.
* **Targets.** The dense layer's outputs at the sampled positions (the kept output channels), and
  for a layer whose output goes through a BatchNorm into a residual add, the dense *sum*: the
  target is corrected by the residual stream's drift, ``(dense sum - pruned shortcut - beta) /
  gamma * sigma + mu``, so the block's output, not just the layer's, matches the dense one. A
  BatchNorm right after a refit layer keeps the dense statistics the refit aims at. Dense targets
  are computed once per task and cached.
* **Solve.** Ridge-regularised normal equations, pulled towards the plain (selected) weights:
  ``min ||X W' - Y||^2 + lam ||W' - W0||^2`` with ``lam = ridge * mean(diag(X'X))``. The Gram
  matrix is accumulated in float32 (BLAS speed), the system solved by Cholesky in float64. A bias,
  where the layer has one, is refit as one more column.
* **Masked layers** (``unstructured`` granularity) are refit the same way, with their mask kept:
  the unconstrained solution is projected onto the mask by SparseGPT's OBS update (Frantar and
  Alistarh, 2023), so removed weights stay zero and the effective costs do not move.
* **Fallback.** A tenth of the sampled rows is held out. A layer keeps its plain weights when the
  factorisation fails, the solution is not finite, or it does not lower the error on the held-out
  rows; these fallbacks are counted in the :class:`Report`.

Depthwise and grouped convolutions are not refit (each output sees a fixed slice of inputs, so a
shrunk input removes the output with it); nor are layers called twice in one forward pass. A model
that ``torch.fx`` cannot trace is still refit, layer by layer through forward hooks, without the
residual correction; BatchNorm is then recalibrated after the pass.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from autoprune.common.registry import Registry
from autoprune.evaluate.metrics import recalibrate_bn
from autoprune.reconstruct.lsq import (
    Rows,
    in_width,
    patches,
    refittable,
    sample_rows,
    set_weight_matrix,
    solve,
    weight_matrix,
)

_ADDS = (operator.add, operator.iadd, torch.add)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class LsqConfig:
    """Settings of the least-squares refit.

    Attributes:
        rows: output positions sampled per layer, spread evenly over the calibration images.
        masked_rows: the positions a masked layer is fit on (every k-th of ``rows``): a refit under
            a mask needed fewer for the same accuracy (ResNet-56, BENCHMARKS.md), and its Gram
            matrix spans every input, so it is the dearer one.
        images: calibration images the pass runs on (the first ones); ``None``: all of them.
        ridge: the ridge weight as a fraction of the Gram matrix's mean diagonal; it pulls an
            ill-posed solve towards the plain weights instead of towards zero.
        holdout: fraction of the rows held out to check that a refit helps.
        seed: seeds the sampled positions (fixed per task, so dense targets are cached).
        downstream: also refit every layer after the first changed one, whose inputs are whole
            but have drifted from the dense network's.
    """

    rows: int = 20480
    masked_rows: int = 5120
    images: int | None = None
    ridge: float = 1e-2
    holdout: float = 0.1
    seed: int = 0
    downstream: bool = False


# Each method's refit settings; ``None`` keeps the selected weights (BatchNorm is recalibrated).
RECONSTRUCTIONS: Registry[LsqConfig | None] = Registry("reconstruction")
RECONSTRUCTIONS.register("lsq", help="least-squares refit of every layer a policy changed: inputs shrunk or "
                                     "weights masked (AMC, CP, ThiNet)")(LsqConfig())
RECONSTRUCTIONS.register("lsq-all", help="lsq, and also every later layer, against the drift of its inputs")(
    LsqConfig(downstream=True))
RECONSTRUCTIONS.register("none", help="keep the selected weights as they are; recalibrate BatchNorm only")(None)


@dataclass(frozen=True)
class LayerFit:
    """What happened to one layer: ``refit``, or ``fallback`` (its plain weights kept)."""

    name: str
    status: str
    rows: int = 0
    cols: int = 0
    residual: bool = False
    err_plain: float = float("nan")  # mean squared error on the held-out rows, plain weights
    err_refit: float = float("nan")  # the same after the refit (equal to err_plain on fallback)


@dataclass
class Report:
    """One reconstruction pass: a record per layer it refit or tried to."""

    layers: list[LayerFit] = field(default_factory=list)
    traced: bool = True
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(f.status == status for f in self.layers)

    @property
    def refit(self) -> int:
        return self.count("refit")

    @property
    def fallbacks(self) -> int:
        return self.count("fallback")


# ------------------------------------------------------------------------------------------------
# the plan: which layers can be refit, and the dense targets
# ------------------------------------------------------------------------------------------------
@dataclass
class _Site:
    """A layer that may be refit, with its dense targets at fixed positions."""

    name: str
    node: str
    in_width: int = 0  # dense input channels / features
    norm: str | None = None  # BatchNorm module right after it (keeps the dense statistics)
    norm_node: str | None = None
    add: str | None = None  # the residual add its (normalised) output flows into
    rows: Rows | None = None
    target: torch.Tensor | None = None  # dense output at rows, every output channel
    add_target: torch.Tensor | None = None  # dense sum at rows


def _changed(layer: nn.Module, site: _Site) -> bool:
    mask = getattr(layer, "weight_mask", None)
    return in_width(layer) < site.in_width or (mask is not None and not bool(mask.all()))


def _kept(dense: torch.Tensor, idx: np.ndarray | None) -> torch.Tensor:
    """Dense values at the sampled rows, in the output channels the pruned layer kept."""
    return dense if idx is None else dense[:, torch.as_tensor(idx, device=dense.device)]


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


class Reconstructor:
    """Least-squares reconstruction for one dense model and one set of calibration images.

    Args:
        dense: the dense model (read, never modified).
        candidates: names of the layers a policy can change (their inputs shrink or their weights are
            masked), in network order; with ``config.downstream``, every conv/linear layer.
        calib: calibration images (one batch; the pass runs over all of them at once).
        config: the refit's settings.
    """

    def __init__(self, dense: nn.Module, candidates: list[str], calib: torch.Tensor,
                 config: LsqConfig | None = None) -> None:
        self.config = config or LsqConfig()
        self.calib = calib[: self.config.images]
        modules = dict(dense.named_modules())
        try:
            self.graph: fx.Graph | None = fx.symbolic_trace(dense).graph
        except Exception:  # data-dependent control flow and the like: refit through hooks
            self.graph = None
        self.sites: dict[str, _Site] = {}
        if self.graph is not None:
            calls: dict[str, list[fx.Node]] = {}
            for node in self.graph.nodes:
                if node.op == "call_module":
                    calls.setdefault(node.target, []).append(node)
            for name in candidates:
                if name in modules and refittable(modules[name]) and len(calls.get(name, [])) == 1:
                    self.sites[name] = self._site(name, calls[name][0], modules)
            owners: set[str] = set()
            for site in self.sites.values():  # two branches into one add: the first one owns it
                if site.add in owners:
                    site.add = None
                owners.add(site.add)
        else:
            self.sites = {n: _Site(n, n, in_width(modules[n])) for n in candidates
                          if n in modules and refittable(modules[n])}
        self._record(dense)

    def _site(self, name: str, node: fx.Node, modules: Mapping[str, nn.Module]) -> _Site:
        site = _Site(name, node.name, in_width(modules[name]))
        nxt = _single_user(node)
        if nxt is not None and nxt.op == "call_module" and isinstance(modules.get(nxt.target), _NORMS):
            site.norm, site.norm_node = nxt.target, nxt.name
            after = _single_user(nxt)
        else:
            after = nxt
        if (after is not None and after.op == "call_function" and after.target in _ADDS
                and len(after.args) == 2 and all(isinstance(a, fx.Node) for a in after.args)):
            site.add = after.name
        return site

    @torch.no_grad()
    def _record(self, dense: nn.Module) -> None:
        """One dense pass: sample each site's positions and cache its targets there."""
        gen = torch.Generator().manual_seed(self.config.seed)
        by_node = {s.node: s for s in self.sites.values()}
        by_add = {s.add: s for s in self.sites.values() if s.add}

        def record(node_name: str, out: torch.Tensor) -> None:
            site = by_node.get(node_name)
            if site is not None:
                site.rows = sample_rows(out.shape, self.config.rows, gen).to(out.device)
                site.target = site.rows.take(out)
            site = by_add.get(node_name)
            if site is not None:
                site.add_target = site.rows.take(out)

        was_training = dense.training
        dense.eval()
        try:
            if self.graph is not None:
                _Recording(fx.GraphModule(dense, self.graph), record).run(self.calib)
            else:
                hooks = [dense.get_submodule(s.name).register_forward_hook(
                    lambda m, i, o, s=s: record(s.node, o)) for s in self.sites.values()]
                try:
                    dense(self.calib)
                finally:
                    for h in hooks:
                        h.remove()
        finally:
            dense.train(was_training)

    @torch.no_grad()
    def __call__(self, pruned: nn.Module, kept_out: Mapping[str, np.ndarray], recalibrate: bool,
                 device: str | torch.device = "cpu") -> Report:
        """Refit ``pruned`` in place (and recalibrate its BatchNorm when asked).

        Args:
            pruned: the slimmed copy of the dense model.
            kept_out: per layer whose outputs were pruned, the kept output indices (dense order).
            recalibrate: re-estimate BatchNorm statistics in the same pass.
        """
        start = time.perf_counter()
        modules = dict(pruned.named_modules())
        report = Report(traced=self.graph is not None)
        active, changed = {}, False  # sites are in network order
        for name, site in self.sites.items():  # layers whose inputs shrank or masked (and later ones)
            if name not in modules or site.rows is None:
                continue
            changed = (changed and self.config.downstream) or _changed(modules[name], site)
            if changed:
                active[name] = site
        pruned.eval()
        x = self.calib.to(device)
        if self.graph is not None:
            _Refitting(fx.GraphModule(pruned, self.graph), self, active, kept_out, recalibrate,
                       report).run(x)
        else:
            hooks = [modules[name].register_forward_pre_hook(
                lambda m, inp, s=site: self._fit(m, s, inp[0], kept_out, report, None))
                for name, site in active.items()]
            try:
                pruned(x)
            finally:
                for h in hooks:
                    h.remove()
            if recalibrate:  # adaptive BN over the same images, in one batch
                recalibrate_bn(pruned, x, len(x), device)
        report.seconds = time.perf_counter() - start
        return report

    def _fit(self, layer: nn.Module, site: _Site, x: torch.Tensor, kept_out: Mapping[str, np.ndarray],
             report: Report, correction: torch.Tensor | None) -> None:
        """Solve one layer from its input ``x`` (and, for a residual tail, the corrected target)."""
        target = correction if correction is not None else _kept(site.target, kept_out.get(site.name))
        w0, mask = weight_matrix(layer)
        rows = site.rows
        if mask is not None and len(rows.n) > self.config.masked_rows:
            step = -(-len(rows.n) // self.config.masked_rows)
            rows, target = rows.every(step), target[::step]
        cols = patches(x, layer, rows)
        if layer.bias is not None:
            cols = torch.cat([cols, torch.ones(len(cols), 1, device=cols.device)], 1)
        w, err_plain, err = solve(cols, target.to(cols.device), w0, self.config.ridge, self.config.holdout, mask)
        if w is not None:
            set_weight_matrix(layer, w)
        report.layers.append(LayerFit(site.name, "refit" if w is not None else "fallback", len(cols),
                                      cols.shape[1], correction is not None, err_plain, err))


class _Deferred:
    """Stands for a layer's output that is only computed once the layer is refit at its add."""


_DEFERRED = _Deferred()


class _Recording(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, record) -> None:
        super().__init__(gm)
        self._record_fn = record

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self._record_fn(n.name, out)
        return out


class _Refitting(fx.Interpreter):
    """The pruned pass: refit sites as their inputs arrive, re-estimate the other norms."""

    def __init__(self, gm: fx.GraphModule, rec: Reconstructor, active: dict[str, _Site],
                 kept_out: Mapping[str, np.ndarray], recalibrate: bool, report: Report) -> None:
        super().__init__(gm)
        self.rec, self.kept_out, self.report = rec, kept_out, report
        self.recalibrate = recalibrate
        self.active = active
        self.frozen_norms = {s.norm for s in active.values() if s.norm}
        self.pending = {s.add: s for s in active.values() if s.add}
        self.inputs: dict[str, torch.Tensor] = {}

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        site = self.active.get(target)
        if site is not None:
            if site.add in self.pending:  # solved at the add, once the shortcut is known
                self.inputs[target] = args[0]
                return _DEFERRED
            self.rec._fit(module, site, args[0], self.kept_out, self.report, None)
        elif args and args[0] is _DEFERRED:  # the norm between a deferred layer and its add
            return _DEFERRED
        elif (self.recalibrate and isinstance(module, _NORMS) and module.track_running_stats
              and target not in self.frozen_norms):
            # adaptive BN from the activations this norm now receives: the batch's statistics
            # become the running ones (momentum 1) in the same fused pass that normalises
            return F.batch_norm(args[0], module.running_mean, module.running_var, module.weight,
                                module.bias, True, 1.0, module.eps)
        return super().call_module(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        site = self.pending.get(self._current.name)
        if site is None or site.name not in self.inputs:
            return super().call_function(target, args, kwargs)
        layer = self.fetch_attr(site.name)
        x = self.inputs.pop(site.name)
        other = args[1] if args[0] is _DEFERRED else args[0]
        idx = self.kept_out.get(site.name)
        want = _kept(site.add_target, idx).to(other.device) - site.rows.take(other)
        if site.norm is not None:  # invert the norm: the pre-norm value that gives ``want``
            bn = self.fetch_attr(site.norm)
            sigma = torch.sqrt(bn.running_var + bn.eps)
            gamma = bn.weight if bn.weight is not None else torch.ones_like(sigma)
            beta = bn.bias if bn.bias is not None else torch.zeros_like(sigma)
            ok = gamma.abs() > 1e-6 * gamma.abs().max().clamp_min(1e-12)
            safe = torch.where(ok, gamma, torch.ones_like(gamma))
            want = torch.where(ok, (want - beta) / safe * sigma + bn.running_mean,
                               _kept(site.target, idx).to(want.device))
        self.rec._fit(layer, site, x, self.kept_out, self.report, want)
        main = layer(x)
        if site.norm is not None:
            main = self.fetch_attr(site.norm)(main)
        return main + other

    def run_node(self, n: fx.Node):
        self._current = n
        return super().run_node(n)
