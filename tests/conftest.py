"""Shared fixtures: tiny models and data made in the tests, and ../shared when it exists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """The fixtures folder beside the checkout (or $AUTOPRUNE_SHARED); None in a user's clone."""
    env = os.environ.get("AUTOPRUNE_SHARED")
    path = Path(env) if env else REPO.parent / "shared"
    return path if (path / "models").is_dir() else None


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if path is None:
        pytest.skip("../shared (CIFAR-10 fixtures) is absent: a user's clone has none; "
                    "set AUTOPRUNE_SHARED to run these tests")
    return path


@pytest.fixture(scope="session")
def cifar_dir(shared, tmp_path_factory) -> Path:
    """The shared CIFAR-10 JPEG folder, unpacked once (reused from ~/.cache when there)."""
    cached = Path.home() / ".cache" / "autoprune-data" / "cifar10-jpeg"
    if (cached / "test").is_dir():
        return cached
    import tarfile

    dest = tmp_path_factory.mktemp("cifar")
    with tarfile.open(shared / "data" / "cifar10-jpeg.tar.gz") as tar:
        tar.extractall(dest, filter="data")
    return dest / "cifar10-jpeg"


@pytest.fixture(scope="session")
def digits():
    from autoprune.data.datasets import make_splits

    return make_splits("digits", seed=0, calib_batches=4, calib_batch_size=64)


@pytest.fixture(scope="session")
def trained_tiny(digits):
    """A TinyNet trained for a few seconds on digits: enough signal for pruning to matter."""
    from autoprune.finetune.loop import FinetuneConfig, finetune
    from tests.tinynets import tiny

    torch.manual_seed(0)
    model = tiny(num_classes=10, in_channels=1)
    finetune(model, digits, FinetuneConfig(epochs=8, lr=0.05, batch_size=64), progress=False)
    return model


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Baselines and downloads go to a per-session folder, never the user's cache."""
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_task(digits, trained_tiny):
    from autoprune.task import PruningTask, TaskConfig

    return PruningTask(TaskConfig(model="tiny", dataset="digits"), splits=digits, dense=trained_tiny)


@pytest.fixture
def tiny_weights(trained_tiny, tmp_path):
    """The trained TinyNet's state_dict in a file, for commands that take --weights."""
    path = tmp_path / "tiny.pt"
    torch.save(trained_tiny.state_dict(), path)
    return path


@pytest.fixture
def fake_latency(monkeypatch, tmp_path_factory):
    """Latency tables and ratios computed instead of timed, for tests about what is recorded and
    cached (tests never time): a layer's table cell is its MACs at those fractions, and every
    runtime's ``prepare`` returns a callable that does nothing, which a timed pair counts as 1 ms
    per million parameters of its model, so a measured ratio is the ratio of the two models'
    parameter counts. The runtime is still checked (a name or a package missing is refused as
    for real), and no runtime has a channel block. Returns what was measured, in order:
    ``{"tables": [runtime, ...], "ratios": [runtime of each timing session, ...],
    "prepared": [(runtime, model), ...]}``;
    a test may monkeypatch ``autoprune.cost.latency._time_pairs`` again for timings of its own.

    The cache is the test's own: a fake table must never be read as a measured one, nor a table
    another test measured stand in for one this test expects to be measured."""
    from autoprune.cost import latency
    from autoprune.cost.runtimes import RUNTIMES

    calls: dict[str, list] = {"tables": [], "ratios": [], "prepared": []}

    def luts(table, device, batch_size, threads, runs, progress, runtime="eager", grid=latency.GRID):
        calls["tables"].append(runtime)
        layers = {latency._signature(lay): lay for lay in table.layers if latency._signature(lay)}
        return {sig: [[lay.macs * fi * fo for fo in grid] for fi in ((1.0,) if lay.kind == "dwconv" else grid)]
                for sig, lay in layers.items()}

    class Run:
        def __init__(self, model, runtime):
            self.runtime, self.params = runtime, sum(p.numel() for p in model.parameters())

        def __call__(self):
            return None

    def prepare(self, model, x, threads):
        calls["prepared"].append((self.name, model))
        return Run(model, self.name)

    def time_pairs(run_base, run_other, device, pairs, warmup):
        calls["ratios"].append(run_other.runtime)
        return [1e-9 * run_base.params] * pairs, [1e-9 * run_other.params] * pairs

    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path_factory.mktemp("fake-latency-cache")))
    monkeypatch.setattr(latency, "_measure_luts", luts)
    for name in RUNTIMES.names():
        monkeypatch.setattr(RUNTIMES.get(name), "prepare", prepare)
        # the fake timings know no channel blocks, so the auto widths are the same on every CPU
        monkeypatch.setattr(RUNTIMES.get(name), "channel_block", lambda self, device: 1)
    monkeypatch.setattr(latency, "_time_pairs", time_pairs)
    return calls


@pytest.fixture
def staircase_latency(fake_latency, monkeypatch):
    """:func:`fake_latency` with layer cells that drop only at every quarter of a layer's input
    and output channels (as runtimes whose kernels work in blocks of channels): between quarters
    a narrower layer is no faster. Returns what ``fake_latency`` returns."""
    import math

    from autoprune.cost import latency

    def quarter(f: float) -> float:
        return math.ceil(4 * f - 1e-9) / 4

    def luts(table, device, batch_size, threads, runs, progress, runtime="eager", grid=latency.GRID):
        fake_latency["tables"].append(runtime)
        layers = {latency._signature(lay): lay for lay in table.layers if latency._signature(lay)}
        return {sig: [[lay.macs * quarter(fi) * quarter(fo) for fo in grid]
                      for fi in ((1.0,) if lay.kind == "dwconv" else grid)]
                for sig, lay in layers.items()}

    monkeypatch.setattr(latency, "_measure_luts", luts)
    return fake_latency
