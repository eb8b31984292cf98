"""The dense baseline trained on first use when no weights are given, and cached.

This makes the headline command work anywhere: with the bundled ``digits`` data and no
``weights``, a dense model is trained once (about a minute on two CPU cores for resnet18 at
8x8), cached under the cache dir and reused by every later search.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from autoprune.common.fileio import atomic_torch_save
from autoprune.data.datasets import Splits, default_cache_dir
from autoprune.evaluate.metrics import accuracy
from autoprune.finetune.loop import FinetuneConfig, finetune
from autoprune.model.checkpoints import load_weights

log = logging.getLogger(__name__)

BASELINE_RECIPE = FinetuneConfig(epochs=15, lr=0.05, batch_size=64, weight_decay=5e-4)


def baseline_path(model_name: str, splits: Splits, cache_dir: Path | None = None) -> Path:
    key = json.dumps([model_name, splits.identity, splits.seed, splits.sizes, vars(BASELINE_RECIPE)],
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    module, sep, fn = model_name.rpartition(":")
    safe = f"{Path(module).stem}.{fn}" if sep else model_name
    return (cache_dir or default_cache_dir()) / "baselines" / f"{safe}-{splits.info.name}-{digest}.pt"


def ensure_baseline(model: nn.Module, model_name: str, splits: Splits, device: str = "cpu",
                    progress: bool = True, cache_dir: Path | None = None) -> Path:
    """Load the cached baseline into ``model``, training and caching it first if needed."""
    path = baseline_path(model_name, splits, cache_dir)
    if path.is_file():
        load_weights(model, path)
        return path
    log.warning("note: no weights given; training a dense %s baseline on %s once (%g epochs), cached at %s",
                model_name, splits.info.name, BASELINE_RECIPE.epochs, path)
    torch.manual_seed(splits.seed)
    finetune(model, splits, BASELINE_RECIPE, device=device, progress=progress, desc="baseline")
    acc = accuracy(model, splits.search_val, device=device)
    log.warning("note: baseline search-val accuracy %.2f%%", 100 * acc)
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic: a killed first run never leaves a half-written baseline, nor do two runs at once
    atomic_torch_save({k: v.cpu() for k, v in model.state_dict().items()}, path)
    return path
