from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.model.checkpoints import load_weights
from autoprune.model.zoo import MODELS, ModelSpec, build_model

LIGHT = [n for n in MODELS.names() if n not in ("resnet101", "resnet110", "densenet121", "vgg16_bn",
                                                 "resnet50", "resnet34", "mobilenet_v3_large")]


@pytest.mark.parametrize("name", LIGHT)
def test_registered_models_build_for_small_inputs(name):
    model = build_model(name, ModelSpec(num_classes=7, in_channels=3, image_size=32))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert not model.training


def test_small_input_stem_follows_the_fixture_layout():
    m = build_model("resnet18", ModelSpec(10, 3, 32))
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, nn.Identity)
    big = build_model("resnet18", ModelSpec(10, 3, 224))
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2)


def test_grayscale_input_rebuilds_the_stem():
    m = build_model("mobilenet_v2", ModelSpec(10, 1, 8))
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_user_model_by_file_path_gets_the_spec_fields_it_declares():
    m = build_model("tests/tinynets.py:mlp", ModelSpec(num_classes=4, in_channels=1, image_size=8))
    assert m(torch.randn(3, 1, 8, 8)).shape == (3, 4)


def test_user_model_by_module_path():
    m = build_model("tests.tinynets:tiny", ModelSpec(num_classes=3, in_channels=1, image_size=8))
    assert m(torch.randn(1, 1, 8, 8)).shape == (1, 3)


@pytest.mark.parametrize("name", ["resnet9000", "no.such.module:fn", "tests/tinynets.py:nothing"])
def test_unknown_models_are_user_errors(name):
    with pytest.raises(AutopruneError) as err:
        build_model(name)
    assert "\n" not in str(err.value)


def test_pretrained_offline_is_a_clear_error(monkeypatch, tmp_path):
    import urllib.error

    import torchvision.models._api as api

    def offline(*args, **kwargs):  # what torch.hub raises with no network
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(AutopruneError, match="weights file"):
        build_model("resnet18", ModelSpec(10, 3, 32, pretrained=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet56"])
def test_shared_fixtures_load_strictly(shared, name):
    model = build_model(name, ModelSpec(10, 3, 32))
    load_weights(model, shared / "models" / f"{name}_cifar10.pt")
    assert sum(p.numel() for p in model.parameters()) == {"resnet18": 11_173_962, "resnet56": 855_770}[name]
    keys = (shared / "models" / "keys.txt").read_text()
    assert all(k in keys for k in list(model.state_dict())[:5])


@pytest.mark.slow
@pytest.mark.parametrize("name,expected", [("resnet56", 0.9031), ("resnet18", 0.9117)])
def test_shared_fixtures_reproduce_their_test_accuracy(shared, cifar_dir, name, expected):
    from autoprune.data.datasets import make_splits
    from autoprune.evaluate.metrics import accuracy_on

    splits = make_splits("imagefolder", cifar_dir, search_val_size=10, calib_batches=1)
    model = build_model(name, ModelSpec(10, 3, 32))
    load_weights(model, shared / "models" / f"{name}_cifar10.pt")
    acc = accuracy_on(model, splits.test_loader(500))
    assert abs(acc - expected) <= 0.003, acc
