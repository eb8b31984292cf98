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
    from autoprune.data import make_splits

    return make_splits("digits", seed=0, calib_batches=4, calib_batch_size=64)


@pytest.fixture(scope="session")
def trained_tiny(digits):
    """A TinyNet trained for a few seconds on digits: enough signal for pruning to matter."""
    from autoprune.finetune import FinetuneConfig, finetune
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
