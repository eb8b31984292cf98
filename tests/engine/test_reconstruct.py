"""Least-squares reconstruction: what it refits, what it leaves alone, and that it helps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from autoprune.model.zoo import ModelSpec, build_model
from autoprune.prune.granularity import build_unit_table
from autoprune.prune.importance import rank_units
from autoprune.prune.pruners import pruner_for, removed_indices
from autoprune.reconstruct.lsq import solve
from autoprune.reconstruct.refit import Reconstructor
from autoprune.units.policy import Policy


def _half_of(task, name: str) -> np.ndarray:
    """Widths that halve one unit and keep every other whole."""
    kept = task.table.sizes().copy()
    u = task.table.index_of(name)
    kept[u] = task.table.units[u].size // 2
    return kept


def test_layers_whose_inputs_are_all_kept_come_back_unchanged(tiny_task):
    kept = _half_of(tiny_task, "block.0")  # shrinks block.3's inputs only
    plain = dict(tiny_task.prune(kept).named_parameters())
    refit, report = tiny_task.pruned(kept)
    assert [f.name for f in report.layers] == ["block.3"] and report.refit == 1
    for name, p in refit.named_parameters():  # BatchNorm recalibration changes buffers only
        if name == "block.3.weight":
            assert not torch.allclose(p, plain[name], atol=1e-5), "the shrunk layer was not refit"
        else:
            torch.testing.assert_close(p, plain[name], atol=1e-5, rtol=0)


def test_refit_lowers_the_output_error_on_images_it_was_not_fit_on(tiny_task):
    """block.3 (its input halved), on search-val images: closer to the dense layer after the refit."""
    kept = _half_of(tiny_task, "block.0")
    plain = tiny_task.prune(kept)
    refit, _ = tiny_task.pruned(kept)
    x = tiny_task.splits.search_val.x[:256]

    def layer_out(model):
        seen = {}
        hook = model.block[3].register_forward_hook(lambda m, i, o: seen.setdefault("y", o))
        with torch.no_grad():
            model.eval()(x)
        hook.remove()
        return seen["y"]

    dense = layer_out(tiny_task.dense)
    err_plain = float(((layer_out(plain) - dense) ** 2).mean())
    err_refit = float(((layer_out(refit) - dense) ** 2).mean())
    assert err_refit < 0.7 * err_plain


def test_residual_tail_is_corrected_and_report_counts_it(tiny_task):
    """block.3 feeds a BatchNorm and then the residual add: its target carries the stream's drift."""
    kept = _half_of(tiny_task, "stem.0")  # the residual stream: block.0 and both branches shrink
    kept[tiny_task.table.index_of("block.0")] //= 2  # and block.3's inputs
    _, report = tiny_task.pruned(kept)
    fits = {f.name: f for f in report.layers}
    assert report.traced and fits["block.3"].residual and not fits["block.0"].residual
    assert set(fits) == {"block.0", "block.3", "branch_a.0", "branch_b.0"}
    assert all(f.err_refit <= f.err_plain for f in fits.values())
    assert report.refit + report.fallbacks == len(fits)


def test_lsq_all_also_refits_later_layers_and_leaves_earlier_ones(tiny_task):
    from dataclasses import replace

    from autoprune.task import PruningTask

    task = PruningTask(replace(tiny_task.config, reconstruct="lsq-all"), splits=tiny_task.splits,
                       dense=tiny_task.dense)
    kept = _half_of(task, "block.0")
    plain = dict(task.prune(kept).named_parameters())
    model, report = task.pruned(kept)
    assert [f.name for f in report.layers] == ["block.3", "branch_a.0", "branch_b.0", "head.0", "fc"]
    assert report.refit >= 3
    torch.testing.assert_close(model.stem[0].weight, plain["stem.0.weight"], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.block[0].weight, plain["block.0.weight"], atol=1e-5, rtol=0)


def test_reconstruction_raises_proxy_accuracy_of_a_halved_tiny_net(tiny_task):
    kept = Policy.uniform(tiny_task.table, 0.5).kept(tiny_task.table)
    from dataclasses import replace

    from autoprune.task import PruningTask

    none = PruningTask(replace(tiny_task.config, reconstruct="none"), splits=tiny_task.splits,
                       dense=tiny_task.dense)
    _, ev_none = none.evaluate(kept)
    _, ev_lsq = tiny_task.evaluate(kept)
    assert ev_none.reconstruction is None and ev_lsq.reconstruction.refit > 0
    assert ev_lsq.accuracy > ev_none.accuracy


def test_wide_layers_solve_the_same_ridge_problem_in_its_dual_form():
    """Fewer rows than columns: the rows x rows (dual) solve equals the columns x columns one."""
    gen = torch.Generator().manual_seed(0)
    x, w0 = torch.randn(60, 90, generator=gen), torch.randn(4, 90, generator=gen)
    y = x @ torch.randn(4, 90, generator=gen).T
    dual, _, _ = solve(x, y, w0, ridge=1e-2, holdout=0.1)
    primal, _, _ = solve(x, y, w0, ridge=1e-2, holdout=0.1, mask=torch.ones_like(w0))  # masks: primal
    assert dual is not None and primal is not None
    torch.testing.assert_close(dual, primal, atol=1e-4, rtol=1e-4)


def test_ill_posed_solve_keeps_plain_weights():
    """Rows that carry no information (all zero) cannot beat the plain weights: a counted fallback."""
    x = torch.zeros(64, 8)
    y = torch.randn(64, 3)
    w0 = torch.randn(3, 8)
    w, err_plain, err = solve(x, y, w0, ridge=1e-3, holdout=0.25)
    assert w is None and err == err_plain


