"""N:M and block granularities: every mask keeps its pattern through pruning, the refit and export;
costs count kept multiply-accumulates; studies and policies name the pattern."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from autoprune.cli import main
from autoprune.cost.flops import closed_form, count_effective_flops
from autoprune.envs import LayerSparsityEnv
from autoprune.errors import AutopruneError
from autoprune.export.artifacts import load_pruned
from autoprune.prune.granularity import build_unit_table, check_patterns, granularity_of
from autoprune.prune.importance import rank_units
from autoprune.prune.patterns import NM, block_mask, block_scores, nm_mask, parse_ladder, violations
from autoprune.prune.pruners import pruner_for
from autoprune.studies.runner import SearchConfig, run_search
from autoprune.task import PruningTask, TaskConfig
from autoprune.units.policy import Policy
from tests.conftest import REPO
from tests.tinynets import tiny

TINY = f"{REPO / 'tests' / 'tinynets.py'}:tiny"


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return tiny().eval(), torch.randn(1, 1, 8, 8)


def test_nm_mask_keeps_the_n_largest_of_every_m_input_channels():
    torch.manual_seed(0)
    w = torch.randn(6, 16, 3, 3)
    mask = nm_mask(w.abs(), NM(2, 4))
    groups = mask.permute(0, 2, 3, 1).reshape(-1, 4)  # channels-last: 4 consecutive input channels
    assert torch.all(groups.sum(1) == 2)
    kept_min = (w.abs() * mask).permute(0, 2, 3, 1).reshape(-1, 4).max(1).values
    cut = (w.abs() * (1 - mask)).permute(0, 2, 3, 1).reshape(-1, 4)
    kept_vals = torch.where(groups > 0, w.abs().permute(0, 2, 3, 1).reshape(-1, 4), float("inf")).min(1).values
    assert torch.all(cut.max(1).values <= kept_vals) and torch.all(kept_min > 0)
    assert violations(w * mask, "2:4") == 0 and violations(w, "2:4") == groups.shape[0]


def test_block_masks_remove_whole_tiles_by_their_norm():
    torch.manual_seed(0)
    w = torch.randn(8, 8, 3, 3)
    scores = block_scores(w.abs(), (4, 2))
    assert scores.shape == (2 * 3 * 3 * 4,)
    keep = (scores >= scores.median()).float()
    mask = block_mask(keep, w.shape, (4, 2))
    assert violations(w * mask, "4x2") == 0 and mask.mean() == keep.mean()
    assert torch.isclose((w.abs() * mask).sum(), (scores * keep).sum())  # a tile's score is its L1 norm
    one = mask.clone()
    one[0, 0, 0, 0] = 1 - one[0, 0, 0, 0]
    assert violations(w * one, "4x2") == 1


def test_a_ladder_reads_densest_first_and_smaller_m_wins_a_tie():
    assert [str(r) for r in parse_ladder("1:8,2:4,4:8,8:8,1:4")] == ["2:4", "4:8", "1:4", "1:8"]
    for bad in ("5:4", "0:4", "2-4", "2:4,x"):
        with pytest.raises(AutopruneError, match="expected N:M"):
            parse_ladder(bad)
    with pytest.raises(AutopruneError, match="no sparse rung"):
        parse_ladder("4:4,8:8")


def test_nm_units_take_levels_and_layers_that_fit_no_rung_stay_dense(dense, caplog):
    model, x = dense
    with caplog.at_level(logging.WARNING, "autoprune"):
        table = build_unit_table(model, x, "nm")
    assert "stem.0" not in table.names and "stem.0 fits no N:M rung" in caplog.text  # one input channel
    u = table.index_of("block.0")
    size = table.units[u].size
    assert table.levels[u] == ((size // 8, "1:8"), (size // 4, "1:4"), (size // 2, "2:4"),
                               (size * 3 // 4, "6:8"), (size, "dense"))
    assert [table.pattern(u, table.kept(u, s)) for s in (0.0, 0.3, 0.5, 0.74, 0.8, 0.9)] == \
        ["dense", "6:8", "2:4", "1:4", "1:4", "1:8"]
    assert table.min_kept(u) == size // 8
    with pytest.raises(AutopruneError, match=r"one of its levels: .*\(2:4\)"):
        Policy({}, widths={"block.0": size // 2 + 1}).kept(table)
    custom = build_unit_table(model, x, "nm:4:8,1:4")
    assert custom.granularity == "nm:4:8,1:4" and [p for _, p in custom.levels[u]] == ["1:4", "4:8", "dense"]
    assert granularity_of("nm:8:8,6:8,4:8,2:4,2:8,1:4,1:8").name == "nm"  # the default ladder is plain nm


@pytest.mark.parametrize("spec", ["nm", "block:4x4", "block:1x8"])
def test_effective_flops_are_the_kept_multiply_accumulates(dense, spec):
    model, x = dense
    table = build_unit_table(model, x, spec)
    rng = np.random.default_rng(1)
    kept = table.kept_all(rng.uniform(0.2, 0.9, len(table.units)))
    pruned = pruner_for(table).apply(model, table, rank_units(table, model, "l1"), kept)
    counted = count_effective_flops(pruned, x)
    # by hand: every conv/linear's MACs per output position times its non-zero weights
    macs, hooks = [0.0], []

    def hook(m, inp, out):
        positions = out[0, 0].numel() if out.dim() > 2 else 1
        macs[0] += positions * float((m.weight != 0).sum())

    for m in pruned.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        pruned(x)
    for h in hooks:
        h.remove()
    assert counted == pytest.approx(macs[0], rel=1e-9)
    assert closed_form(table, kept).flops == pytest.approx(macs[0], rel=1e-9)


@pytest.fixture(scope="module", params=["nm", "block:4x4"])
def pattern_task(request, digits, trained_tiny):
    return PruningTask(TaskConfig(model="tiny", dataset="digits", granularity=request.param),
                       splits=digits, dense=trained_tiny)


def test_masks_keep_their_pattern_through_the_refit(pattern_task):
    task = pattern_task
    kept = task.table.kept_all([0.6] * len(task.table.units))
    selected = task.prune(kept)
    model, report = task.pruned(kept)  # refit (masked least squares) and BN recalibration
    assert report is not None and report.refit > 0
    assert check_patterns(task.pruner.finalize(model), task.table, kept) == len(task.table.units)
    changed = [u.name for u in task.table.units
               if not torch.equal(model.get_submodule(u.name).weight, selected.get_submodule(u.name).weight)]
    assert changed, "the refit changed no weight: nothing was tested"
    for u in task.table.units:  # a weight the cut removed stays exactly zero
        cut = selected.get_submodule(u.name).weight == 0
        assert torch.all(model.get_submodule(u.name).weight[cut] == 0)


def test_a_search_records_patterns_and_its_export_reproduces_the_proxy(tmp_path, monkeypatch, capsys,
                                                                       tiny_weights):
    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path}/s.db"
    common = ["--model", TINY, "--weights", str(tiny_weights), "--dataset", "digits", "--storage", db, "-q"]
    assert main(["search", *common, "--granularity", "nm", "--budget", "0.5flops", "--searcher", "random",
                 "--episodes", "3", "--max-sparsity", "0.9", "--study-name", "nm"]) == 0
    out = capsys.readouterr().out
    assert " -> " in out and any(p in out for p in (" 2:4", " 1:4", " 6:8", " 1:8"))
    assert main(["export", "nm", "--storage", db, "-o", "policy.json", "--weights", str(tiny_weights),
                 "-q"]) == 0
    doc = json.loads((tmp_path / "policy.json").read_text())
    assert doc["granularity"] == "nm"
    assert all(u["pattern"] in ("dense", "6:8", "2:4", "4:8", "1:4", "2:8", "1:8") for u in doc["units"])
    metrics = json.loads((tmp_path / "policy_model" / "metrics.json").read_text())
    assert metrics["patterns_checked"] == len(doc["units"])
    if not torch.cuda.is_available():  # the 2:4 sparse form is checked on a GPU only, and says so
        assert metrics["semi_structured"]["checked"] is False and "CUDA" in metrics["semi_structured"]["why"]
    assert metrics["pruned"]["proxy_acc"] == pytest.approx(doc["proxy_accuracy"], abs=1e-9)
    model, _ = load_pruned(tmp_path / "policy_model" / "pruned.pt", allow_import=True)
    for u in doc["units"]:  # the saved model: every layer in its pattern, at its width
        w = model.get_submodule(u["name"]).weight
        assert violations(w, u["pattern"]) == 0 and int((w != 0).sum()) == u["kept"]
    # resuming with another ladder (or granularity) is refused, the study untouched
    for other in (["--granularity", "nm", "--nm-ladder", "2:4,1:4"], ["--granularity", "block:4x4"]):
        code = main(["search", *common, *other, "--budget", "0.5flops", "--searcher", "random",
                     "--episodes", "4", "--max-sparsity", "0.9", "--study-name", "nm", "--resume"])
        assert code == 2 and "was made with granularity='nm'" in capsys.readouterr().err
    assert main(["studies", "--storage", db]) == 0 and " 3/3 " in capsys.readouterr().out


def test_a_block_study_plays_blocks_within_budget(digits, trained_tiny, tmp_path):
    task = PruningTask(TaskConfig(model="tiny", dataset="digits", granularity="block:2x2"),
                       splits=digits, dense=trained_tiny)
    env = LayerSparsityEnv(task, budget="0.4flops")
    result = run_search(env, SearchConfig(searcher="tpe", episodes=4, storage=f"sqlite:///{tmp_path}/b.db",
                                          progress=False))
    for t in result.study.trials:
        assert t.user_attrs["ratios"]["flops"] <= 0.4 + 1e-9 and "patterns" not in t.user_attrs
        model = task.prune(t.user_attrs["widths"])
        assert check_patterns(task.pruner.finalize(model), task.table, t.user_attrs["widths"]) > 0
