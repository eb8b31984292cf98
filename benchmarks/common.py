"""Helpers shared by the benchmark scripts: locating ../shared, building the CIFAR-10 tasks, the
one-shot rules' widths, and writing a results file that says which code and command made it."""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def _commit() -> str:
    """HEAD, with ``-dirty`` where tracked files (results aside) differ from it; ``unknown``
    outside a git checkout (a copy of the tree on a lent machine)."""
    head = _git("rev-parse", "HEAD")
    if not head:
        return "unknown"
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    return head.strip() + ("" if changed == "" else "-dirty")


# Read once, when the script starts: the code it runs is the code of that moment, whatever is
# committed during a run of hours.
COMMIT = _commit()


def provenance() -> dict[str, str]:
    """What made a results file: ``commit`` (:data:`COMMIT`) and ``command``, the command line
    as ``python -m benchmarks.NAME ARGS``."""
    script = Path(sys.argv[0])
    if script.parent.name == "benchmarks":
        command = f"python -m benchmarks.{script.stem} {shlex.join(sys.argv[1:])}".rstrip()
    else:
        command = shlex.join(["python", *sys.argv])
    return {"commit": COMMIT, "command": command}


def write_results(path: str | Path, payload: dict, earlier: dict | None = None) -> Path:
    """Write a benchmark's results JSON atomically (folders made), its :func:`provenance` first.

    ``earlier`` is the same file as a resumed run found it: its rows were made by an earlier run,
    whose provenance is kept in ``earlier_runs`` (``not recorded`` for files written before
    results carried it).
    """
    from autoprune.common.fileio import atomic_write_text

    runs = list((earlier or {}).get("earlier_runs", []))
    if earlier:
        before = {k: earlier.get(k, "not recorded") for k in ("commit", "command")}
        if before != provenance() and before not in runs:
            runs.append(before)
    doc = {**provenance(), **{k: v for k, v in payload.items() if k not in ("commit", "command", "earlier_runs")}}
    if runs:
        doc["earlier_runs"] = runs
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(doc, indent=1, default=str) + "\n")


def finished_run(run_dir: str | Path) -> dict | None:
    """The ``metrics.json`` of a fine-tune run that ended in ``run_dir`` (``apply_policy`` writes it
    last and removes the epoch checkpoint), or ``None`` while it has not: a rerun reads it rather
    than fine-tuning again."""
    from autoprune.finetune.loop import has_checkpoint

    metrics = Path(run_dir) / "metrics.json"
    if not metrics.is_file() or has_checkpoint(run_dir):
        return None
    return json.loads(metrics.read_text())


def read_results(path: str | Path | None) -> dict | None:
    """A results file written earlier (to resume from), or ``None``."""
    return json.loads(Path(path).read_text()) if path and Path(path).is_file() else None


def shared_dir() -> Path:
    path = Path(os.environ.get("AUTOPRUNE_SHARED", REPO.parent / "shared"))
    if not (path / "models").is_dir():
        sys.exit(f"benchmarks need the CIFAR-10 fixtures: {path} is absent (set AUTOPRUNE_SHARED)")
    return path


def cifar_dir() -> Path:
    """The shared CIFAR-10 JPEG folder, unpacked once into ~/.cache/autoprune-data.

    Unpacked into a folder of its own and renamed into place, so a second process (a benchmark's
    other shard, the tests) sees the whole folder or none: a partial one once failed a shard.
    """
    dest = Path.home() / ".cache" / "autoprune-data"
    folder = dest / "cifar10-jpeg"
    if not folder.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        part = Path(tempfile.mkdtemp(prefix="cifar10-jpeg.", dir=dest))
        with tarfile.open(shared_dir() / "data" / "cifar10-jpeg.tar.gz") as tar:
            tar.extractall(part, filter="data")
        try:
            (part / "cifar10-jpeg").rename(folder)
        except OSError:  # another process renamed its copy first
            if not folder.is_dir():
                raise
        shutil.rmtree(part, ignore_errors=True)
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
    ap.add_argument("--round-to", type=lambda v: v if v == "auto" else int(v), default=None,
                    help="width multiple (default: the task's, 8 when every unit has 32+ channels, else 1), "
                         "or auto (the widths the latency table rewards); a non-default value suffixes study "
                         "names with -rN (-rauto)")


