"""Least squares on sampled feature-map positions: the building blocks of reconstruction.

Shared by :mod:`autoprune.reconstruct.refit` (the refit after a cut) and the ``thinet`` importance
criterion: sample output positions, lay a layer's input out as its weight's columns there, and
solve ridge-regularised normal equations (with a mask for masked layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def refittable(m: nn.Module) -> bool:
    """A linear layer, or a plain (ungrouped, zero-padded) 2-d convolution."""
    if isinstance(m, nn.Linear):
        return True
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def in_width(m: nn.Module) -> int:
    """A conv's input channels or a linear layer's input features."""
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


@dataclass
class Rows:
    """Sampled output positions: image index, and (h, w) for conv outputs (None for linear)."""

    n: torch.Tensor
    h: torch.Tensor | None = None
    w: torch.Tensor | None = None

    def to(self, device: torch.device) -> Rows:
        return Rows(self.n.to(device), *(None if t is None else t.to(device) for t in (self.h, self.w)))

    def every(self, step: int) -> Rows:
        """Every ``step``-th position: still spread over all the images."""
        return Rows(self.n[::step], *(None if t is None else t[::step] for t in (self.h, self.w)))

    def take(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` at these positions, as a (rows, channels) float32 matrix."""
        if self.h is None:
            return out.reshape(-1, out.shape[-1])[self.n].float()
        return out[self.n, :, self.h, self.w].float()


def sample_rows(shape: torch.Size, total: int, gen: torch.Generator) -> Rows:
    """About ``total`` output positions of an output of ``shape``, spread evenly over its images."""
    n_img = shape[0]
    if len(shape) == 4:
        hw = shape[2] * shape[3]
        per = min(hw, max(1, -(-total // n_img)))
        pick = torch.rand(n_img, hw, generator=gen).argsort(1)[:, :per].reshape(-1)
        n = torch.arange(n_img).repeat_interleave(per)
        return Rows(n, pick // shape[3], pick % shape[3])
    flat = int(np.prod(shape[:-1]))
    return Rows(torch.randperm(flat, generator=gen)[: min(flat, total)])


def patches(x: torch.Tensor, layer: nn.Module, rows: Rows) -> torch.Tensor:
    """The layer's input at the sampled positions, laid out as its weight's columns."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])[rows.n].float()
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    xp = F.pad(x, (pw, pw, ph, ph))
    hs = rows.h[:, None] * sh + torch.arange(kh, device=x.device) * dh
    ws = rows.w[:, None] * sw + torch.arange(kw, device=x.device) * dw
    patch = xp[rows.n[:, None, None], :, hs[:, :, None], ws[:, None, :]]  # (R, kh, kw, C)
    return patch.permute(0, 3, 1, 2).reshape(len(rows.n), -1).float()


def weight_matrix(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights as (out, in * k * k [+1 for the bias]) in float32, and the mask of a masked
    layer in the same layout (``None`` for a dense one)."""
    orig = getattr(layer, "weight_orig", layer.weight).detach()  # torch.nn.utils.prune's layout
    w = orig.reshape(orig.shape[0], -1).float()
    mask = getattr(layer, "weight_mask", None)
    m = None if mask is None else mask.reshape(mask.shape[0], -1).float()
    if layer.bias is not None:
        w = torch.cat([w, layer.bias.detach().float()[:, None]], 1)
        m = None if m is None else torch.cat([m, torch.ones_like(m[:, :1])], 1)
    return w, m


def set_weight_matrix(layer: nn.Module, w: torch.Tensor) -> None:
    if layer.bias is not None:
        layer.bias.data.copy_(w[:, -1].to(layer.bias.dtype))
        w = w[:, :-1]
    weight = getattr(layer, "weight_orig", layer.weight)  # a masked layer's mask applies on forward
    weight.data.copy_(w.reshape(weight.shape).to(weight.dtype))


def _project_to_mask(w: torch.Tensor, mask: torch.Tensor, chol: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The weights under ``mask`` closest to ``w`` in the metric of the inputs' Gram matrix.

    SparseGPT's column-by-column OBS update (Frantar & Alistarh, 2023) with the mask given: each
    removed weight's error is pushed onto the weights to its right through the Cholesky factor of
    the inverse Gram matrix, in blocks of columns. ``chol`` is the Gram matrix's Cholesky factor.
    """
    u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    w, m = w.double().clone(), mask.double()
    d = w.shape[1]
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        w1, u1 = w[:, i1:i2], u[i1:i2, i1:i2]  # w1 is a view: updated in place
        err = torch.zeros_like(w1)
        for i in range(i2 - i1):
            q = w1[:, i] * m[:, i1 + i]
            err[:, i] = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= err[:, i : i + 1] * u1[i : i + 1, i:]
            w1[:, i] = q
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return (w * m).float()


def solve(x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, ridge: float, holdout: float,
          mask: torch.Tensor | None = None) -> tuple[torch.Tensor | None, float, float]:
    """Refit ``w0`` (out, cols) so that ``x @ w.T`` approximates ``y`` (rows, out).

    With a ``mask`` (a masked layer) the weights it zeroes stay zero: the unconstrained solution
    is projected onto the mask by :func:`_project_to_mask`. Returns the new weights, or ``None``
    where the plain ones are kept, and the held-out mean squared errors of the plain and the
    returned weights.
    """
    n_hold = max(1, int(len(x) * holdout))
    xf, yf, xh, yh = x[:-n_hold], y[:-n_hold], x[-n_hold:], y[-n_hold:]
    plain = w0 if mask is None else w0 * mask
    err_plain = float(((xh @ plain.T - yh) ** 2).mean())
    lam = ridge * max(float(xf.pow(2).sum()) / x.shape[1], 1e-12)  # ridge * mean(diag(X'X))
    if mask is None and len(xf) < x.shape[1]:
        # fewer rows than columns (wide layers on small feature maps): the same ridge solution in
        # its dual form, W = W0 + X'(XX' + lam I)^-1 (Y - X W0'), solves rows x rows, not cols x cols
        kernel = (xf @ xf.T).double()
        kernel.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(kernel)
        if int(info) != 0:
            return None, err_plain, err_plain
        alpha = torch.cholesky_solve((yf - xf @ w0.T).double(), chol)
        w = w0 + (xf.T.double() @ alpha).T.float()
    else:
        gram = (xf.T @ xf).double()
        gram.diagonal().add_(lam)
        rhs = (xf.T @ yf).double() + lam * w0.T.double()
        chol, info = torch.linalg.cholesky_ex(gram)
        if int(info) != 0:
            return None, err_plain, err_plain
        w = torch.cholesky_solve(rhs, chol).T.float()
        if mask is not None:
            w = _project_to_mask(w, mask, chol)
    err = float(((xh @ w.T - yh) ** 2).mean())
    if not (torch.isfinite(w).all() and err < err_plain):
        return None, err_plain, err_plain
    return w, err_plain, err
