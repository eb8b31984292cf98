"""The pruning task: one dense model, its data, its units and rankings, ready for episodes.

Everything a searcher, the env and the CLI share is built here once: the dense model (never
mutated), the protocol's splits, the traced :class:`~autoprune.units.UnitTable`, each unit's
importance ranking, and the pruner. An episode is then ``prune(kept)`` followed by
``evaluate(model)``.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from autoprune.checkpoints import file_sha256, load_weights
from autoprune.costs import Costs, closed_form, dense_costs
from autoprune.data import DatasetInfo, Splits, TensorSplit, make_splits
from autoprune.errors import AutopruneError
from autoprune.evaluate import PROXIES, accuracy, accuracy_on, log_probs, recalibrate_bn, running_score
from autoprune.finetune import FinetuneConfig, finetune
from autoprune.granularity import build_unit_table
from autoprune.importance import rank_units
from autoprune.models import ModelSpec, build_model
from autoprune.policy import Policy
from autoprune.pruning import pruner_for, removed_indices
from autoprune.reconstruct import RECONSTRUCTIONS, Reconstructor, Report
from autoprune.records import Record, spec
from autoprune.units import UnitTable


@dataclass(frozen=True)
class TaskConfig(Record):
    """How to build a pruning task: stored with every study (``task.*``), so that ``export`` and
    the worker processes rebuild exactly the task that was searched.

    Attributes:
        model: a registered model name or ``package.module:function``; for a model handed to
            :func:`autoprune.search`, ``python:<module>.<class>`` (not rebuildable from the name).
        weights: a state_dict / checkpoint file; ``None`` trains (or reuses) a cached baseline.
        pretrained: start from torchvision's ImageNet weights instead.
        dataset: a registered dataset name (for an API task, the data name the user gave).
        data_dir: where the dataset lives.
        seed: the split seed (search-val and calibration carve).
        granularity: a registered granularity (``channel``, ``unstructured``).
        importance: a registered importance criterion.
        exclude: module-name patterns never pruned.
        round_to: width multiple; ``None`` picks 8 when every unit has 32+ channels, else 1.
        search_val_size: search-val images (default 5,000, or 10% of small sets).
        calib_batches: BatchNorm recalibration batches.
        calib_batch_size: images per calibration batch.
        eval_batch_size: images per evaluation batch.
        bn_recalibration: recalibrate BatchNorm before scoring (adaptive BN).
        proxy: how search-val scores a pruned model (:data:`~autoprune.evaluate.PROXIES`):
            ``acc`` top-1, ``ce`` exp(-cross-entropy), ``kl`` exp(-KL from the dense outputs).
        reconstruct: ``lsq`` refits each layer whose inputs shrank to the dense outputs
            (:mod:`autoprune.reconstruct`); ``none`` keeps the selected weights.
        episode_finetune_steps: SGD steps on each pruned model before scoring.
        device: ``cpu`` or ``cuda``.
    """

    namespace: ClassVar[str] = "task"

    model: str = spec("resnet18", identity=True, sibling=True)
    weights: str | None = spec(None, legacy_key="weights_path")  # bare "weights" was the digest
    pretrained: bool = False
    dataset: str = spec("digits", identity=True, sibling=True)
    data_dir: str | None = None
    seed: int = spec(0, identity=True, sibling=True, legacy_key="split_seed")
    granularity: str = spec("channel", identity=True, sibling=True)
    importance: str = spec("l1", identity=True, sibling=True)
    exclude: tuple[str, ...] = ()
    round_to: int | None = spec(None, legacy=None)  # the resolved width multiple is the fingerprint's
    search_val_size: int | None = spec(None, legacy=None)
    calib_batches: int = spec(10, identity=True)
    calib_batch_size: int = spec(64, identity=True)
    eval_batch_size: int = 500
    bn_recalibration: bool = spec(True, identity=True, sibling=True)
    proxy: str = spec("acc", identity=True, sibling=True, legacy="acc")
    reconstruct: str = spec("lsq", identity=True, sibling=True, legacy="none")
    episode_finetune_steps: int = spec(0, identity=True)
    device: str = "cpu"

    def asdict(self) -> dict:
        return asdict(self)

    def check(self, model: bool = True, data: bool = True) -> TaskConfig:
        """Refuse a name no registry knows, a device torch cannot use or a batch size below 1:
        one clear error before any data is read or model trained. ``model`` and ``data`` say
        whether the model and dataset will be built from their names (not handed over built)."""
        from autoprune.data import DATASETS
        from autoprune.granularity import GRANULARITIES
        from autoprune.importance import IMPORTANCE
        from autoprune.models import MODELS

        if model and self.model not in MODELS and ":" not in self.model:
            raise AutopruneError(f"unknown model {self.model!r}; choose one of: {', '.join(MODELS.names())}, "
                                 "or pass package.module:function")
        if data:
            DATASETS.get(self.dataset)
        IMPORTANCE.get(self.importance)
        GRANULARITIES.get(self.granularity)
        RECONSTRUCTIONS.get(self.reconstruct)
        PROXIES.get(self.proxy)
        for name in ("calib_batches", "calib_batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise AutopruneError(f"--{name.replace('_', '-')} must be at least 1")
        check_device(self.device)
        return self


def same_digest(a: str, b: str) -> bool:
    """Two weights identities name the same file contents (``sha256:`` and ``baseline-sha256:``
    label one digest by how the file was made)."""
    return str(a).rpartition(":")[2] == str(b).rpartition(":")[2]


@dataclass(frozen=True)
class Fingerprint(Record):
    """What a built task turned out to be (``fingerprint.*``): the weights' and data's identity,
    the units traced and the dense model's score and costs. A resumed or exported study must
    rebuild the same fingerprint."""

    namespace: ClassVar[str] = "fingerprint"

    weights: str = spec(identity=True, sibling=True, legacy_key="weights", equal=same_digest)
    data: str = spec(identity=True, sibling=True, legacy_key="data")
    round_to: int = spec(identity=True, sibling=True, legacy_key="round_to")
    units: int = spec(legacy_key="units")
    units_digest: str = spec(identity=True, legacy_key="units_digest")
    unit_names: tuple[str, ...] = spec(legacy_key="unit_names")
    search_val_images: int = spec(identity=True, sibling=True, legacy_key="search_val_size")
    calib_images: int = spec(0, legacy_key="calib_images")
    dense_score: float | None = spec(None, legacy_key="dense_accuracy")
    dense_flops: float = spec(0.0, legacy_key="dense_flops")
    dense_params: float = spec(0.0, legacy_key="dense_params")
    weights_path: str | None = spec(None, legacy_key="weights_path")


class EpisodePruned(Exception):
    """Scoring stopped early: the partial score after some chunks said the policy is not worth
    finishing (an Optuna pruner's decision, ``--early-stop``). ``score`` is that partial score."""

    def __init__(self, score: float, chunks: int) -> None:
        super().__init__(f"stopped after {chunks} chunk(s) at a partial score of {score:.4f}")
        self.score, self.chunks = score, chunks


@dataclass
class Evaluation:
    """One scored model: its proxy score on search-val (top-1 accuracy unless the task's ``proxy``
    says otherwise), and the reconstruction pass's record."""

    accuracy: float
    reconstruction: Report | None = None


def check_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AutopruneError(f"--device {device} asked for, but torch sees no CUDA device")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise AutopruneError(f"unknown device {device!r}; use cpu or cuda[:N]")
    return device


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
        raise AutopruneError("no --weights given and no data to train a baseline on")
    from autoprune.baseline import ensure_baseline

    path = ensure_baseline(model, config.model, splits, config.device, progress)
    return model.eval(), "baseline-sha256:" + file_sha256(path), str(path)


Score = Callable[[nn.Module], float]


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
            config.calib_batches, config.calib_batch_size,
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
        val = splits.search_val
        if device != "cpu":
            val = type(val)(val.x.to(device), val.y)
        self._val = val
        self._dense_logp = None
        if PROXIES.get(config.proxy).needs_dense:
            self._dense_logp = log_probs(dense.to(device), val.batches(config.eval_batch_size), device)
        self._setup(config, dense, splits.example_input(1), splits.calib,
                    lambda model: self._proxy_score(model),
                    data_identity=splits.identity, weights_id=weights_id, search_val_images=len(val),
                    table=traced[0] if traced else None)
        self.splits: Splits | None = splits
        self.weights_path = weights_path
        info = splits.info
        self.model_spec: ModelSpec | None = ModelSpec(info.num_classes, info.in_channels, info.image_size)

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
        if config.proxy != "acc":
            raise AutopruneError(f"proxy {config.proxy!r} scores search-val of a registered dataset; "
                                 "with a score function, the function is the proxy")
        task = cls.__new__(cls)
        example = _first_tensor(example_inputs)
        calib_x = _stack_inputs(calib, config.calib_batches * config.calib_batch_size)
        if not callable(score):
            raise AutopruneError("score must be a callable model -> float")
        from autoprune.importance import IMPORTANCE

        if IMPORTANCE.get(config.importance)(config.seed).needs_grad:
            raise AutopruneError(f"importance {config.importance!r} needs class labels (a registered "
                                 "dataset); with a score function use l1, l2, bn_scale, fpgm or thinet")
        unlabelled = TensorSplit(calib_x, torch.zeros(len(calib_x), dtype=torch.long))
        task._setup(config, model, example[:1].clone(), unlabelled, _checked(score),
                    data_identity=f"user:{data_name}", weights_id=weights_digest(model), search_val_images=0)
        task.splits = None
        task.weights_path = None
        task.model_spec = None
        task._test_score = _checked(test_score) if test_score is not None else None
        return task

    def _setup(self, config: TaskConfig, dense: nn.Module, example: torch.Tensor, calib: TensorSplit,
               score: Score, data_identity: str, weights_id: str, search_val_images: int,
               table: UnitTable | None = None) -> None:
        self.config = config
        self.device = config.device
        self.weights_id, self.data_identity = weights_id, data_identity
        self._search_val_images = search_val_images
        self.dense = dense.eval()
        self.example = example
        table = table or unit_table(self.dense, self.example, config)
        self.table: UnitTable = table
        self.ranks = rank_units(table, self.dense, config.importance, calib, config.seed)
        table._groups = []  # the traced graph (autograd nodes) is not needed once ranked
        self.pruner = pruner_for(table)
        self.dense_costs: Costs = dense_costs(table)
        self.dense.to(self.device)
        self._calib = calib.x.to(self.device)
        self._score = score

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
    def evaluate(self, kept, on_chunk: Callable[[float, int], bool] | None = None) -> tuple[nn.Module, Evaluation]:
        """Prune, reconstruct and recalibrate, then score: one episode's model.

        With ``on_chunk``, search-val is scored a batch at a time and ``on_chunk(score so far,
        chunk index)`` is called after each; if it returns True, scoring stops and
        :class:`EpisodePruned` is raised. (A user's ``score`` function is one chunk.)
        """
        model, report = self.pruned(kept)
        if self.config.episode_finetune_steps > 0:
            if self.splits is None:
                raise AutopruneError("episode fine-tuning needs a registered dataset")
            finetune(model, self.splits, FinetuneConfig(steps=self.config.episode_finetune_steps,
                                                        lr=0.01, seed=self.config.seed),
                     device=self.device, progress=False)
            if self.config.bn_recalibration:
                recalibrate_bn(model, self._calib, self.config.calib_batch_size, self.device)
        if on_chunk is None:
            return model, Evaluation(self.proxy_accuracy(model), report)
        for chunk, score in enumerate(self._chunk_scores(model.eval())):
            if on_chunk(score, chunk):
                raise EpisodePruned(score, chunk + 1)
        return model, Evaluation(score, report)

    def _chunk_scores(self, model: nn.Module):
        """The score so far after each batch of search-val (one value for a user's score)."""
        if self.splits is None:
            yield float(self._score(model))
            return
        yield from running_score(model, self._val.batches(self.config.eval_batch_size), self.config.proxy,
                                 self.device, self._dense_logp)

    def _proxy_score(self, model: nn.Module) -> float:
        *_, score = self._chunk_scores(model)  # the last value: over all of search-val
        return score

    def proxy_accuracy(self, model: nn.Module) -> float:
        """The search's score of ``model`` as it stands (the config's ``proxy`` on search-val for
        registered datasets, the user's ``score`` otherwise): no fine-tuning, no recalibration."""
        return float(self._score(model.eval()))

    def val_accuracy(self, model: nn.Module) -> float:
        """Top-1 on search-val whatever the proxy (the user's ``score`` for a model given in
        Python): what a fine-tune keeps its best epoch by."""
        if self.splits is None:
            return self.proxy_accuracy(model)
        return accuracy(model, self._val, self.config.eval_batch_size, self.device)

    @property
    def has_test(self) -> bool:
        return self.splits is not None or getattr(self, "_test_score", None) is not None

    def test_accuracy(self, model: nn.Module) -> float:
        """Top-1 on the held-out test split, or the user's ``test_score`` (final reports only)."""
        if self.splits is None:
            if getattr(self, "_test_score", None) is None:
                raise AutopruneError("this task has no test split or test_score")
            return self._test_score(model.to(self.device).eval())
        return accuracy_on(model.to(self.device), self.splits.test_loader(self.config.eval_batch_size),
                           self.device)

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
    has 32+ channels, else 1."""
    table = build_unit_table(model, example, config.granularity, config.exclude,
                             1 if config.round_to is None else config.round_to)
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


def _first_tensor(item) -> torch.Tensor:
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
        x = _first_tensor(batch).detach().cpu()
        xs.append(x[: limit - n])
        n += len(xs[-1])
        if n >= limit:
            break
    if not xs:
        raise AutopruneError("calib yielded no batches")
    return torch.cat(xs)


def _checked(score: Score) -> Score:
    """``score`` run without gradients, its result a finite float."""
    def run(model: nn.Module) -> float:
        with torch.no_grad():
            value = float(score(model))
        if not np.isfinite(value):
            raise AutopruneError(f"the score function returned {value} for a pruned model")
        return value

    return run