def make_task(model: str, search_val_size: int = 1000, calib_batches: int = 10, importance: str = "l1",
              progress: bool = False, reconstruct: str = "lsq", granularity: str = "channel",
              device: str = "cpu", round_to: int | str | None = None, dense: torch.nn.Module | None = None,
              proxy: str = "acc", search_val: str = "train"):
    """The pruning task every benchmark shares: a fixture, the JPEG CIFAR-10 folder, split seed 0.

    ``search_val`` is where search-val's images come from (``train``, or ``heldout``: 1,000 of
    the test images, the test report on the other 9,000). ``round_to`` is the width multiple
    (``None``: the task's default, 8 when every unit has 32+ channels, else 1; ``auto``: the
    widths the latency table rewards). ``dense``, for timings alone, stands in for the fixture
    (weights do not change how fast a network of given widths runs).
    """
    from autoprune.task import PruningTask, TaskConfig

    weights = None if dense is not None else str(fixture(model))
    return PruningTask(TaskConfig(model=model, weights=weights, dataset="imagefolder",
                                  data_dir=str(cifar_dir()), search_val_size=search_val_size,
                                  calib_batches=calib_batches, importance=importance,
                                  reconstruct=reconstruct, granularity=granularity, round_to=round_to,
                                  device=device, proxy=proxy, search_val=search_val),
                       dense=dense, progress=progress)


def rule_widths(task, rule: str, budget: str, **env_options) -> np.ndarray:
    """Kept widths of a one-shot rule (``uncoupled``, ``uniform``, ... of
    :mod:`autoprune.agents.baselines`) at ``budget``: the widths its episode records, played
    through the env as a search plays it (one evaluation of the pruned model)."""
    from autoprune.agents import SEARCHERS
    from autoprune.envs import LayerSparsityEnv

    searcher = SEARCHERS.get(rule)
    if not searcher.one_shot:
        raise SystemExit(f"{rule} is a search, not a one-shot rule")
    env = LayerSparsityEnv(task, budget=budget, **env_options)
    return np.asarray(searcher().episode(env, None).outcome.widths, dtype=np.int64)


def is_rule(label: str) -> bool:
    """Whether a ``search_quality`` row label names a one-shot rule of the portfolio (a variant
    such as ``uncoupled+r16`` too)."""
    from autoprune.agents.baselines import LATENCY_PORTFOLIO

    return label.split("+")[0] in LATENCY_PORTFOLIO


def run_label(row: dict, finetune_seed: int = 0, suffix: str = "") -> str:
    """The folder name of one fine-tune run of a ``search_quality`` row: ``best-`` for a searched
    row (each is its seed's best), ``rule-`` for a one-shot rule, then ``<searcher>-s<seed>``,
    ``-fsN`` for fine-tune seeds past 0 and ``-<suffix>`` for ablations. ``finetune_recipe`` and
    ``predictors`` name runs alike, so either finds the other's."""
    kind = "rule" if is_rule(row["searcher"]) else "best"
    return (f"{kind}-{row['searcher']}-s{row['seed']}{f'-fs{finetune_seed}' if finetune_seed else ''}"
            f"{'-' + suffix if suffix else ''}")


def pick(rows: list[dict], which: str) -> dict:
    """Of a ``search_quality`` file's rows, ``best``: the searched row with the best proxy score
    (the choice a user can make without the test set); ``rule``: the best one-shot rule by proxy."""
    pool = [r for r in rows if is_rule(r["searcher"]) == (which == "rule")]
    if not pool:
        raise SystemExit(f"no {which} row in the quality file")
    return max(pool, key=lambda r: r["proxy_acc"])
