from __future__ import annotations

import json

import pytest
import torch

from autoprune.errors import AutopruneError
from autoprune.prune.granularity import build_unit_table
from autoprune.units.policy import Policy
from tests.tinynets import tiny


@pytest.fixture(scope="module")
def table():
    return build_unit_table(tiny(), torch.randn(1, 1, 8, 8))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_policy_round_trip(table, tmp_path, suffix):
    sparsity = {u.name: 0.1 * (i % 7) for i, u in enumerate(table.units)}
    p = Policy(sparsity, {"budget": "0.5flops", "note": "x"})
    path = p.save(tmp_path / f"p{suffix}", table)
    q = Policy.load(path)
    assert q.sparsity == pytest.approx(sparsity)
    assert q.meta["budget"] == "0.5flops"
    assert (q.kept(table) == p.kept(table)).all()


def test_achieved_policy_reapplies_to_the_same_widths(table):
    p = Policy({u.name: 0.33 for u in table.units})
    kept = p.kept(table)
    again = Policy.from_kept(table, kept).kept(table)
    assert (kept == again).all()


def test_plain_mapping_and_missing_units_default_to_dense(table, tmp_path):
    name = table.units[0].name
    (tmp_path / "p.json").write_text(json.dumps({name: 0.5}))
    kept = Policy.load(tmp_path / "p.json").kept(table)
    assert kept[0] == table.units[0].size // 2
    assert (kept[1:] == table.sizes()[1:]).all()


@pytest.mark.parametrize("content,match", [
    ('{"nope.conv": 0.5}', "does not have"),
    ('{"stem.0": 1.5}', r"in \[0, 1\)"),
    ('{"stem.0": "half"}', r"in \[0, 1\)"),
    ('{"stem.0": NaN}', r"in \[0, 1\)"),
    ('[1, 2]', "not a policy"),
    ('{"units": 3}', "list of"),
    ('{"format": "other", "units": []}', "format"),
    ('{not json', "not valid"),
])
def test_malformed_policies_are_user_errors(table, tmp_path, content, match):
    (tmp_path / "p.json").write_text(content)
    with pytest.raises(AutopruneError, match=match):
        Policy.load(tmp_path / "p.json").kept(table)


def test_widths_survive_a_round_trip_on_units_of_millions_of_weights(tmp_path):
    from autoprune.model.zoo import ModelSpec, build_model

    big = build_unit_table(build_model("resnet18", ModelSpec(10, 3, 32)), torch.zeros(1, 3, 32, 32),
                           "unstructured")
    assert max(u.size for u in big.units) > 2_000_000
    import numpy as np

    kept = np.array([u.size - 1 - i for i, u in enumerate(big.units)])  # odd widths everywhere
    path = Policy.from_kept(big, kept).save(tmp_path / "p.json", big)
    assert (Policy.load(path).kept(big) == kept).all()


def test_a_policy_for_another_granularity_or_rounding_is_refused(table, tmp_path):
    p = Policy({u.name: 0.5 for u in table.units}, {"granularity": "unstructured"})
    with pytest.raises(AutopruneError, match="set granularity to unstructured"):
        p.kept(table)
    q = Policy({u.name: 0.5 for u in table.units}, {"round_to": 8})
    with pytest.raises(AutopruneError, match="set round_to to 8"):
        q.kept(table)


def test_a_unit_left_alone_stays_whole_whatever_round_to():
    from tests.tinynets import TinyNet

    t = build_unit_table(TinyNet(width=10), torch.randn(1, 1, 8, 8), round_to=8)
    for u in t.units:
        assert t.kept(u.index, 0.0) == u.size
