"""2:4 layers in PyTorch's semi-structured sparse form, the one sparse tensor cores run.

NVIDIA GPUs from Ampere on multiply a matrix that keeps at most 2 of every 4 consecutive weights
along the reduction dimension at up to twice the dense rate. PyTorch reaches them through
``torch.sparse.to_sparse_semi_structured``, for the weight of a matrix product (``F.linear``) in
half precision, on CUDA only. autoprune's N:M masks already lie the way those kernels read them:
a conv weight ``(out, in, kh, kw)`` grouped along the input channels at each kernel position
(:mod:`autoprune.prune.patterns`, whose channels-last view :func:`weight_matrix` repeats, since
this module serves the runtimes, below the pruners). So a conv runs as a GEMM over *channels-last* patches, whose
reduction index is ``(kh, kw, in)``: the weight matrix ``(out, kh*kw*in)`` then keeps the groups
consecutive. Every rung with at most 2 non-zeros in each aligned group of 4 (2:4, 1:4, 2:8,
1:8) fits; 4:8 and 6:8 do not.

Which layers gain is the hardware's call: a sparse GEMM beats a dense one only on large matrices,
and building the patches costs memory traffic that cuDNN's own convolution avoids, so a user
should time both (``benchmarks/semi_structured_latency.py``). :func:`semi_structured` converts
what it can and says, layer by layer, why it left the rest dense; :func:`check_semi_structured`
compares the converted model with the masked one; the ``semi-structured`` latency runtime
(:mod:`autoprune.cost.runtimes`) times what :func:`semi_structured` makes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autoprune.errors import AutopruneError


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A conv weight ``(out, in, kh, kw)`` as the GEMM's ``(out, kh*kw*in)``, a linear one as it is."""
    w = weight.permute(0, 2, 3, 1) if weight.dim() == 4 else weight
    return w.reshape(weight.shape[0], -1)


def breaks_two_of_four(matrix: torch.Tensor) -> int:
    """How many aligned groups of 4 along a matrix's rows keep more than 2 non-zeros."""
    return int(((matrix.detach() != 0).reshape(-1, 4).sum(1) > 2).sum())


class GemmConv2d(nn.Module):
    """A ``Conv2d`` (``groups=1``, ``dilation=1``, zero padding) run as one matrix product over
    channels-last patches, so that its weight matrix ``(out, kh*kw*in)`` may be sparse.

    With a dense weight it computes what the conv does; it exists so the weight can be a
    semi-structured sparse tensor (see the module docstring)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        why = gemm_unfit(conv)
        if why:
            raise AutopruneError(f"conv cannot run as a GEMM: {why}")
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.padding = tuple(conv.padding)
        self.out_channels = conv.out_channels
        self.weight = nn.Parameter(weight_matrix(conv.weight.detach()).contiguous(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = x.permute(0, 2, 3, 1)  # NHWC: a view where x is channels_last already
        ph, pw = self.padding
        if ph or pw:
            x = F.pad(x, (0, 0, pw, pw, ph, ph))
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        if kh == kw == sh == sw == 1:
            ho, wo = x.shape[1:3]
            cols = x.reshape(n * ho * wo, -1)
        else:
            patches = x.unfold(1, kh, sh).unfold(2, kw, sw)  # (n, ho, wo, in, kh, kw)
            ho, wo = patches.shape[1:3]
            cols = patches.permute(0, 1, 2, 4, 5, 3).reshape(n * ho * wo, -1)  # reduction (kh, kw, in)
        out = F.linear(cols, self.weight, self.bias)
        return out.reshape(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)  # NCHW, channels_last in memory

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}->{self.out_channels}, kernel={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, weight={type(self.weight.data).__name__}")


def gemm_unfit(conv: nn.Conv2d) -> str | None:
    """Why ``conv`` cannot run as :class:`GemmConv2d`, or ``None``."""
    if conv.groups != 1:
        return f"groups={conv.groups}"
    if tuple(conv.dilation) != (1, 1):
        return f"dilation={tuple(conv.dilation)}"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"padding {conv.padding!r} ({conv.padding_mode})"
    return None


@dataclass(frozen=True)
class LayerReport:
    """What :func:`semi_structured` did with one conv or linear layer."""

    name: str
    rows: int  # outputs
    cols: int  # the reduction: kh*kw*in, or in
    converted: bool
    why: str = ""  # why the layer stayed as it was

    def to_dict(self) -> dict:
        return {"layer": self.name, "matrix": [self.rows, self.cols], "converted": self.converted,
                **({"why": self.why} if self.why else {})}


def require_sparse_cores(device: str | torch.device) -> torch.device:
    """The CUDA device, refused with one line where it cannot run semi-structured kernels."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise AutopruneError("2:4 semi-structured kernels need a CUDA GPU with sparse tensor cores "
                             f"(compute capability 8.0 or later); got device {str(device)!r}"
                             + ("" if torch.cuda.is_available() else ", and this machine has no CUDA GPU"))
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise AutopruneError(f"2:4 semi-structured kernels need compute capability 8.0 or later; "
                             f"{torch.cuda.get_device_name(device)} has {major}.{minor}")
    return device


def semi_structured(model: nn.Module, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                    sparse: bool = True) -> tuple[nn.Module, list[LayerReport]]:
    """A copy of ``model`` on ``device`` in ``dtype`` with every conv and linear layer whose weight
    keeps at most 2 of every 4 consecutive input channels held as a semi-structured sparse tensor.

    Layers that break 2:4 (dense ones among them), that cannot run as a GEMM, or whose matrix
    shape the kernel refuses stay as they are, each with the reason in the returned report.
    ``model`` itself is not changed. Raises :class:`AutopruneError` where ``device`` has no
    sparse tensor cores (any CPU). ``sparse=False`` turns the same convs into GEMMs with their
    dense weights, on any device: what the sparse kernels are to be timed against."""
    from torch.sparse import to_sparse_semi_structured

    if sparse:
        device = require_sparse_cores(device)
    out = copy.deepcopy(model).eval().to(device=device, dtype=dtype)
    reports = []
    for name, module in list(out.named_modules()):
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        rows = module.weight.shape[0]
        cols = module.weight[0].numel()
        why = gemm_unfit(module) if isinstance(module, nn.Conv2d) else None
        if why is None and cols % 4:
            why = f"{cols} reduction columns are not a multiple of 4"
        if why is None:
            bad = breaks_two_of_four(weight_matrix(module.weight))
            if bad:
                why = f"{bad} of {rows * cols // 4} groups of 4 keep more than 2 weights"
        if why is None:
            gemm = GemmConv2d(module) if isinstance(module, nn.Conv2d) else module
            try:
                if sparse:
                    gemm.weight = nn.Parameter(to_sparse_semi_structured(gemm.weight.detach()), requires_grad=False)
            except (RuntimeError, ValueError, NotImplementedError) as err:  # a shape the kernel refuses
                why = str(err).strip().splitlines()[0]
            else:
                out.set_submodule(name, gemm)
        reports.append(LayerReport(name, rows, cols, why is None, why or ""))
    return out, reports


def check_semi_structured(masked: nn.Module, sparse: nn.Module, example: torch.Tensor) -> float:
    """The largest difference between the two models' outputs on ``example``, relative to the
    masked model's largest output (both in the sparse model's device and dtype): what running the
    2:4 layers on sparse kernels changed."""
    param = next(sparse.parameters())
    masked = copy.deepcopy(masked).eval().to(device=param.device, dtype=param.dtype)
    x = example.to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        ref, got = masked(x).float(), sparse(x).float()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