def test_exact_linear_target_is_recovered():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 12, generator=gen)
    w_true = torch.randn(5, 12, generator=gen)
    w, err_plain, err = solve(x, x @ w_true.T, torch.zeros(5, 12), ridge=1e-8, holdout=0.1)
    torch.testing.assert_close(w, w_true, atol=1e-3, rtol=1e-3)
    assert err < 1e-6 < err_plain


def test_masked_solve_keeps_zeros_and_beats_plain_masking():
    """A masked layer's refit keeps every removed weight at zero and, where its inputs are
    correlated (so kept weights can stand in for removed ones), fits better than the mask alone."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 16, generator=gen)
    w_dense = torch.randn(6, 16, generator=gen)
    mask = (w_dense.abs() > w_dense.abs().median()).float()  # magnitude masks, as the engine's
    x = z + z[:, :1]  # one component shared by every input
    w, err_plain, err = solve(x, x @ w_dense.T, w_dense, ridge=1e-6, holdout=0.1, mask=mask)
    assert w is not None and bool((w[mask == 0] == 0).all())
    assert err < 0.8 * err_plain
    w, err_plain, err = solve(z, z @ w_dense.T, w_dense, ridge=1e-6, holdout=0.1, mask=mask)
    assert w is None and err == err_plain  # independent inputs: the mask alone is already optimal


def test_unstructured_masks_are_refit_in_place(digits, trained_tiny):
    from autoprune.task import PruningTask, TaskConfig

    task = PruningTask(TaskConfig(model="tiny", dataset="digits", granularity="unstructured"),
                       splits=digits, dense=trained_tiny)
    kept = Policy.uniform(task.table, 0.8).kept(task.table)
    plain = task.prune(kept)
    model, ev = task.evaluate(kept)
    assert ev.reconstruction.refit > 0
    for name, m in model.named_modules():
        if hasattr(m, "weight_mask"):  # the same weights are zero: effective costs are unchanged
            assert torch.equal(m.weight_mask, plain.get_submodule(name).weight_mask)
    assert task.counted_costs(model) == task.counted_costs(plain)
    assert ev.accuracy > task.proxy_accuracy(plain)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v2", "densenet121"])
def test_depthwise_and_concat_networks_run_through_reconstruction(name):
    """MobileNetV2 (depthwise convs are left alone) and DenseNet-121 (concat consumers) are refit."""
    torch.manual_seed(0)
    model = build_model(name, ModelSpec(10, 3, 32)).eval()
    x = torch.randn(1, 3, 32, 32)
    table = build_unit_table(model, x, "channel", round_to=8)
    ranks = rank_units(table, model, "l1")
    kept = Policy.uniform(table, 0.5).kept(table)
    pruned = pruner_for(table).apply(model, table, ranks, kept)
    calib = torch.randn(32, 3, 32, 32)
    rec = Reconstructor(model, table.refittable_layers(), calib)
    report = rec(pruned, table.strategy.kept_outputs(table, removed_indices(table, ranks, kept)), recalibrate=True)
    assert report.traced and report.refit > 0
    kinds = {n: m for n, m in pruned.named_modules()}
    assert all(kinds[f.name].groups == 1 for f in report.layers if isinstance(kinds[f.name], nn.Conv2d))
    out = pruned(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_untraceable_model_is_refit_through_hooks(tiny_task):
    """A forward pass torch.fx cannot trace (data-dependent branch) still gets its layers refit."""

    class Branchy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if x.sum() > -1e30:  # data-dependent control flow: symbolic tracing fails here
                return self.inner(x)
            return self.inner(-x)

    dense = Branchy(tiny_task.dense)
    table = build_unit_table(dense, tiny_task.example, "channel")
    ranks = rank_units(table, dense, "l1")
    kept = table.sizes().copy()
    kept[table.index_of("inner.block.0")] //= 2
    pruned = pruner_for(table).apply(dense, table, ranks, kept)
    rec = Reconstructor(dense, table.refittable_layers(), tiny_task.splits.calib.x)
    report = rec(pruned, table.strategy.kept_outputs(table, removed_indices(table, ranks, kept)), recalibrate=True)
    assert not report.traced and [f.name for f in report.layers] == ["inner.block.3"]
    assert report.refit == 1 and not report.layers[0].residual


def test_export_rebuilds_the_model_the_study_scored(tmp_path, tiny_weights, capsys):
    """The exported model's proxy accuracy is the one the study recorded for that trial."""
    from autoprune.cli import main
    from tests.conftest import REPO

    db = f"sqlite:///{tmp_path}/s.db"
    tiny = f"{REPO / 'tests' / 'tinynets.py'}:tiny"
    assert main(["search", "--model", tiny, "--weights", str(tiny_weights), "--dataset", "digits",
                 "--budget", "0.5flops", "--episodes", "4", "--storage", db, "-q"]) == 0
    out = tmp_path / "policy.json"
    assert main(["export", "tinynets.tiny-digits-0.5flops-tpe", "--storage", db, "-o", str(out),
                 "--weights", str(tiny_weights), "-q"]) == 0
    capsys.readouterr()
    doc = json.loads(out.read_text())
    metrics = json.loads((tmp_path / "policy_model" / "metrics.json").read_text())
    assert doc["reconstruct"] == metrics["reconstruct"] == "lsq"
    assert metrics["reconstruction"]["refit"] > 0
    assert metrics["pruned"]["proxy_acc"] == doc["proxy_accuracy"]
