"""The pruning task: one dense model, its data, its units and rankings, ready for episodes.

Everything a searcher, the env and the CLI share is built here once: the dense model (never
mutated), the traced :class:`~autoprune.units.UnitTable`, each unit's importance ranking, the
pruner, and the scorer (:mod:`autoprune.task.scorers`: the protocol's splits, or a user's score
function). An episode is then ``evaluate(kept)``: prune, reconstruct, score.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoprune.cost.flops import Costs, closed_form, dense_costs
from autoprune.data.datasets import DatasetInfo, Splits, TensorSplit, make_splits
from autoprune.errors import AutopruneError
from autoprune.evaluate.metrics import recalibrate_bn
from autoprune.finetune.loop import FinetuneConfig, finetune
from autoprune.model.checkpoints import file_sha256, load_weights
from autoprune.model.zoo import ModelSpec, build_model
from autoprune.prune.granularity import build_unit_table
from autoprune.prune.importance import rank_units
from autoprune.prune.pruners import pruner_for, removed_indices
from autoprune.reconstruct.refit import RECONSTRUCTIONS, Reconstructor, Report
from autoprune.task.config import Fingerprint, TaskConfig
from autoprune.task.scorers import FunctionScorer, Score, Scorer, SplitScorer
from autoprune.units import UnitTable
from autoprune.units.policy import Policy


@dataclass
class Evaluation:
    """One scored model: its proxy score on search-val (top-1 accuracy unless the task's ``proxy``
    says otherwise), the reconstruction pass's record, and, if a stop callback ended scoring
    early, after how many chunks (``accuracy`` is then the partial score)."""

    accuracy: float
    reconstruction: Report | None = None
    stopped_after: int | None = None


def load_dense_model(config: TaskConfig, info: DatasetInfo, splits: Splits | None = None,
                     progress: bool = True, before_weights: Callable[[nn.Module], object] | None = None,
                     ) -> tuple[nn.Module, str, str | None]:
    """The dense model, the identity of its weights (sha256 of the file, or how they were made)
    and the weights file's path (None for torchvision's pretrained weights).

    ``before_weights(model)`` runs on the built architecture before any weights are loaded or a
    baseline is trained: checks that need only the architecture fail there, in seconds.
    """
    spec = ModelSpec(info.num_classes, info.in_channels, info.image_size, config.pretrained)
    model = build_model(config.model, spec)
    if before_weights is not None:
        before_weights(model)
    if config.weights:
        load_weights(model, config.weights)
        return model.eval(), "sha256:" + file_sha256(config.weights), str(Path(config.weights).resolve())
    if config.pretrained:
        return model.eval(), f"torchvision:{config.model}:DEFAULT", None
    if splits is None:
        raise AutopruneError("no weights given and no data to train a baseline on")
    from autoprune.finetune.baseline import ensure_baseline

    path = ensure_baseline(model, config.model, splits, config.device, progress)
    return model.eval(), "baseline-sha256:" + file_sha256(path), str(path)


class PruningTask:
    """A dense model ready to be pruned and scored many times.

    Built from a :class:`TaskConfig` (a registered or importable model and a registered dataset,
    scored by top-1 accuracy on search-val), or, with :meth:`from_model`, from a model in memory,
    any ``score`` callable and any calibration batches.

    Args:
        config: what to load and how to evaluate.
        splits: pre-built splits (else made from the config).
        dense: a pre-built dense model (else built and loaded from the config).
        progress: show progress bars (baseline training, fine-tuning).
        precheck: called with the unit table of the architecture before any weights are loaded or
            a baseline trained (the search checks there that its budget is reachable).
    """

    def __init__(self, config: TaskConfig, splits: Splits | None = None,
                 dense: nn.Module | None = None, progress: bool = True,
                 precheck: Callable[[UnitTable], object] | None = None) -> None:
        device = config.check(model=dense is None, data=splits is None).device
        splits = splits or make_splits(
            config.dataset, config.data_dir, config.seed, config.search_val_size,
            config.calib_batches, config.calib_batch_size, search_val=config.search_val,
        )
        traced: list[UnitTable] = []  # the precheck's table: weights load into the same modules

        def before(model: nn.Module) -> None:
            traced.append(unit_table(model, splits.example_input(1), config))
            precheck(traced[0])

        if dense is None:
            dense, weights_id, weights_path = load_dense_model(config, splits.info, splits, progress,
                                                               None if precheck is None else before)
        else:
            weights_id, weights_path = weights_digest(dense), None
        scorer = SplitScorer(splits, config.proxy, dense, config.eval_batch_size, device)
        info = splits.info
        self._setup(config, dense, splits.example_input(1), splits.calib, scorer, data_identity=splits.identity,
                    weights_id=weights_id, weights_path=weights_path, search_val_images=len(splits.search_val),
                    model_spec=ModelSpec(info.num_classes, info.in_channels, info.image_size),
                    table=traced[0] if traced else None)

    @classmethod
    def from_model(cls, model: nn.Module, example_inputs, score: Score, calib: Iterable,
                   config: TaskConfig, data_name: str = "custom",
                   test_score: Score | None = None) -> PruningTask:
        """A task over a model in memory, scored by ``score(model) -> float`` (higher is better).

        ``calib`` yields input batches (tensors, or tuples/lists whose first item is the input),
        read once, up to ``calib_batches * calib_batch_size`` inputs; they drive BatchNorm
        recalibration and reconstruction. ``test_score``, if given, is reported for exports.
        """
        config.check(model=False, data=False)
        if config.episode_finetune_steps > 0:
            raise AutopruneError("episode fine-tuning needs a registered dataset to train on")
        if config.proxy != "acc":
            raise AutopruneError(f"proxy {config.proxy!r} scores search-val of a registered dataset; "
                                 "with a score function, the function is the proxy")
        task = cls.__new__(cls)
        example = first_tensor(example_inputs)
        calib_x = _stack_inputs(calib, config.calib_batches * config.calib_batch_size)
        scorer = FunctionScorer(score, test_score, config.device)
        from autoprune.prune.importance import IMPORTANCE

        if IMPORTANCE.get(config.importance)(config.seed).needs_grad:
            raise AutopruneError(f"importance {config.importance!r} needs class labels (a registered "
                                 "dataset); with a score function use l1, l2, bn_scale, fpgm or thinet")
        unlabelled = TensorSplit(calib_x, torch.zeros(len(calib_x), dtype=torch.long))
        task._setup(config, model, example[:1].clone(), unlabelled, scorer, data_identity=f"user:{data_name}",
                    weights_id=weights_digest(model), weights_path=None, search_val_images=0, model_spec=None)
        return task

    def _setup(self, config: TaskConfig, dense: nn.Module, example: torch.Tensor, calib: TensorSplit,
               scorer: Scorer, data_identity: str, weights_id: str, weights_path: str | None,
               search_val_images: int, model_spec: ModelSpec | None, table: UnitTable | None = None) -> None:
        """What both ways of building a task share: trace and rank the units once."""
        self.config = config
        self.device = config.device
        self.scorer = scorer
        self.splits: Splits | None = scorer.splits  # what a fine-tune trains on (None: the user's own training)
        self.weights_id, self.data_identity, self.weights_path = weights_id, data_identity, weights_path
        self.model_spec = model_spec
        self._search_val_images = search_val_images
        self.dense = dense.eval()
        self.example = example
        table = table or unit_table(self.dense, self.example, config)
        self.table: UnitTable = table
        self.ranks = rank_units(table, self.dense, config.importance, calib, config.seed)
        if table.channels is not None:
            table.channels.release_graph()  # autograd nodes, not needed once ranked
        self.pruner = pruner_for(table)
        self.dense_costs: Costs = dense_costs(table)
        self.dense.to(self.device)
        self._calib = calib.x.to(self.device)

    def variant(self, reconstruct: str) -> PruningTask:
        """This task with pruned models rebuilt by another reconstruction (same model, data, units,
        rankings and score)."""
        RECONSTRUCTIONS.get(reconstruct)
        task = copy.copy(self)
        task.config = replace(self.config, reconstruct=reconstruct)
        task._reconstructor = None
        return task

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
            kept_out = self.kept_outputs(kept)
            return self.reconstructor(model, kept_out, self.config.bn_recalibration, self.device)
        if self.config.bn_recalibration:
            recalibrate_bn(model, self._calib, self.config.calib_batch_size, self.device)
        return None

    def kept_outputs(self, kept) -> dict[str, np.ndarray]:
        """Per module whose outputs the cut at widths ``kept`` shrinks, the dense output indices it
        keeps: what the refit aims the next layers at, and where feature-map hints compare."""
        return self.table.strategy.kept_outputs(self.table, removed_indices(self.table, self.ranks, kept))

    @property
    def reconstructor(self) -> Reconstructor:
        """Built on first use: it traces the dense model and caches its targets once per task."""
        if getattr(self, "_reconstructor", None) is None:
            config = replace(RECONSTRUCTIONS.get(self.config.reconstruct), seed=self.config.seed)
            layers = self.table.refittable_layers()
            if config.downstream:
                layers = [lay.name for lay in self.table.layers if lay.kind in ("conv", "linear")]
            self._reconstructor = Reconstructor(self.dense, layers, self._calib, config)
        return self._reconstructor

    def cost_ratios(self, kept) -> dict[str, float]:
        """Closed-form FLOPs and params ratios (effective ones for unstructured)."""
        return closed_form(self.table, kept).ratio(self.dense_costs)

    def counted_costs(self, model: nn.Module) -> Costs:
        """Costs counted on a real model (effective for masked ones)."""
        return self.table.strategy.counted_costs(model, self.example.to(self.device))

    def calibration_inputs(self) -> torch.Tensor:
        """The calibration inputs (on the task's device)."""
        return self._calib

    # -- scoring --------------------------------------------------------------------------------
    def evaluate(self, kept, stop: Callable[[float, int], bool] | None = None) -> tuple[nn.Module, Evaluation]:
        """Prune, reconstruct and recalibrate, then score: one episode's model.

        With ``stop``, search-val is scored a batch at a time and ``stop(score so far, chunk
        index)`` is called after each; if it returns True, scoring ends there and the evaluation
        says so (``stopped_after``). A user's ``score`` function is one chunk.
        """
        model, report = self.pruned(kept)
        if self.config.episode_finetune_steps > 0:
            steps, seed = self.config.episode_finetune_steps, self.config.seed
            if self.config.episode_finetune == "sgd":
                finetune(model, self.splits, FinetuneConfig(steps=steps, lr=0.01, seed=seed),
                         device=self.device, progress=False)
            else:  # every episode meets the same batches: the teacher's logits are computed once
                finetune(model, self.splits, FinetuneConfig.recipe(1, steps=steps, seed=seed), teacher=self.dense,
                         device=self.device, progress=False)
            if self.config.bn_recalibration:
                recalibrate_bn(model, self._calib, self.config.calib_batch_size, self.device)
        if stop is None:
            return model, Evaluation(self.proxy_accuracy(model), report)
        for chunk, score in enumerate(self.scorer.chunks(model.eval())):
            if stop(score, chunk):
                return model, Evaluation(score, report, stopped_after=chunk + 1)
        return model, Evaluation(score, report)

    def proxy_accuracy(self, model: nn.Module) -> float:
        """The search's score of ``model`` as it stands (the config's ``proxy`` on search-val for
        registered datasets, the user's ``score`` otherwise): no fine-tuning, no recalibration."""
        return self.scorer.score(model.eval())

    def score_more(self, model: nn.Module, images: int) -> float:
        """The search's proxy on ``images`` training images outside search-val and calibration
        (a seeded draw, the same for every model): a final choice among policies search-val's
        images cannot order."""
        return self.scorer.score_on(model.eval(), images)

    def val_accuracy(self, model: nn.Module) -> float:
        """Top-1 on search-val whatever the proxy (the user's ``score`` for a model given in
        Python): what a fine-tune keeps its best epoch by."""
        return self.scorer.val_accuracy(model)

    @property
    def has_test(self) -> bool:
        return self.scorer.has_test

    def test_accuracy(self, model: nn.Module) -> float:
        """Top-1 on the held-out test split, or the user's ``test_score`` (final reports only)."""
        return self.scorer.test_accuracy(model)

    def dense_accuracy(self) -> float:
        """The dense model's score (no recalibration: its statistics are its own)."""
        if not hasattr(self, "_dense_acc"):
            self._dense_acc = self.proxy_accuracy(self.dense)
        return self._dense_acc

    def fingerprint(self) -> Fingerprint:
        """What makes two built tasks the same: recorded with every study and export."""
        return Fingerprint(
            weights=self.weights_id, weights_path=self.weights_path, data=self.data_identity,
            round_to=self.table.round_to,
            units=len(self.table.units),
            units_digest=hashlib.sha256(
                "|".join(f"{u.name}:{u.size}" for u in self.table.units).encode()
            ).hexdigest()[:16],
            unit_names=tuple(self.table.names), search_val_images=self._search_val_images,
            calib_images=len(self._calib), dense_score=self.dense_accuracy(),
            dense_flops=self.dense_costs.flops, dense_params=self.dense_costs.params,
        )


def unit_table(model: nn.Module, example: torch.Tensor, config: TaskConfig) -> UnitTable:
    """The model's unit table as the config asks; ``round_to=None`` resolves to 8 when every unit
    has 32+ channels, else 1; ``auto`` to 1, the env then keeps the widths its latency table
    rewards (:meth:`~autoprune.cost.latency.LatencyModel.width_levels`)."""
    table = build_unit_table(model, example, config.granularity, config.exclude,
                             config.round_to if isinstance(config.round_to, int) else 1)
    if config.round_to is None:
        table.round_to = 8 if min(u.size for u in table.units) >= 32 else 1
    return table


def weights_digest(model: nn.Module) -> str:
    """``state-sha256:<hex>`` of a model's tensors (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "state-sha256:" + h.hexdigest()


def first_tensor(item) -> torch.Tensor:
    """The input tensor of a batch: the batch itself, or the first item of a tuple/list."""
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    if not isinstance(item, torch.Tensor):
        raise AutopruneError(f"expected an input tensor (or a tuple whose first item is one), got "
                             f"{type(item).__name__}")
    return item


def _stack_inputs(batches: Iterable, limit: int) -> torch.Tensor:
    """Up to ``limit`` inputs from an iterable of batches, as one CPU tensor."""
    xs, n = [], 0
    for batch in batches:
        x = first_tensor(batch).detach().cpu()
        xs.append(x[: limit - n])
        n += len(xs[-1])
        if n >= limit:
            break
    if not xs:
        raise AutopruneError("calib yielded no batches")
    return torch.cat(xs)
