"""How to build a pruning task (:class:`TaskConfig`) and what a built one turned out to be
(:class:`Fingerprint`): both stored with every study, so ``export``, ``--resume`` and worker
processes rebuild exactly the task that was searched, and refuse another."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from autoprune.common.records import Record, spec
from autoprune.errors import AutopruneError

EPISODE_FINETUNES = ("distill", "sgd")


def _same_episode_finetune(a: str | None, b: str | None) -> bool:
    """Studies made before the choice existed recorded none and ran ``sgd`` where they had steps
    (without steps both are ``None``)."""
    return (a or "sgd") == (b or "sgd")


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
        granularity: a granularity spec: ``channel``, ``unstructured``, ``nm`` (``nm:2:4,1:4`` for
            another ladder) or ``block:RxC``.
        importance: a registered importance criterion.
        exclude: module-name patterns never pruned.
        round_to: width multiple; ``None`` picks 8 when every unit has 32+ channels, else 1;
            ``"auto"`` takes each unit's widths from the latency table, those at which the
            runtime gets faster (channel granularity; the env resolves them, see
            :class:`~autoprune.envs.EnvConfig`'s ``width_grid``).
        search_val_size: search-val images (default 5,000, or 10% of small sets).
        search_val: where search-val's images come from: ``train`` (training images the
            checkpoint has fit) or ``heldout`` (images it never trained on: the dataset's
            validation split, else a seeded part of the test split, the test report then on the
            rest). See :mod:`autoprune.data.datasets`.
        calib_batches: BatchNorm recalibration batches.
        calib_batch_size: images per calibration batch.
        eval_batch_size: images per evaluation batch.
        bn_recalibration: recalibrate BatchNorm before scoring (adaptive BN).
        proxy: how search-val scores a pruned model (:data:`~autoprune.evaluate.metrics.PROXIES`):
            ``acc`` top-1, ``ce`` exp(-cross-entropy), ``kl`` exp(-KL from the dense outputs).
        reconstruct: ``lsq`` refits each layer whose inputs shrank to the dense outputs
            (:mod:`autoprune.reconstruct.refit`); ``none`` keeps the selected weights.
        episode_finetune_steps: fine-tune steps on each pruned model before scoring (0: none).
        episode_finetune: how those steps train: ``distill`` (the default where there are steps:
            export's recipe, distillation from the dense model at a peak lr of 0.005 after a
            tenth of the steps' warm-up, as NetAdapt's short-term fine-tune), or ``sgd``
            (cross-entropy at lr 0.01 from the first step, what studies made before the choice
            existed ran). ``None`` where there are no steps.
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
    round_to: int | str | None = spec(None, legacy=None)  # the resolved width multiple is the fingerprint's
    search_val_size: int | None = spec(None, legacy=None)
    search_val: str = spec("train", identity=True, sibling=True, legacy="train")
    calib_batches: int = spec(10, identity=True)
    calib_batch_size: int = spec(64, identity=True)
    eval_batch_size: int = 500
    bn_recalibration: bool = spec(True, identity=True, sibling=True)
    proxy: str = spec("acc", identity=True, sibling=True, legacy="acc")
    reconstruct: str = spec("lsq", identity=True, sibling=True, legacy="none")
    episode_finetune_steps: int = spec(0, identity=True)
    episode_finetune: str | None = spec(None, identity=True, legacy=None, equal=_same_episode_finetune)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.episode_finetune_steps == 0:
            object.__setattr__(self, "episode_finetune", None)
        elif self.episode_finetune is None:
            object.__setattr__(self, "episode_finetune", "distill")

    def asdict(self) -> dict:
        return asdict(self)

    def check(self, model: bool = True, data: bool = True) -> TaskConfig:
        """Refuse a name no registry knows, a device torch cannot use or a batch size below 1:
        one clear error before any data is read or model trained. ``model`` and ``data`` say
        whether the model and dataset will be built from their names (not handed over built)."""
        from autoprune.data.datasets import DATASETS, SEARCH_VAL_SOURCES
        from autoprune.evaluate.metrics import PROXIES
        from autoprune.model.zoo import MODELS
        from autoprune.prune.granularity import granularity_of
        from autoprune.prune.importance import IMPORTANCE
        from autoprune.reconstruct.refit import RECONSTRUCTIONS

        if model and self.model not in MODELS and ":" not in self.model:
            raise AutopruneError(f"unknown model {self.model!r}; choose one of: {', '.join(MODELS.names())}, "
                                 "or pass package.module:function")
        if data:
            DATASETS.get(self.dataset)
        if self.search_val not in SEARCH_VAL_SOURCES:
            raise AutopruneError(f"unknown search_val {self.search_val!r}; choose one of: "
                                 f"{', '.join(SEARCH_VAL_SOURCES)}")
        IMPORTANCE.get(self.importance)
        strategy = granularity_of(self.granularity)
        if self.round_to == "auto":
            if not (strategy.physical and strategy.rounded):
                raise AutopruneError(f"round_to 'auto' picks channel widths from a latency table; "
                                     f"{self.granularity} units are not channels")
        elif self.round_to is not None and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                                            or self.round_to < 1):
            raise AutopruneError(f"round_to must be a whole number of at least 1, or 'auto'; got {self.round_to!r}")
        RECONSTRUCTIONS.get(self.reconstruct)
        PROXIES.get(self.proxy)
        if self.episode_finetune_steps < 0:
            raise AutopruneError(f"episode fine-tune steps is {self.episode_finetune_steps}; give 0 (none) or more")
        if self.episode_finetune not in (None, *EPISODE_FINETUNES):
            raise AutopruneError(f"unknown episode fine-tune {self.episode_finetune!r}; choose one of: "
                                 f"{', '.join(EPISODE_FINETUNES)}")
        for name in ("calib_batches", "calib_batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise AutopruneError(f"{name} must be at least 1")
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


def check_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AutopruneError(f"device {device!r} asked for, but torch sees no CUDA device")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise AutopruneError(f"unknown device {device!r}; use cpu or cuda[:N]")
    return device
