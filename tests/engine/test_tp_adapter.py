"""The Torch-Pruning adapter: fails loudly, saying what moved, when an upgrade breaks what it uses.

Every name ``autoprune.units.tp_adapter`` relies on is checked to exist, and the internals it reads (group
items' ``root_idxs``, a dependency's handler and target, a handler's ``pruning_dim``) are checked
to behave, on a conv-BN-conv residual block with a bare parameter, where the coupling is known.
"""

from __future__ import annotations

import copy
import operator

import numpy as np
import pytest
import torch
from torch import nn

from autoprune.units import tp_adapter

WIDTH = 8
ORDER = ["conv1", "conv2", "conv3"]


def _changed(what: str) -> str:
    return (f"Torch-Pruning {tp_adapter.version()} changed {what}; autoprune/units/tp_adapter.py relies on it "
            "(see its docstring): adapt the adapter, or pin torch-pruning below this version")


class ResBlock(nn.Module):
    """conv1-bn1 feeds conv2-bn2 (scaled by a bare parameter) and the residual add; conv3 reads the
    sum. conv1, bn1, conv2's outputs, bn2 and the scale are coupled; conv2's and conv3's inputs
    shrink with them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTH, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTH)
        self.conv2 = nn.Conv2d(WIDTH, WIDTH, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(WIDTH)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, WIDTH).view(1, WIDTH, 1, 1))
        self.conv3 = nn.Conv2d(WIDTH, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(self.conv1(x)))
        b = self.bn2(self.conv2(a)) * self.scale
        return self.fc(self.conv3(torch.relu(a + b)).mean((2, 3)))


@pytest.fixture
def block() -> ResBlock:
    torch.manual_seed(0)
    model = ResBlock().eval()
    with torch.no_grad():  # non-trivial statistics, so a wrong BN slice shows in the outputs
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model


@pytest.mark.parametrize("name", tp_adapter.RELIED_ON)
def test_every_relied_on_name_exists(name):
    import torch_pruning as tp

    try:
        operator.attrgetter(name)(tp)
    except AttributeError:
        pytest.fail(_changed(f"torch_pruning.{name} (it is gone or moved)"))


def test_a_handler_is_a_pruning_function_with_a_pruning_dim(block):
    import torch_pruning as tp

    for c in _groups(block)["conv1"].couplings:
        owner = getattr(c.handler, "__self__", None)
        assert isinstance(owner, tp.pruner.function.BasePruningFunc), \
            _changed(f"what a dependency's handler is (got {c.handler!r} for {c.target})")
        assert hasattr(owner, "pruning_dim"), _changed("BasePruningFunc.pruning_dim")


def _groups(block):
    try:
        groups = tp_adapter.channel_groups(block, torch.randn(1, 3, 6, 6), ignored=["fc"])
    except AttributeError as err:
        pytest.fail(_changed(f"the dependency graph's groups, items or dependencies ({err})"))
    # keyed by the group's first conv in network order (the graph may root it elsewhere)
    return {min((c.target for c in g.couplings if c.target.startswith("conv")), key=ORDER.index): g
            for g in groups}


def test_groups_couple_the_residual_and_name_every_module(block):
    groups = _groups(block)
    assert set(groups) == {"conv1", "conv3"}, _changed(f"which groups get_all_groups yields: {set(groups)}")
    g = groups["conv1"]
    assert g.size == WIDTH, _changed("the size of a group (len(group[0].idxs))")
    got = {(c.target, c.is_param, c.is_out, c.is_in) for c in g.couplings}
    want = {("conv1", False, True, False), ("bn1", False, True, True), ("conv2", False, True, False),
            ("bn2", False, True, True), ("scale", True, True, True), ("conv2", False, False, True),
            ("conv3", False, False, True)}
    assert got == want, _changed(f"the members of a residual group or their in/out pruning functions: {got}")
    for c in g.couplings:
        assert c.target_idxs.tolist() == list(range(WIDTH)), _changed(f"a full group's indices ({c.target})")
        assert c.root_idxs.tolist() == list(range(WIDTH)), _changed(f"item.root_idxs ({c.target})")
    assert {(c.target, c.is_out, c.is_in) for c in groups["conv3"].couplings} == \
        {("conv3", True, False), ("fc", False, True)}, _changed("the group of a conv feeding a linear layer")


def test_cutting_one_channel_slims_every_coupled_tensor(block):
    g = _groups(block)["conv1"]
    x = torch.randn(2, 3, 6, 6)
    # Silence channel 3 where it is read (conv2's and conv3's inputs): the cut model must then
    # give exactly the dense model's outputs.
    with torch.no_grad():
        block.conv2.weight[:, 3] = 0
        block.conv3.weight[:, 3] = 0
        want = block(x)
    pruned = copy.deepcopy(block)
    for c in g.couplings:
        try:
            tp_adapter.cut(pruned, c.target, c.handler, c.pruning_dim, c.is_param, [3])
        except AttributeError as err:
            pytest.fail(_changed(f"how a handler cuts one dimension ({c.target}: {err})"))
    shapes = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    w = WIDTH - 1
    assert shapes["conv1.weight"] == (w, 3, 3, 3) and shapes["conv2.weight"] == (w, w, 3, 3), \
        _changed(f"a conv's out/in channel pruning ({shapes})")
    assert shapes["bn1.running_mean"] == (w,) and pruned.bn2.num_features == w, \
        _changed(f"BatchNorm pruning ({shapes})")
    assert shapes["scale"] == (1, w, 1, 1) and isinstance(pruned.scale, nn.Parameter), \
        _changed("how a bare parameter is pruned (handler(parameter, idxs) returns the new one)")
    assert shapes["conv3.weight"] == (4, w, 1, 1), _changed("a consumer's input pruning")
    with torch.no_grad():
        assert torch.allclose(pruned(x), want, atol=1e-5), _changed("which indices a handler removes")


@pytest.mark.parametrize("scorer", ["magnitude_l1", "magnitude_l2", "bn_scale", "fpgm", "taylor"])
def test_each_group_importance_scores_every_root_channel(block, scorer):
    make = {"magnitude_l1": lambda: tp_adapter.magnitude_scorer(1),
            "magnitude_l2": lambda: tp_adapter.magnitude_scorer(2),
            "bn_scale": tp_adapter.bn_scale_scorer, "fpgm": tp_adapter.fpgm_scorer,
            "taylor": tp_adapter.taylor_scorer}[scorer]
    g = _groups(block)["conv1"]
    if scorer == "taylor":
        block(torch.randn(4, 3, 6, 6)).pow(2).sum().backward()
    if scorer == "magnitude_l1":  # channel 5 has the smallest weights everywhere it is coupled
        with torch.no_grad():
            for t in (block.conv1.weight[5], block.conv2.weight[5], block.conv2.weight[:, 5],
                      block.conv3.weight[:, 5]):
                t.mul_(1e-3)
    scores = make()(g)
    assert isinstance(scores, torch.Tensor) and scores.shape == (WIDTH,), \
        _changed(f"what a group importance returns ({type(scores).__name__} "
                 f"{getattr(scores, 'shape', '')})")
    assert torch.isfinite(scores).all(), _changed("group importance values")
    if scorer == "magnitude_l1":
        assert int(np.argmin(scores.detach().numpy())) == 5, _changed("GroupMagnitudeImportance's scores")


def test_a_model_whose_channels_torch_pruning_cannot_trace_is_one_clear_error():
    """ShuffleNet's channel shuffle breaks Torch-Pruning's tracer (a ZeroDivisionError inside it):
    the user gets one line naming the way out, and a weight granularity prunes the same model."""
    import torchvision

    import autoprune
    from autoprune.errors import AutopruneError

    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(AutopruneError, match="could not trace this model's channel dependencies") as err:
        autoprune.inspect(model, x)
    assert "'unstructured' or 'nm'" in str(err.value) and "\n" not in str(err.value)
    assert len(autoprune.inspect(model, x, granularity="unstructured").table.units) == 57
