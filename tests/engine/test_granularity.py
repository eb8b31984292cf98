"""Every registered granularity keeps the strategy's contract: a new one is tested by registering it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoprune.cost.flops import closed_form, dense_costs
from autoprune.prune.granularity import GRANULARITIES, Granularity, build_unit_table, granularity_of
from autoprune.prune.importance import rank_units
from autoprune.prune.pruners import pruner_for
from autoprune.units.policy import Policy
from tests.tinynets import tiny

# one spec per registered granularity (with its example argument where it takes one)
SPECS = [GRANULARITIES.get(n).example for n in GRANULARITIES.names()]


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return tiny().eval(), torch.randn(1, 1, 8, 8)


@pytest.mark.parametrize("name", SPECS)
def test_a_table_asks_its_registered_strategy(dense, name):
    model, x = dense
    table = build_unit_table(model, x, name)
    strategy = granularity_of(name)
    registered = GRANULARITIES.get(name.partition(":")[0])
    assert isinstance(strategy, Granularity) and strategy.name == name
    assert type(table.strategy) is type(registered) and table.granularity == name  # the stored value: the spec
    assert GRANULARITIES.describe(registered.name) == strategy.help != ""
    assert strategy.flops_kind in ("dense", "effective") and strategy.size_label


@pytest.mark.parametrize("name", SPECS)
def test_closed_form_costs_match_the_counted_ones(dense, name):
    model, x = dense
    table = build_unit_table(model, x, name)
    rng = np.random.default_rng(0)
    kept = table.kept_all(rng.uniform(0.1, 0.8, len(table.units)))
    pruned = pruner_for(table).apply(model, table, rank_units(table, model, "l1"), kept)
    closed, counted = closed_form(table, kept), table.strategy.counted_costs(pruned, x)
    assert closed.flops == pytest.approx(counted.flops, rel=0.01)
    assert closed.params == pytest.approx(counted.params, rel=0.01)
    assert closed.flops < dense_costs(table).flops
    full = table.strategy.counted_costs(model, x)  # nothing cut: the dense figures
    assert (full.flops, full.params) == pytest.approx((table.dense_macs, table.dense_params), rel=1e-6)


@pytest.mark.parametrize("name", SPECS)
def test_a_pruned_state_dict_loads_into_the_skeleton(dense, name):
    model, x = dense
    table = build_unit_table(model, x, name)
    kept = Policy.uniform(table, 0.5).kept(table)
    pruner = pruner_for(table)
    pruned = pruner.finalize(pruner.apply(model, table, rank_units(table, model, "l2"), kept))
    skeleton = table.strategy.skeleton(tiny().eval(), table, kept)
    skeleton.load_state_dict(pruned.state_dict(), strict=True)
    assert torch.allclose(skeleton(x), pruned(x), atol=1e-6)
    before = {k: v.shape for k, v in model.state_dict().items()}
    shapes_shrank = any(v.shape != before[k] for k, v in pruned.state_dict().items())
    assert shapes_shrank == table.strategy.physical
