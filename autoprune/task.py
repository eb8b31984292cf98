"""The pruning task: one dense model, its data, its units and rankings, ready for episodes.

Everything a searcher, the env and the CLI share is built here once: the dense model (never
mutated), the protocol's splits, the traced :class:`~autoprune.units.UnitTable`, each unit's
importance ranking, and the pruner. An episode is then ``prune(kept)`` followed by
``evaluate(model)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoprune.checkpoints import file_sha256, load_weights
from autoprune.costs import Costs, closed_form, dense_costs
from autoprune.data import DatasetInfo, Splits, make_splits
from autoprune.errors import AutopruneError
from autoprune.evaluate import accuracy, accuracy_on, recalibrate_bn
from autoprune.finetune import FinetuneConfig, finetune
from autoprune.importance import rank_units
from autoprune.models import ModelSpec, build_model
from autoprune.policy import Policy
from autoprune.pruning import pruner_for, removed_indices
from autoprune.reconstruct import RECONSTRUCTIONS, Reconstructor, Report
from autoprune.units import UnitTable, build_unit_table


@dataclass(frozen=True)
class TaskConfig:
    """Everything that defines a pruning task (and so a study's identity).

    Attributes:
        model: a registered model name or ``package.module:function``.
        weights: a state_dict / checkpoint file; ``None`` trains (or reuses) a cached baseline.
        pretrained: start from torchvision's ImageNet weights instead.
        dataset: a registered dataset name.
        data_dir: where the dataset lives.
        seed: the split seed (search-val and calibration carve).
        granularity: ``channel`` or ``unstructured``.
        importance: a registered importance criterion.
        exclude: module-name patterns never pruned.
        round_to: width multiple; ``None`` picks 8 when every unit has 32+ channels, else 1.
        search_val_size: search-val images (default 5,000, or 10% of small sets).
        calib_batches: BatchNorm recalibration batches.
        calib_batch_size: images per calibration batch.
        eval_batch_size: images per evaluation batch.
        bn_recalibration: recalibrate BatchNorm before scoring (adaptive BN).
        reconstruct: ``lsq`` refits each layer whose inputs shrank to the dense outputs
            (:mod:`autoprune.reconstruct`); ``none`` keeps the selected weights.
        episode_finetune_steps: SGD steps on each pruned model before scoring.
        device: ``cpu`` or ``cuda``.
    """

    model: str = "resnet18"
    weights: str | None = None
    pretrained: bool = False
    dataset: str = "digits"
    data_dir: str | None = None
    seed: int = 0
    granularity: str = "channel"
    importance: str = "l1"
    exclude: tuple[str, ...] = ()
    round_to: int | None = None
    search_val_size: int | None = None
    calib_batches: int = 10
    calib_batch_size: int = 64
    eval_batch_size: int = 500
    bn_recalibration: bool = True
    reconstruct: str = "lsq"
    episode_finetune_steps: int = 0
    device: str = "cpu"

    def asdict(self) -> dict:
        return asdict(self)


@dataclass
class Evaluation:
    """One scored model: proxy accuracy on search-val, and the reconstruction pass's record."""

    accuracy: float
    reconstruction: Report | None = None


def check_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AutopruneError(f"--device {device} asked for, but torch sees no CUDA device")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise AutopruneError(f"unknown device {device!r}; use cpu or cuda[:N]")
    return device


def load_dense_model(config: TaskConfig, info: DatasetInfo, splits: Splits | None = None,
                     progress: bool = True) -> tuple[nn.Module, str, str | None]:
    """The dense model, the identity of its weights (sha256 of the file, or how they were made)
    and the weights file's path (None for torchvision's pretrained weights)."""
    spec = ModelSpec(info.num_classes, info.in_channels, info.image_size, config.pretrained)
    model = build_model(config.model, spec)
    if config.weights:
        load_weights(model, config.weights)
        return model.eval(), "sha256:" + file_sha256(config.weights), str(Path(config.weights).resolve())
    if config.pretrained:
        return model.eval(), f"torchvision:{config.model}:DEFAULT", None
    if splits is None:
        raise AutopruneError("no --weights given and no data to train a baseline on")
    from autoprune.baseline import ensure_baseline

    path = ensure_baseline(model, config.model, splits, config.device, progress)
    return model.eval(), "baseline-sha256:" + file_sha256(path), str(path)


class PruningTask:
    """A dense model ready to be pruned and scored many times.

    Args:
        config: what to load and how to evaluate.
        splits: pre-built splits (else made from the config).
        dense: a pre-built dense model (else built and loaded from the config).
        progress: show progress bars (baseline training, fine-tuning).
    """

    def __init__(self, config: TaskConfig, splits: Splits | None = None,
                 dense: nn.Module | None = None, progress: bool = True) -> None:
        self.config = config
        self.device = check_device(config.device)
        RECONSTRUCTIONS.get(config.reconstruct)
        self.splits = splits or make_splits(
            config.dataset, config.data_dir, config.seed, config.search_val_size,
            config.calib_batches, config.calib_batch_size,
        )
        if dense is None:
            dense, self.weights_id, self.weights_path = load_dense_model(
                config, self.splits.info, self.splits, progress)
        else:
            self.weights_id, self.weights_path = "in-memory", None
        self.dense = dense.eval()
        self.example = self.splits.example_input(1)
        table = build_unit_table(self.dense, self.example, config.granularity, config.exclude,
                                 1 if config.round_to is None else config.round_to)
        if config.round_to is None:
            table.round_to = 8 if min(u.size for u in table.units) >= 32 else 1
        self.table: UnitTable = table
        self.ranks = rank_units(table, self.dense, config.importance, self.splits.calib, config.seed)
        table._groups = []  # the traced graph (autograd nodes) is not needed once ranked
        self.pruner = pruner_for(table)
        self.dense_costs: Costs = dense_costs(table)
        self.dense.to(self.device)
        self._val = self.splits.search_val
        self._calib = self.splits.calib
        if self.device != "cpu":
            self._val = type(self._val)(self._val.x.to(self.device), self._val.y)
            self._calib = type(self._calib)(self._calib.x.to(self.device), self._calib.y)

    def __deepcopy__(self, memo) -> PruningTask:
        # A task is read-only after construction (the dense model is never mutated), so copies,
        # e.g. Gymnasium's env checker re-making an env from its spec, can share it.
        return self

    # -- policies -------------------------------------------------------------------------------
    def kept(self, policy: Policy) -> np.ndarray:
        return policy.kept(self.table)

    def prune(self, kept) -> nn.Module:
        """A pruned copy of the dense model with unit ``u`` keeping ``kept[u]`` elements, as
        selected: no reconstruction, no recalibration."""
        return self.pruner.apply(self.dense, self.table, self.ranks, kept)

    def pruned(self, kept) -> tuple[nn.Module, Report | None]:
        """What an episode scores and ``export`` writes: pruned, reconstructed, BN recalibrated."""
        model = self.prune(kept)
        return model, self.calibrate(model, kept)

    def calibrate(self, model: nn.Module, kept) -> Report | None:
        """Everything done with calibration images after the cut, in place: the reconstruction
        (``lsq``: one pass that refits and recalibrates BatchNorm together) or plain BN
        recalibration."""
        if RECONSTRUCTIONS.get(self.config.reconstruct) is not None:
            kept_out = self.table.kept_outputs(removed_indices(self.table, self.ranks, kept))
            return self.reconstructor(model, kept_out, self.config.bn_recalibration, self.device)
        if self.config.bn_recalibration:
            recalibrate_bn(model, self._calib, self.config.calib_batch_size, self.device)
        return None

    @property
    def reconstructor(self) -> Reconstructor:
        """Built on first use: it traces the dense model and caches its targets once per task."""
        if getattr(self, "_reconstructor", None) is None:
            config = replace(RECONSTRUCTIONS.get(self.config.reconstruct), seed=self.config.seed)
            layers = self.table.refittable_layers()
            if config.downstream:
                layers = [lay.name for lay in self.table.layers if lay.kind in ("conv", "linear")]
            self._reconstructor = Reconstructor(self.dense, layers, self._calib.x, config)
        return self._reconstructor

    def cost_ratios(self, kept) -> dict[str, float]:
        """Closed-form FLOPs and params ratios (effective ones for unstructured)."""
        return closed_form(self.table, kept).ratio(self.dense_costs)

    def counted_costs(self, model: nn.Module) -> Costs:
        """Costs counted on a real model (effective for masked ones)."""
        return self.table.strategy.counted_costs(model, self.example.to(self.device))

    # -- scoring --------------------------------------------------------------------------------
    def evaluate(self, kept) -> tuple[nn.Module, Evaluation]:
        """Prune, reconstruct and recalibrate, then score on search-val: one episode's model."""
        model, report = self.pruned(kept)
        if self.config.episode_finetune_steps > 0:
            finetune(model, self.splits, FinetuneConfig(steps=self.config.episode_finetune_steps,
                                                        lr=0.01, seed=self.config.seed),
                     device=self.device, progress=False)
            if self.config.bn_recalibration:
                recalibrate_bn(model, self._calib, self.config.calib_batch_size, self.device)
        acc = accuracy(model, self._val, self.config.eval_batch_size, self.device)
        return model, Evaluation(acc, report)

    def proxy_accuracy(self, model: nn.Module) -> float:
        """Accuracy on search-val as the model stands: no fine-tuning, no recalibration."""
        return accuracy(model, self._val, self.config.eval_batch_size, self.device)

    def test_accuracy(self, model: nn.Module) -> float:
        """Top-1 on the held-out test split (final reports only)."""
        return accuracy_on(model.to(self.device), self.splits.test_loader(self.config.eval_batch_size),
                           self.device)

    def dense_accuracy(self) -> float:
        """Proxy accuracy of the dense model (no recalibration: its statistics are its own)."""
        if not hasattr(self, "_dense_acc"):
            self._dense_acc = accuracy(self.dense, self._val, self.config.eval_batch_size, self.device)
        return self._dense_acc

    def identity(self) -> dict:
        """What makes two tasks the same: recorded with every study and export."""
        return {
            "model": self.config.model,
            "weights": self.weights_id,
            "dataset": self.config.dataset,
            "data": self.splits.identity,
            "split_seed": self.config.seed,
            "granularity": self.table.granularity,
            "importance": self.config.importance,
            "reconstruct": self.config.reconstruct,
            "round_to": self.table.round_to,
            "units": len(self.table.units),
            "units_digest": hashlib.sha256(
                "|".join(f"{u.name}:{u.size}" for u in self.table.units).encode()
            ).hexdigest()[:16],
        }
