"""Runtimes and the latency lookup table: every runtime runs the model it is given, the table is
cached per runtime, and an ONNX Runtime table predicts what ONNX Runtime measures."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from autoprune.cost.latency import RatioMeter, build_latency_model, measure_latency, measure_ratio
from autoprune.cost.runtimes import RUNTIMES, get_runtime
from autoprune.errors import AutopruneError
from autoprune.task import PruningTask

# torch.compile's first compilation in a process takes 20 s or more on two cores
SLOW_RUNTIMES = {"compile"}


# runtimes that time on a GPU only, covered by their own tests (tests/engine/test_semi_structured.py)
GPU_RUNTIMES = {"semi-structured"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_RUNTIMES else n
                                  for n in RUNTIMES.names() if n not in GPU_RUNTIMES])
def test_every_runtime_runs_the_model_it_was_given(trained_tiny, name):
    model = trained_tiny.eval()
    x = torch.randn(3, 1, 8, 8)
    run = get_runtime(name).prepare(model, x, threads=1)
    with torch.inference_mode():
        got, want = run(), model(x)
    got = got[0] if isinstance(got, list) else got  # onnxruntime returns a list of arrays
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-4, atol=1e-4)
    latency = measure_latency(model, (1, 8, 8), batch_size=3, threads=1, runs=3, warmup=1, runtime=name)
    assert latency.runtime == name and latency.runs == 3 and latency.batch_size == 3


def test_a_table_cell_is_its_conv_between_full_width_neighbours_and_onnx_runs_it_as_torch(tiny_task):
    from autoprune.cost.latency import _layer_module

    conv = next(lay for lay in tiny_task.table.layers if lay.kind == "conv" and lay.in_channels > 1)
    cell, shape = _layer_module(conv, conv.in_channels // 2, conv.out_channels // 4)
    cin, cout = conv.in_channels, conv.out_channels
    first, middle, last = cell
    assert (first.in_channels, first.out_channels, first.kernel_size) == (cin, cin // 2, (1, 1))
    assert (middle.in_channels, middle.out_channels) == (cin // 2, cout // 4)
    assert (last.in_channels, last.out_channels, last.kernel_size) == (cout // 4, cout, (1, 1))
    assert shape == (conv.in_channels, *conv.in_hw)
    x = torch.randn(3, *shape)
    run = get_runtime("onnxruntime").prepare_layer(cell.eval(), x, threads=1)
    with torch.inference_mode():
        np.testing.assert_allclose(run()[0], cell(x).numpy(), rtol=1e-4, atol=1e-5)


def test_a_narrower_cell_is_never_priced_dearer_than_a_wider_one():
    from autoprune.cost.latency import cheapest_of_wider

    # rows: input fraction, columns: output fraction, both increasing; 3.0 at (0, 1) is a width
    # that breaks a channel block, slower than the whole width (2.0), and 0.5 at (1, 0) is noise
    cells = np.array([[1.0, 3.0, 2.0],
                      [0.5, 2.5, 4.0],
                      [2.0, 3.5, 5.0]])
    got = cheapest_of_wider(cells)
    np.testing.assert_array_equal(got, [[0.5, 2.0, 2.0],
                                        [0.5, 2.5, 4.0],
                                        [2.0, 3.5, 5.0]])
    assert (np.diff(got, axis=0) >= 0).all() and (np.diff(got, axis=1) >= 0).all()
    assert (got <= cells).all() and got[-1, -1] == cells[-1, -1]  # the whole layer keeps its time


def test_unknown_runtime_and_missing_onnxruntime_are_one_clear_error(trained_tiny, monkeypatch):
    with pytest.raises(AutopruneError, match="unknown latency runtime 'tensorrt'; choose one of: eager"):
        measure_ratio(trained_tiny, trained_tiny, (1, 8, 8), runtime="tensorrt")
    with pytest.raises(AutopruneError, match="times on CPU"):
        get_runtime("onnxruntime").check("cuda:0")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(AutopruneError, match=r"pip install 'autoprune\[onnx\]'"):
        measure_latency(trained_tiny, (1, 8, 8), runs=1, runtime="onnxruntime")


def test_the_runtime_is_part_of_the_latency_table_cache_key(tiny_task, fake_latency, tmp_path):
    def build(runtime):
        return build_latency_model(tiny_task.table, tiny_task.dense, tiny_task.prune, batch_size=4,
                                   threads=1, cache_dir=tmp_path, progress=False, runtime=runtime)

    ort = build("onnxruntime")
    first = set((tmp_path / "latency").glob("*.json"))
    eager = build("eager")
    files = set((tmp_path / "latency").glob("*.json"))
    assert len(first) == 1 and len(files) == 2  # two runtimes, two tables
    assert fake_latency["tables"] == ["onnxruntime", "eager"]
    assert {json.loads(f.read_text())["runtime"] for f in files} == {"onnxruntime", "eager"}
    assert json.loads(first.pop().read_text()) == ort.to_json()
    again = build("onnxruntime")  # a cache hit: nothing measured
    assert fake_latency["tables"] == ["onnxruntime", "eager"]
    # the calibration pairs of the two tables only: 12 policies, and each stage's units cut alone at
    # two levels
    from autoprune.cost.latency import calibration_sparsities

    per_table = len(calibration_sparsities(ort, 12))
    assert per_table == 12 + 2 * (ort._stage.max() + 1) and len(fake_latency["ratios"]) == 2 * per_table
    # what the fit saw is kept with the table, for inspection
    seen = again.calibration
    assert len(seen["kept"]) == len(seen["measured"]) == per_table and set(seen["loo_error"]) == {"one", "per_stage"}
    # each table's calibration prepared the dense model once, not once per policy
    assert sum(m is tiny_task.dense for _, m in fake_latency["prepared"]) == 2
    assert (again.runtime, again.coef, again.luts) == ("onnxruntime", ort.coef, ort.luts)
    assert eager.runtime == "eager" and set(eager.luts) == set(ort.luts)


@pytest.mark.parametrize("stage0", [1 / 3, 1.0])
def test_a_stage_the_runtime_runs_otherwise_gets_a_coefficient_of_its_own(tiny_task, fake_latency, monkeypatch,
                                                                          tmp_path, stage0):
    """Timings in which stage 0's cuts buy ``stage0`` of what its table cells say, the other
    stages' what theirs say: the fit keeps one coefficient per stage, finds each and predicts
    every policy, also where one coefficient would fit as well (1). A table cached with one
    coefficient is fitted per stage on load, from the measurements it keeps, without timing
    anything again, and the cache says so."""
    from types import SimpleNamespace

    from autoprune.cost import latency
    from autoprune.cost.latency import LatencyModel

    table = tiny_task.table
    luts = latency._measure_luts(table, "cpu", 4, 1, 12, False, "eager")  # the fixture's: MACs
    probe = LatencyModel(table, "cpu", 4, 1, luts, (1.0, 0.0), 1.0, (0.0, 0.0))
    assert probe._stage.max() >= 1  # the tiny net has stages

    def truth(kept):
        gone = probe.features(kept, by_stage=True)[:-1]
        return 1.0 - stage0 * gone[0] - gone[1:].sum()

    class Pruned(torch.nn.Module):
        def __init__(self, kept):
            super().__init__()
            self.kept = np.asarray(kept)

    for name in RUNTIMES.names():
        monkeypatch.setattr(RUNTIMES.get(name), "prepare",
                            lambda self, model, x, threads: SimpleNamespace(kept=getattr(model, "kept", None)))
    monkeypatch.setattr(latency, "_time_pairs", lambda base, other, device, pairs, warmup:
                        ([1.0] * pairs, [truth(other.kept)] * pairs))
    model = build_latency_model(table, tiny_task.dense, Pruned, batch_size=4, threads=1, cache_dir=tmp_path,
                                progress=False, runtime="eager")
    assert len(model.coef) == probe._stage.max() + 2
    assert model.coef[0] == pytest.approx(stage0, abs=1e-6)
    assert model.coef[1:-1] == pytest.approx([1.0] * probe._stage.max(), abs=1e-6)
    assert model.fit_error[0] < 1e-6
    rng = np.random.default_rng(3)
    for _ in range(5):
        kept = table.kept_all(rng.uniform(0.0, 0.8, len(table.units)))
        assert model.ratio(kept) == pytest.approx(truth(kept), abs=1e-6)
    build = lambda: build_latency_model(table, tiny_task.dense, Pruned, batch_size=4, threads=1,  # noqa: E731
                                        cache_dir=tmp_path, progress=False, runtime="eager")
    assert build().coef == model.coef  # the per-stage coefficients are cached as they are
    # a table cached by a version that fitted one coefficient where it fitted the calibration as well
    (path,) = (tmp_path / "latency").glob("*.json")
    old = json.loads(path.read_text())
    old["coef"] = [1.0, 0.0]
    path.write_text(json.dumps(old))
    timed = []
    monkeypatch.setattr(latency, "_time_pairs", lambda *a, **k: timed.append(a) or ([1.0], [1.0]))
    monkeypatch.setattr(latency, "_measure_luts", lambda *a, **k: pytest.fail("a cached table was timed again"))
    again = build()
    assert again.coef == pytest.approx(model.coef, abs=1e-9) and not timed
    assert json.loads(path.read_text())["coef"] == list(again.coef)  # the cache holds the fit it gives
    assert again.calibration["measured"] == old["calibration"]["measured"]


def test_the_width_multiple_is_part_of_the_latency_table_cache_key(tiny_task, fake_latency, tmp_path):
    """The calibration models are cut at the task's width multiple, so a table calibrated at one
    multiple is never reused for another."""
    import dataclasses

    coarse = dataclasses.replace(tiny_task.table, round_to=4)
    assert coarse.multiple == 4 != tiny_task.table.multiple
    for table in (tiny_task.table, coarse, coarse):
        build_latency_model(table, tiny_task.dense, tiny_task.prune, batch_size=4, threads=1, cache_dir=tmp_path,
                            progress=False, runtime="eager")
    assert fake_latency["tables"] == ["eager", "eager"]  # measured once per multiple, then read back
    assert len(list((tmp_path / "latency").glob("*.json"))) == 2


def test_auto_widths_are_those_the_table_says_are_faster_than_the_next_wider(tiny_task, staircase_latency,
                                                                              tmp_path):
    from autoprune.cost.latency import GRID, _width

    # channel_block=1: any width (what ONNX Runtime's block does is the next test's)
    model = build_latency_model(tiny_task.table, tiny_task.dense, tiny_task.prune, batch_size=4, threads=1,
                                cache_dir=tmp_path, progress=False, runtime="onnxruntime", auto_widths=True,
                                channel_block=1)
    table = model.table
    assert tiny_task.table.levels is None and table.levels is not None  # the task's table is left as it was
    dense = table.sizes()

    def table_time(u, width):
        kept = dense.copy()
        kept[u] = width
        return model._raw(kept)[0]

    for u, unit in enumerate(table.units):
        widths = [w for w, pattern in table.levels[u]]
        assert widths == sorted(widths) and widths[-1] == unit.size
        assert all(pattern is None for _, pattern in table.levels[u])
        # each width is faster than the next wider one, by the table
        assert all(table_time(u, a) < table_time(u, b) for a, b in zip(widths, widths[1:]))
        # a grid width left out buys next to nothing (at most 2 % of what the unit can save) over
        # the next wider width kept
        most = table_time(u, unit.size) - min(table_time(u, _width(unit.size, f)) for f in GRID)
        for f in GRID:
            w = _width(unit.size, f)
            if w not in widths:
                wider = min(x for x in widths if x > w)
                assert table_time(u, wider) - table_time(u, w) <= 0.02 * most + 1e-9
    # the stem's unit (16 channels, feeding 16-channel inputs alone) steps at every quarter; a
    # unit whose channels are part of a concat's inputs steps where the concat's quarters fall
    assert [w for w, _ in table.levels[0]] == [4, 8, 12, 16]
    assert any(len(levels) < len({_width(u.size, f) for f in GRID}) for u, levels in zip(table.units, table.levels))
    # the fit is calibrated on those widths: a table of its own in the cache, not the plain one's
    plain = build_latency_model(tiny_task.table, tiny_task.dense, tiny_task.prune, batch_size=4, threads=1,
                                cache_dir=tmp_path, progress=False, runtime="onnxruntime")
    assert plain.table.levels is None and len(list((tmp_path / "latency").glob("*.json"))) == 2
    again = build_latency_model(tiny_task.table, tiny_task.dense, tiny_task.prune, batch_size=4, threads=1,
                                cache_dir=tmp_path, progress=False, runtime="onnxruntime", auto_widths=True,
                                channel_block=1)
    assert again.table.levels == table.levels and staircase_latency["tables"] == ["onnxruntime"] * 2


def test_auto_widths_are_multiples_of_the_runtime_s_channel_block_or_narrower(tiny_task, staircase_latency,
                                                                               tmp_path, monkeypatch):
    """ONNX Runtime's CPU kernels run a tensor whose channels are off their block in a slower
    layout, which the table's cells (one layer between dense neighbours) do not price: the auto
    widths keep multiples of the block, and widths narrower than one block (which no width keeps
    blocked), and each block has a table of its own."""
    from autoprune.cost.runtimes import OnnxRuntime

    monkeypatch.setattr(OnnxRuntime, "channel_block", lambda self, device: 8)

    def levels(**block):
        model = build_latency_model(tiny_task.table, tiny_task.dense, tiny_task.prune, batch_size=4, threads=1,
                                    cache_dir=tmp_path, progress=False, runtime="onnxruntime", auto_widths=True,
                                    **block)
        assert model.channel_block == (block.get("channel_block") or 8)
        return [[w for w, _ in unit] for unit in model.table.levels]

    any_width, blocked = levels(channel_block=1), levels()
    sizes = tiny_task.table.sizes()
    assert any(w % 8 for unit in any_width for w in unit)  # off-block widths the table rewards...
    for unit, size, free in zip(blocked, sizes, any_width):
        assert unit[-1] == size and all(w % 8 == 0 or w < 8 for w in unit[:-1])  # ...are left out
        assert set(unit) == {w for w in free if w % 8 == 0 or w < 8 or w == size}  # and nothing else is
    assert blocked[0] == [4, 8, 16]  # the stem: the quarter 12 is off the block, 4 under it
    assert levels() == blocked and staircase_latency["tables"] == ["onnxruntime"] * 2  # cached per block
    assert len(list((tmp_path / "latency").glob("*.json"))) == 2


@pytest.mark.parametrize("machine, flags, block", [("x86_64", {"avx2", "fma"}, 8), ("AMD64", set(), 8),
                                                   ("x86_64", {"avx2", "avx512f"}, 16), ("aarch64", {"asimd"}, 1),
                                                   ("arm64", set(), 1)])
def test_onnx_runtime_s_channel_block_follows_its_cpu_kernels(machine, flags, block):
    from autoprune.cost.runtimes import get_runtime, nchwc_block

    assert nchwc_block(machine, flags) == block
    assert get_runtime("eager").channel_block("cpu") == 1


def test_a_ratio_meter_prepares_its_base_once_per_batch_threads_and_runtime(tiny_task, fake_latency):
    dense, table = tiny_task.dense, tiny_task.table
    pruned = [tiny_task.prune(table.kept_all(np.full(len(table.units), s))) for s in (0.25, 0.5)]
    meter = RatioMeter(dense, table.input_shape)
    settings = [(1, 1, "eager"), (1, 1, "eager"), (4, 1, "eager"), (4, 2, "eager"), (1, 1, "onnxruntime")]
    for i, (batch, threads, runtime) in enumerate(settings):
        times = meter.measure(pruned[i % 2], batch, threads, pairs=5, runtime=runtime)
        assert (times.pairs, times.batch_size, times.threads, times.runtime) == (5, batch, threads, runtime)
    assert sum(m is dense for _, m in fake_latency["prepared"]) == 4  # the first two settings are one
    assert len(fake_latency["prepared"]) == 4 + len(settings)
    # measure_ratio, for one-off comparisons, prepares both models every call and reads as before
    ratio, base, other = measure_ratio(dense, pruned[0], table.input_shape, batch_size=2, threads=1, pairs=7)
    params = [sum(p.numel() for p in m.parameters()) for m in (dense, pruned[0])]
    assert ratio == pytest.approx(params[1] / params[0]) and ratio < 1
    assert (base.runs, other.runs, base.batch_size, other.runtime) == (7, 7, 2, "eager")
    assert other.median_s / base.median_s == pytest.approx(ratio)
    assert sum(m is dense for _, m in fake_latency["prepared"]) == 5
    with pytest.raises(ValueError, match="cannot pool"):
        meter.measure(pruned[0], 1, 1, pairs=2) + meter.measure(pruned[0], 4, 1, pairs=2)


@pytest.mark.slow  # about 30 s: every cell and every calibration pair exports an ONNX graph
def test_an_onnxruntime_table_predicts_measured_ratios_within_its_fit_error(tiny_task, tmp_path):
    # round_to=4: the widths the table is fitted and checked on are multiples of 4
    task = PruningTask(replace(tiny_task.config, round_to=4), splits=tiny_task.splits, dense=tiny_task.dense)
    table = task.table
    model = build_latency_model(table, task.dense, task.prune, batch_size=32, threads=1, cache_dir=tmp_path,
                                progress=False, calibration_policies=4, runtime="onnxruntime", grid=(0.5, 1.0))
    assert model.runtime == "onnxruntime" and model.grid == (0.5, 1.0)
    assert 0 <= model.fit_error[1] <= model.fit_error[0] and model.dense_s > 0
    rng = np.random.default_rng(1)
    for _ in range(3):
        kept = table.kept_all(rng.uniform(0.0, 0.7, len(table.units)))
        assert all(k % 4 == 0 for k in kept)
        measured, _, _ = measure_ratio(task.dense, task.prune(kept), table.input_shape, batch_size=32,
                                       threads=1, pairs=20, runtime="onnxruntime")
        # Generous: the stated maximum fit error plus 15 points, for sub-millisecond models timed
        # on a shared machine (the table is what a search trusts; it must not be far off).
        assert abs(model.ratio(kept) / measured - 1.0) <= model.fit_error[0] + 0.15, (kept, measured)
    again = build_latency_model(table, task.dense, task.prune, batch_size=32, threads=1, cache_dir=tmp_path,
                                progress=False, calibration_policies=4, runtime="onnxruntime", grid=(0.5, 1.0))
    assert again.coef == model.coef  # read from the cache, not measured again
