"""Tracing: every parametrised module of the dense model, in execution order, with its shape.

One forward pass with hooks records each module that holds parameters; the result, a list of
:class:`Layer`, is what the cost model and both kinds of unit table are built from.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

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
