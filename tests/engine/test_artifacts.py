from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from autoprune.export.artifacts import export_program, load_pruned, pruned_payload
from autoprune.model.zoo import ModelSpec, build_model
from autoprune.prune.granularity import GRANULARITIES, build_unit_table
from autoprune.prune.importance import rank_units
from autoprune.prune.pruners import pruner_for
from autoprune.units.policy import Policy


@pytest.mark.parametrize("granularity", [GRANULARITIES.get(n).example for n in GRANULARITIES.names()])
def test_saved_pruned_model_reloads_with_equal_outputs(tmp_path, granularity):
    spec = ModelSpec(10, 3, 32)
    dense = build_model("resnet20", spec)
    x = torch.randn(4, 3, 32, 32)
    table = build_unit_table(dense, x[:1], granularity)
    kept = Policy.uniform(table, 0.4).kept(table)
    pruner = pruner_for(table)
    model = pruner.finalize(pruner.apply(dense, table, rank_units(table, dense, "l2"), kept))
    torch.save(pruned_payload(model, table, kept, Policy.from_kept(table, kept), "resnet20", spec),
               tmp_path / "pruned.pt")
    again, payload = load_pruned(tmp_path / "pruned.pt")
    assert torch.allclose(again(x), model(x), atol=1e-6)
    assert payload["granularity"] == granularity
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())


def test_exported_program_runs_in_plain_torch(tmp_path):
    dense = build_model("resnet20", ModelSpec(10, 3, 32))
    x = torch.randn(3, 3, 32, 32)
    table = build_unit_table(dense, x[:1])
    model = pruner_for(table).apply(dense, table, rank_units(table, dense, "l1"),
                                    Policy.uniform(table, 0.5).kept(table))
    export_program(model, x[:1], tmp_path / "model.pt2")
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).detach(), tmp_path / "y.pt")
    # a fresh interpreter that never imports autoprune
    code = (
        "import sys, torch\n"
        "m = torch.export.load(sys.argv[1] + '/model.pt2').module()\n"
        "x = torch.load(sys.argv[1] + '/x.pt', weights_only=True)\n"
        "y = torch.load(sys.argv[1] + '/y.pt', weights_only=True)\n"
        "assert 'autoprune' not in sys.modules\n"
        "assert torch.allclose(m(x), y, atol=1e-5), (m(x) - y).abs().max()\n"
        "print('ok', tuple(m(x[:1]).shape))\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code, str(tmp_path)], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok (1, 10)"


def test_a_pruned_user_model_is_not_imported_unless_allowed(tmp_path):
    from autoprune.errors import AutopruneError
    from tests.conftest import REPO

    name = f"{REPO / 'tests' / 'tinynets.py'}:tiny"
    dense = build_model(name, ModelSpec(10, 1, 8))
    x = torch.randn(1, 1, 8, 8)
    table = build_unit_table(dense, x)
    kept = Policy.uniform(table, 0.25).kept(table)
    model = pruner_for(table).apply(dense, table, rank_units(table, dense, "l1"), kept)
    torch.save(pruned_payload(model, table, kept, Policy.from_kept(table, kept), name, ModelSpec(10, 1, 8)),
               tmp_path / "p.pt")
    with pytest.raises(AutopruneError, match="allow_import=True"):
        load_pruned(tmp_path / "p.pt")
    again, _ = load_pruned(tmp_path / "p.pt", allow_import=True)
    assert torch.allclose(again(x), model(x))
