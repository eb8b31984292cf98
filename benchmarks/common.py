"""Helpers shared by the benchmark scripts: locating ../shared and building the CIFAR-10 tasks."""

from __future__ import annotations

import os
import platform
import sys
import tarfile
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    path = Path(os.environ.get("AUTOPRUNE_SHARED", REPO.parent / "shared"))
    if not (path / "models").is_dir():
        sys.exit(f"benchmarks need the CIFAR-10 fixtures: {path} is absent (set AUTOPRUNE_SHARED)")
    return path


def cifar_dir() -> Path:
    """The shared CIFAR-10 JPEG folder, unpacked once into ~/.cache/autoprune-data."""
    dest = Path.home() / ".cache" / "autoprune-data"
    folder = dest / "cifar10-jpeg"
    if not (folder / "test").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(shared_dir() / "data" / "cifar10-jpeg.tar.gz") as tar:
            tar.extractall(dest, filter="data")
    return folder


def fixture(name: str) -> Path:
    return shared_dir() / "models" / f"{name}_cifar10.pt"


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {gpu}, "
            f"torch {torch.__version__}, {date.today().isoformat()}")


def add_space_args(ap) -> None:
    """The search space and width options every search benchmark spells alike: ``--range``,
    ``--share`` (as ``autoprune search``), ``--tag`` and ``--round-to``."""
    ap.add_argument("--range", action="append", default=[], metavar="PATTERN=LO:HI",
                    help="per-unit bounds, as autoprune search --range (repeatable)")
    ap.add_argument("--share", action="append", default=[], metavar="PATTERN",
                    help="units that take one sparsity, as autoprune search --share (repeatable)")
    ap.add_argument("--tag", default="", help="suffix of study names (and row labels), for a steered space")
    ap.add_argument("--round-to", type=int, default=None,
                    help="width multiple (default: the task's, 8 when every unit has 32+ channels, else 1); "
                         "a non-default value suffixes study names with -rN")


def make_task(model: str, search_val_size: int = 1000, calib_batches: int = 10, importance: str = "l1",
              progress: bool = False, reconstruct: str = "lsq", granularity: str = "channel",
              device: str = "cpu", round_to: int | None = None, dense: torch.nn.Module | None = None,
              proxy: str = "acc"):
    """The pruning task every benchmark shares: a fixture, the JPEG CIFAR-10 folder, split seed 0.

    ``round_to`` is the width multiple (``None``: the task's default, 8 when every unit has 32+
    channels, else 1). ``dense``, for timings alone, stands in for the fixture (weights do not change
    how fast a network of given widths runs).
    """
    from autoprune.task import PruningTask, TaskConfig

    weights = None if dense is not None else str(fixture(model))
    return PruningTask(TaskConfig(model=model, weights=weights, dataset="imagefolder",
                                  data_dir=str(cifar_dir()), search_val_size=search_val_size,
                                  calib_batches=calib_batches, importance=importance,
                                  reconstruct=reconstruct, granularity=granularity, round_to=round_to,
                                  device=device, proxy=proxy),
                       dense=dense, progress=progress)
