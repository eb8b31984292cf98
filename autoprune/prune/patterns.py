"""Sparsity patterns finer than a channel that sparse hardware runs: N:M and RxC blocks.

Both patterns are laid out along the reduction dimension the way sparse kernels read it, with
a conv weight ``(out, in, kh, kw)`` viewed channels-last as ``(out, kh, kw, in)`` (a linear
weight is ``(out, in)``):

* **N:M** keeps ``n`` of every ``m`` consecutive input channels of each output and kernel
  position (2:4 is what sparse tensor cores accelerate). A layer takes a pattern whose ``m``
  divides its input channels per group; the others stay dense.
* **block RxC** zeroes whole tiles of ``r`` outputs by ``c`` consecutive input channels at one
  kernel position. A layer takes it where ``r`` divides its outputs and ``c`` its input channels.

Masks are built from any per-weight score (higher is kept longer): within each group of ``m``
the ``n`` best weights stay; blocks are ranked by the sum of their weights' scores (with
magnitude scores, the block's L1 norm).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from autoprune.errors import AutopruneError

# Ordered by density; rungs of equal density are both offered, the one with the smaller m wins a
# tie (2:4 over 4:8): it is the pattern kernels run, and costs cannot tell them apart.
DEFAULT_LADDER = ("8:8", "6:8", "4:8", "2:4", "2:8", "1:4", "1:8")


@dataclass(frozen=True, order=True)
class NM:
    """Keep ``n`` of every ``m`` consecutive weights along the input channels."""

    n: int
    m: int

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def dense(self) -> bool:
        return self.n == self.m

    def __str__(self) -> str:
        return "dense" if self.dense else f"{self.n}:{self.m}"


def parse_ladder(text: str | Sequence[str]) -> tuple[NM, ...]:
    """``"2:4,1:4"`` (or a list of such entries) -> the distinct sparse rungs, densest first.

    Every entry is ``N:M`` with ``0 < N <= M``; ``N == M`` is the dense rung, which every ladder
    has anyway (a unit may always stay whole)."""
    entries = [e.strip() for e in (text.split(",") if isinstance(text, str) else text)]
    rungs = []
    for entry in entries:
        match = re.fullmatch(r"(\d+):(\d+)", entry)
        if not match or not 0 < int(match[1]) <= int(match[2]):
            raise AutopruneError(f"N:M ladder entry {entry!r}: expected N:M with whole numbers "
                                 "0 < N <= M, e.g. 2:4")
        rungs.append(NM(int(match[1]), int(match[2])))
    sparse = sorted({r for r in rungs if not r.dense}, key=lambda r: (-r.density, r.m))
    if not sparse:
        raise AutopruneError(f"N:M ladder {text!r} has no sparse rung (every entry is N:N)")
    return tuple(sparse)


def ladder_text(rungs: Sequence[NM]) -> str:
    return ",".join(str(r) for r in rungs)


def parse_block(text: str) -> tuple[int, int]:
    """``"4x4"`` -> (4, 4): rows (outputs) by columns (input channels)."""
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match or int(match[1]) < 1 or int(match[2]) < 1 or int(match[1]) * int(match[2]) < 2:
        raise AutopruneError(f"block shape {text!r}: expected RxC with whole numbers, at least two "
                             "weights a block, e.g. block:4x4 or block:1x8")
    return int(match[1]), int(match[2])


def channels_last(weight: torch.Tensor) -> torch.Tensor:
    """A conv weight ``(out, in, kh, kw)`` as ``(out, kh, kw, in)``; a linear one as it is."""
    return weight.permute(0, *range(2, weight.dim()), 1) if weight.dim() > 2 else weight


def from_channels_last(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`channels_last`, for a weight of ``shape``."""
    if len(shape) <= 2:
        return t.reshape(shape)
    t = t.reshape(shape[0], *shape[2:], shape[1])
    return t.permute(0, t.dim() - 1, *range(1, t.dim() - 1)).contiguous()


def nm_mask(scores: torch.Tensor, rung: NM) -> torch.Tensor:
    """The N:M mask (same shape as ``scores``, a weight's) keeping the ``n`` best of every
    ``m`` consecutive input channels; ties go to the earlier channel."""
    if rung.dense:
        return torch.ones_like(scores)
    cl = channels_last(scores)
    groups = cl.reshape(-1, rung.m)
    # stable: among equal scores the earlier channel stays
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices
    mask = torch.zeros_like(groups)
    mask.scatter_(1, order[:, : rung.n], 1.0)
    return from_channels_last(mask.reshape(cl.shape), scores.shape)


def fits_nm(weight_shape: Sequence[int], rung: NM) -> bool:
    """A weight of this shape can take the rung: ``m`` divides its input channels."""
    return weight_shape[1] % rung.m == 0


def fits_block(weight_shape: Sequence[int], block: tuple[int, int]) -> bool:
    return weight_shape[0] % block[0] == 0 and weight_shape[1] % block[1] == 0


def block_grid(weight_shape: Sequence[int], block: tuple[int, int]) -> tuple[int, ...]:
    """The shape of a weight's grid of blocks, channels-last: ``(out/r, kh, kw, in/c)``."""
    r, c = block
    return (weight_shape[0] // r, *weight_shape[2:], weight_shape[1] // c)


def block_scores(scores: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Per block, the sum of its weights' scores, flat in grid order."""
    r, c = block
    cl = channels_last(scores)
    tiles = cl.reshape(cl.shape[0] // r, r, *cl.shape[1:-1], cl.shape[-1] // c, c)
    return tiles.sum(dim=(1, tiles.dim() - 1)).flatten()


def block_mask(keep: torch.Tensor, weight_shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    """A weight-shaped mask from a flat 0/1 mask over its blocks (grid order)."""
    r, c = block
    grid = keep.reshape(block_grid(weight_shape, block))
    cl = grid.repeat_interleave(r, dim=0).repeat_interleave(c, dim=grid.dim() - 1)
    return from_channels_last(cl, weight_shape)


def violations(weight: torch.Tensor, pattern: str) -> int:
    """How many groups (N:M) or blocks break ``pattern`` (``2:4``, ``4x4`` or ``dense``): an N:M
    group with more than ``n`` non-zeros, a block with some zeros and some not."""
    if pattern == "dense":
        return 0
    nonzero = (weight.detach() != 0).float()
    if "x" in pattern:
        r, c = parse_block(pattern)
        counts = block_scores(nonzero, (r, c))  # non-zeros per tile
        return int(((counts > 0) & (counts < r * c)).sum())
    n, m = (int(v) for v in pattern.split(":"))
    return int((channels_last(nonzero).reshape(-1, m).sum(1) > n).sum())
