from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from autoprune.cost.flops import closed_form, count_flops, count_params, dense_costs
from autoprune.model.zoo import ModelSpec, build_model
from autoprune.prune.granularity import build_unit_table
from autoprune.prune.importance import IMPORTANCE, rank_units
from autoprune.prune.pruners import pruner_for
from autoprune.units.policy import Policy
from tests.tinynets import tiny

MODELS_32 = ["resnet20", "resnet18", "mobilenet_v2", "vgg11_bn", "mobilenet_v3_small",
             "efficientnet_b0"]


def _setup(name, granularity="channel", round_to=1):
    if name == "tiny":
        model, x = tiny(), torch.randn(1, 1, 8, 8)
    else:
        model, x = build_model(name, ModelSpec(10, 3, 32)), torch.randn(1, 3, 32, 32)
    table = build_unit_table(model, x, granularity, round_to=round_to)
    return model, x, table


@pytest.mark.parametrize("name", ["tiny"] + MODELS_32)
def test_closed_form_matches_counted_costs(name):
    model, x, table = _setup(name)
    d = dense_costs(table)
    assert d.flops == pytest.approx(count_flops(model, x), rel=1e-6)
    assert d.params == count_params(model)
    ranks = rank_units(table, model, "l1")
    rng = np.random.default_rng(0)
    for trial in range(3):
        sparsity = rng.uniform(0, 0.8, len(table.units)) if trial else np.full(len(table.units), 0.5)
        kept = Policy(dict(zip(table.names, sparsity.tolist()))).kept(table)
        pruned = pruner_for(table).apply(model, table, ranks, kept)
        closed = closed_form(table, kept)
        assert closed.flops == pytest.approx(count_flops(pruned, x), rel=0.01)
        assert closed.params == pytest.approx(count_params(pruned), rel=0.01)
        assert pruned(x).shape == model(x).shape


def test_units_follow_coupling_in_tiny_net():
    _, _, table = _setup("tiny")
    by_name = {u.name: u for u in table.units}
    # stem and the residual block's last conv are joined by the add: one unit
    assert "block.3" in by_name["stem.0"].members
    assert "block.3" not in by_name
    # the concat's consumer takes inputs from both branches
    assert "head.0" in by_name["branch_a.0"].consumers and "head.0" in by_name["branch_b.0"].consumers
    # the classifier's outputs are never a unit
    assert "fc" not in by_name and all("fc" not in u.members for u in table.units)
    assert [u.index for u in table.units] == list(range(len(table.units)))


def test_exclude_patterns_drop_units():
    model, x, _ = _setup("tiny")
    table = build_unit_table(model, x, exclude=("branch_*",))
    assert not any(u.name.startswith("branch_") for u in table.units)


def test_pristine_model_is_untouched():
    model, x, table = _setup("resnet20")
    before = copy.deepcopy(model.state_dict())
    ranks = rank_units(table, model, "taylor", calib=_calib(x))
    for g in ("channel", "unstructured"):
        t = build_unit_table(model, x, g)
        r = rank_units(t, model, "l1")
        pruner_for(t).apply(model, t, r, Policy.uniform(t, 0.5).kept(t))
    pruner_for(table).apply(model, table, ranks, Policy.uniform(table, 0.7).kept(table))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def _calib(x):
    from autoprune.data.datasets import TensorSplit

    return TensorSplit(torch.randn(8, *x.shape[1:]), torch.randint(0, 10, (8,)))


@pytest.mark.parametrize("importance", IMPORTANCE.names())
def test_every_importance_ranks_every_unit(importance):
    model, x, table = _setup("tiny")
    ranks = rank_units(table, model, importance, calib=_calib(x))
    for u, r in zip(table.units, ranks):
        assert sorted(r.tolist()) == list(range(u.size))


def test_thinet_removes_first_the_channel_its_consumer_ignores():
    """block.3 gives channel 5 of block.0 zero weight: that channel costs its output nothing, however
    large its own filter (which is what magnitude criteria look at)."""
    model, x, table = _setup("tiny")
    with torch.no_grad():
        model.block[3].weight[:, 5] = 0
        model.block[0].weight[5] *= 100
    ranks = rank_units(table, model, "thinet", calib=_calib(x))
    assert ranks[table.index_of("block.0")][0] == 5
    assert rank_units(table, model, "l1")[table.index_of("block.0")][-1] == 5


def test_l1_removes_the_smallest_filters_first():
    model, x, table = _setup("tiny")
    u = table.index_of("branch_b.0")
    with torch.no_grad():
        model.branch_b[0].weight[3].mul_(1e-3)
        model.head[0].weight[:, 16 + 3].mul_(1e-3)
    ranks = rank_units(table, model, "l1")
    assert ranks[u][0] == 3


def test_round_to_and_minimum_width():
    _, _, table = _setup("resnet18", round_to=8)
    u = table.units[0]  # 64 channels
    assert table.kept(0, 0.5) == 32 and table.kept(0, 0.55) % 8 == 0
    assert table.kept(0, 0.99) == 8  # never below round_to (or one channel)
    assert table.kept(0, 1 - table.kept(0, 0.37) / u.size) == table.kept(0, 0.37)


def test_unstructured_costs_are_effective_and_masks_finalize():
    model, x, table = _setup("tiny", "unstructured")
    assert {u.name for u in table.units} >= {"stem.0", "fc"}
    ranks = rank_units(table, model, "l1")
    kept = Policy.uniform(table, 0.75).kept(table)
    pruned = pruner_for(table).apply(model, table, ranks, kept)
    closed = closed_form(table, kept)
    from autoprune.cost.flops import count_effective_flops

    assert closed.flops == pytest.approx(count_effective_flops(pruned, x), rel=0.01)
    assert closed.flops / table.dense_macs == pytest.approx(0.25, abs=0.01)
    y = pruned(x)
    pruner_for(table).finalize(pruned)
    assert not any(n.endswith("_orig") for n, _ in pruned.named_parameters())
    assert torch.allclose(pruned(x), y)
    w = pruned.stem[0].weight
    assert (w == 0).float().mean() == pytest.approx(0.75, abs=0.02)


@pytest.mark.parametrize("name", ["mobilenet_v2", "densenet121"])
def test_uniform_half_policy_on_depthwise_and_concat_networks(name):
    """Depthwise convs (MobileNetV2) and dense concatenations (DenseNet-121) take a uniform 0.5 policy."""
    model, x, table = _setup(name)
    kept = Policy.uniform(table, 0.5).kept(table)
    pruned = pruner_for(table).apply(model, table, rank_units(table, model, "l1"), kept)
    out = pruned(torch.randn(2, *x.shape[1:]))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert closed_form(table, kept).flops == pytest.approx(count_flops(pruned, x), rel=0.01)
    assert count_params(pruned) < 0.35 * count_params(model)
