"""Model registry: torchvision classifiers, CIFAR ResNets, and user models by import path.

Every factory takes the same keyword arguments (:class:`ModelSpec`) so the CLI, the env and the
tests build any registered model the same way. Inputs of 64x64 pixels or less get the usual
small-image stem (no early down-sampling), as the CIFAR fixtures in ../shared/models expect.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from autoprune.common.registry import Registry
from autoprune.errors import AutopruneError

SMALL_INPUT = 64  # inputs this size or smaller get a stride-1 stem


@dataclass(frozen=True)
class ModelSpec:
    """What a model factory needs to know about the data it will see."""

    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    pretrained: bool = False

    @property
    def small_input(self) -> bool:
        return self.image_size <= SMALL_INPUT


ModelFactory = Callable[[ModelSpec], nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


# ----------------------------------------------------------------------------------------------
# CIFAR ResNets (He et al. 2016, 6n+2 layers), the key layout of ../shared/models/README.md
# ----------------------------------------------------------------------------------------------
class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: a 16-channel stem, three stages of n BasicBlocks (16, 32, 64)."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = 16
        self.layer1 = self._stage(16, n, 1)
        self.layer2 = self._stage(32, n, 2)
        self.layer3 = self._stage(64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _cifar_resnet(depth: int) -> ModelFactory:
    def build(spec: ModelSpec) -> nn.Module:
        if spec.pretrained:
            raise AutopruneError(
                f"resnet{depth} has no published pretrained weights; give a weights file"
            )
        return CifarResNet(depth, spec.num_classes, spec.in_channels)

    build.__doc__ = f"CIFAR ResNet-{depth} (6n+2, 16/32/64 channels)"
    return build


for _depth in (20, 32, 44, 56, 110):
    MODELS.register(f"resnet{_depth}")(_cifar_resnet(_depth))


# ----------------------------------------------------------------------------------------------
# torchvision classifiers
# ----------------------------------------------------------------------------------------------
def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise ValueError("model has no Conv2d")


def _adapt_stem(model: nn.Module, spec: ModelSpec, stem_kernel: int | None = None) -> None:
    """Rebuild the first conv for the data's channel count and, for small inputs, stride 1."""
    name, conv = _first_conv(model)
    small = spec.small_input
    kernel = stem_kernel if (small and stem_kernel) else conv.kernel_size[0]
    if not small and spec.in_channels == conv.in_channels:
        return
    new = nn.Conv2d(
        spec.in_channels,
        conv.out_channels,
        kernel,
        stride=1 if small else conv.stride,
        padding=kernel // 2,
        bias=conv.bias is not None,
    )
    if kernel == conv.kernel_size[0] and spec.in_channels == conv.in_channels:
        new.weight.data.copy_(conv.weight.data)  # keep pretrained stem weights when they fit
        if conv.bias is not None:
            new.bias.data.copy_(conv.bias.data)
    model.set_submodule(name, new)


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last Linear for one with ``num_classes`` outputs when the count differs."""
    name, linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    if linear.out_features != num_classes:
        model.set_submodule(name, nn.Linear(linear.in_features, num_classes))


def _load_torchvision(arch: str, spec: ModelSpec) -> nn.Module:
    builder = getattr(torchvision.models, arch)
    if not spec.pretrained:
        return builder(num_classes=spec.num_classes)
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        model = builder(weights=weights)
    except Exception as err:  # URLError, socket errors, hash mismatch: all mean "no weights"
        raise AutopruneError(
            f"could not fetch torchvision's ImageNet weights for {arch} ({err.__class__.__name__}:"
            f" {err}); on a machine without internet give a weights file instead"
        ) from None
    _replace_head(model, spec.num_classes)
    return model


def _torchvision(arch: str, stem_kernel: int | None = None, small: Callable | None = None):
    def build(spec: ModelSpec) -> nn.Module:
        model = _load_torchvision(arch, spec)
        _adapt_stem(model, spec, stem_kernel)
        if spec.small_input and small is not None:
            small(model)
        return model

    build.__doc__ = f"torchvision {arch}, small-input stem at 64 px and below"
    return build


def _resnet_small(model: nn.Module) -> None:
    model.maxpool = nn.Identity()


def _densenet_small(model: nn.Module) -> None:
    model.features.pool0 = nn.Identity()


def _vgg_small(model: nn.Module) -> None:
    # A 32x32 image leaves 1x1 after five pools; torchvision's 7x7 pooling would copy it 49 times
    # into a 25,088-wide classifier. Pool to 1x1 and classify from 512 features instead.
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(
        nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(0.5),
        nn.Linear(512, model.classifier[-1].out_features),
    )


for _arch in ("resnet18", "resnet34", "resnet50", "resnet101"):
    MODELS.register(_arch)(_torchvision(_arch, stem_kernel=3, small=_resnet_small))
for _arch in ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0"):
    MODELS.register(_arch)(_torchvision(_arch))
for _arch in ("vgg11_bn", "vgg16_bn"):
    MODELS.register(_arch)(_torchvision(_arch, small=_vgg_small))
MODELS.register("densenet121")(_torchvision("densenet121", stem_kernel=3, small=_densenet_small))


# ----------------------------------------------------------------------------------------------
# user models: "package.module:function" or "path/to/file.py:function"
# ----------------------------------------------------------------------------------------------
def _import_user_factory(target: str) -> Callable[..., nn.Module]:
    module_name, _, attr = target.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise FileNotFoundError(module_name)
            spec = importlib.util.spec_from_file_location(path.stem, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules.setdefault(path.stem, module)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, FileNotFoundError, AttributeError) as err:
        raise AutopruneError(
            f"cannot load model {target!r} ({err.__class__.__name__}: {err}); a user model is "
            "'package.module:function' or 'file.py:function' returning an nn.Module"
        ) from None


def _call_user_factory(factory: Callable[..., nn.Module], spec: ModelSpec) -> nn.Module:
    """Call ``factory`` with whichever of the spec's fields it declares."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs = {k: v for k, v in vars(spec).items() if k in params}
    try:
        model = factory(**kwargs)
    except Exception as err:
        raise AutopruneError(f"the model factory {getattr(factory, '__name__', factory)!r} raised "
                             f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if not isinstance(model, nn.Module):
        raise AutopruneError(f"{factory!r} returned {type(model).__name__}, not an nn.Module")
    return model


def build_model(name: str, spec: ModelSpec | None = None) -> nn.Module:
    """Build the named model (registry name or ``module:function``), in eval mode, on the CPU."""
    spec = spec or ModelSpec()
    if ":" in name and name not in MODELS:
        model = _call_user_factory(_import_user_factory(name), spec)
    else:
        model = MODELS.get(name)(spec)
    return model.eval()
