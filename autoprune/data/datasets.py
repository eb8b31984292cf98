"""Dataset registry and the seeded splits of the evaluation protocol.

Every dataset is cut the same way (DESIGN.md, "Evaluation protocol"):

* ``search_val``: a fixed, seeded set of images scored during the search. Where it comes from
  is the ``search_val`` setting: ``train``, a subset of the *training* set (which the checkpoint
  has fit, so near the top of a search the proxy saturates), or ``heldout``, images the model
  never trained on: the dataset's own validation split where it has one (imagefolder with both
  ``val/`` and ``test/``), else a seeded part of the test split, the report then on the rest;
* ``calib``: a few batches of the training set (never search-val's), for BatchNorm recalibration;
* ``train``: the training set minus search-val, for fine-tuning (with augmentation);
* ``test``: the held-out split minus any search-val images, touched only for final reports.

search-val and calib are decoded once into tensors, so an episode's evaluation never touches
the disk or a DataLoader.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from autoprune.common.registry import Registry
from autoprune.errors import AutopruneError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_cache_dir() -> Path:
    """Where downloads and cached baselines live: $AUTOPRUNE_CACHE or ~/.cache/autoprune."""
    return Path(os.environ.get("AUTOPRUNE_CACHE", Path.home() / ".cache" / "autoprune"))


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about the data."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    classes: tuple[str, ...] = ()


@dataclass
class RawDataset:
    """A dataset as its loader returns it: the train set twice (plain and augmented), the test set."""

    info: DatasetInfo
    train: Dataset  # deterministic transform, for search-val and calibration
    train_aug: Dataset  # same samples, training augmentation, for fine-tuning
    test: Dataset
    identity: str = ""  # what makes two loads the same data (path, version), for study records
    val: Dataset | None = None  # a validation split apart from test (imagefolder's val/ beside test/)
    small: tuple | None = None  # (mean, std, pad) of small images: train and test can live as tensors


DatasetLoader = Callable[[Path | None, bool], RawDataset]
DATASETS: Registry[DatasetLoader] = Registry("dataset")
# Shapes known without reading any data, so `autoprune inspect` works before a download.
STATIC_INFO: dict[str, DatasetInfo] = {}


def dataset_info(name: str, data_dir: str | Path | None = None) -> DatasetInfo:
    """The dataset's shape and classes; reads the data only where it cannot be known otherwise."""
    loader = DATASETS.get(name)
    if name in STATIC_INFO:
        return STATIC_INFO[name]
    return loader(Path(data_dir).expanduser() if data_dir else None, False).info


@dataclass(frozen=True)
class TensorSplit:
    """A split held in memory as one tensor pair, batched on demand."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.y), batch_size):
            yield self.x[i : i + batch_size], self.y[i : i + batch_size]


@dataclass
class Splits:
    """The four splits of the evaluation protocol for one dataset and seed."""

    info: DatasetInfo
    search_val: TensorSplit
    calib: TensorSplit
    train: Dataset
    test: Dataset
    seed: int
    identity: str = ""
    sizes: dict[str, int] = field(default_factory=dict)
    search_val_from: str = "train"  # the split search-val's images come from: train, val or test
    # builds (train, test) as decoded tensors on first use (small images), or gives None
    tensor_views: Callable[[], tuple[Dataset, Dataset] | None] | None = field(default=None, repr=False)
    # n -> up to n training images outside search-val and calibration (a seeded draw), decoded
    more_images: Callable[[int], TensorSplit] | None = field(default=None, repr=False)

    @cached_property
    def tensors(self) -> tuple[Dataset, Dataset] | None:
        """The training split (augmented) and the test split as in-memory uint8 tensors
        (:mod:`autoprune.data.tensors`), decoded on first use; ``None`` where the images do not
        allow it (large or mixed sizes), and then the loaders decode per image."""
        return self.tensor_views() if self.tensor_views is not None else None

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return self.search_val.x[:batch].clone()

    def train_loader(self, batch_size: int, seed: int = 0, workers: int | None = None, device: str = "cpu"):
        """Shuffled, augmented batches of the training split; seed ``loader.generator`` to repeat
        an epoch. Small images come from memory, augmented a batch at a time on ``device``."""
        views = self.tensors
        if views is not None:
            return views[0].loader(batch_size, seed, device)
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(
            self.train, batch_size=batch_size, shuffle=True, drop_last=True, generator=gen,
            num_workers=_workers(self.train) if workers is None else workers,
        )

    def test_loader(self, batch_size: int = 500, workers: int | None = None):
        views = self.tensors
        if views is not None:
            return views[1].loader(batch_size, shuffle=False, drop_last=False)
        return DataLoader(
            self.test, batch_size=batch_size,
            num_workers=_workers(self.test) if workers is None else workers,
        )


def _workers(ds: Dataset) -> int:
    # Tensors in memory need no worker processes; decoding image files does. On a GPU, decoding 32-px
    # JPEGs is what an epoch waits for, so up to 8 workers where the cores are there.
    base = ds.dataset if isinstance(ds, Subset) else ds
    return 0 if isinstance(base, TensorDataset) else min(8, os.cpu_count() or 1)


def materialize(ds: Dataset, indices: list[int] | np.ndarray) -> TensorSplit:
    """Decode ``ds[indices]`` once into one tensor pair."""
    if len(indices) == 0:
        raise AutopruneError("an evaluation split came out empty; use a larger dataset")
    sub = Subset(ds, [int(i) for i in indices])
    xs, ys = [], []
    for x, y in DataLoader(sub, batch_size=256, num_workers=_workers(ds)):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    return TensorSplit(torch.cat(xs).contiguous(), torch.cat(ys).long())


SEARCH_VAL_SOURCES = ("train", "heldout")


def make_splits(
    dataset: str = "digits",
    data_dir: str | Path | None = None,
    seed: int = 0,
    search_val_size: int | None = None,
    calib_batches: int = 10,
    calib_batch_size: int = 64,
    download: bool = True,
    search_val: str = "train",
) -> Splits:
    """Load ``dataset`` and cut the protocol's splits with ``seed``.

    Args:
        dataset: a registered dataset name.
        data_dir: where the data lives (or is downloaded to).
        seed: seeds the search-val / calibration carve; same seed, same images.
        search_val_size: images in search-val; default 5,000, or 10% of sets under 50,000 (held
            out: half the test split, at most 5,000; a validation split whole, at most 5,000).
        calib_batches: BatchNorm recalibration batches kept in memory.
        calib_batch_size: images per calibration batch.
        download: allow torchvision to download (CIFAR); offline failures are user errors.
        search_val: ``train`` or ``heldout`` (see the module's docstring).
    """
    if search_val not in SEARCH_VAL_SOURCES:
        raise AutopruneError(f"unknown search_val {search_val!r}; choose one of: {', '.join(SEARCH_VAL_SOURCES)}")
    raw = DATASETS.get(dataset)(Path(data_dir).expanduser() if data_dir else None, download)
    rng = np.random.default_rng(seed)
    if search_val == "heldout":
        return _heldout_splits(raw, dataset, rng, seed, search_val_size, calib_batches * calib_batch_size)
    n = len(raw.train)
    if search_val_size is None:
        search_val_size = 5000 if n >= 50_000 else max(1, n // 10)
    _check_size(search_val_size, n, dataset, "the training set")
    order = rng.permutation(n)
    val_idx, rest = order[:search_val_size], order[search_val_size:]
    n_calib = min(len(rest), calib_batches * calib_batch_size)
    return Splits(
        info=raw.info,
        search_val=materialize(raw.train, np.sort(val_idx)),
        calib=materialize(raw.train, rest[:n_calib]),
        train=Subset(raw.train_aug, np.sort(rest).tolist()),
        test=raw.test,
        seed=seed,
        identity=raw.identity,
        sizes={"train": len(rest), "search_val": len(val_idx), "calib": n_calib, "test": len(raw.test)},
        tensor_views=_tensor_views(raw, np.sort(rest), None),
        more_images=_more_images(raw, rest[n_calib:]),
    )


def _heldout_splits(raw: RawDataset, dataset: str, rng: np.random.Generator, seed: int,
                    search_val_size: int | None, calib_images: int) -> Splits:
    """Search-val from images the model never trained on: the validation split, else a seeded part
    of the test split (the report then on the rest). Calibration and fine-tuning keep the whole
    training set."""
    source, pool = ("val", raw.val) if raw.val is not None else ("test", raw.test)
    n = len(pool)
    if search_val_size is None:
        search_val_size = min(5000, n if source == "val" else max(1, n // 2))
    if source == "val":
        _check_size(search_val_size, n + 1, dataset, "the validation split")
    else:
        _check_size(search_val_size, n, dataset, "the test split")
    order = rng.permutation(n)
    val_idx, rest = np.sort(order[:search_val_size]), np.sort(order[search_val_size:])
    test = raw.test if source == "val" else Subset(raw.test, rest.tolist())
    train_order = rng.permutation(len(raw.train))
    n_calib = min(len(raw.train), calib_images)
    return Splits(
        info=raw.info,
        search_val=materialize(pool, val_idx),
        calib=materialize(raw.train, train_order[:n_calib]),
        train=raw.train_aug,
        test=test,
        seed=seed,
        identity=raw.identity,
        sizes={"train": len(raw.train), "search_val": len(val_idx), "calib": n_calib, "test": len(test)},
        search_val_from=source,
        tensor_views=_tensor_views(raw, None, None if source == "val" else rest),
        more_images=_more_images(raw, train_order[n_calib:]),
    )


def _more_images(raw: RawDataset, rows: np.ndarray) -> Callable[[int], TensorSplit]:
    """What :attr:`Splits.more_images` gives: the first ``n`` of ``rows`` (in their seeded order),
    plain (not augmented) training images, decoded on demand."""
    def take(n: int) -> TensorSplit:
        if len(rows) == 0:
            raise AutopruneError("no training images are left beside search-val and calibration")
        return materialize(raw.train, np.sort(rows[: max(1, n)]))

    return take


def _tensor_views(raw: RawDataset, train_rows, test_rows) -> Callable[[], tuple | None] | None:
    """What :attr:`Splits.tensors` builds: the training rows (augmented as ``train_aug`` is)
    and the test rows of a small-image dataset, decoded once (cached on disk)."""
    if raw.small is None:
        return None

    def build() -> tuple[Dataset, Dataset] | None:
        from autoprune.data.tensors import ImageTensors, decode

        cache = default_cache_dir() / "tensors"
        train, test = decode(raw.train, cache), decode(raw.test, cache)
        if train is None or test is None:
            return None
        mean, std, pad = raw.small
        train_t = ImageTensors(*train, mean, std, pad=pad, flip=True)
        test_t = ImageTensors(*test, mean, std)
        return (train_t if train_rows is None else train_t.subset(train_rows),
                test_t if test_rows is None else test_t.subset(test_rows))

    return build


def _check_size(size: int, n: int, dataset: str, what: str) -> None:
    if not 0 < size < n:
        raise AutopruneError(f"search-val size must be in [1, {n - 1}] for {dataset} ({what}), got {size}")


# ----------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------
@DATASETS.register("digits", help="scikit-learn's bundled 8x8 handwritten digits (offline)")
def _digits(data_dir: Path | None, download: bool) -> RawDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4  # roughly zero-mean, unit-variance pixels
    y = torch.tensor(bunch.target, dtype=torch.long)
    # A fixed 20% test split: the bundled set has none, and it must not move with --seed.
    order = np.random.default_rng(12345).permutation(len(y))
    test_idx, train_idx = order[: len(y) // 5], np.sort(order[len(y) // 5 :])
    train = TensorDataset(x[train_idx], y[train_idx])
    test = TensorDataset(x[test_idx], y[test_idx])
    return RawDataset(STATIC_INFO["digits"], train, train, test, "sklearn-digits")


def _small_transforms(size: int, mean, std):
    from torchvision import transforms as T

    plain = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    aug = T.Compose(
        [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip(), T.ToTensor(),
         T.Normalize(mean, std)]
    )
    return plain, aug


def _large_transforms(mean, std):
    from torchvision import transforms as T

    plain = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(mean, std)])
    aug = T.Compose(
        [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    )
    return plain, aug


def _torchvision_cifar(cls_name: str, num_classes: int) -> DatasetLoader:
    def load(data_dir: Path | None, download: bool) -> RawDataset:
        import torchvision

        cls = getattr(torchvision.datasets, cls_name)
        root = data_dir or default_cache_dir() / "data"
        plain, aug = _small_transforms(32, CIFAR_MEAN, CIFAR_STD)
        try:
            train = cls(root, train=True, transform=plain, download=download)
        except Exception as err:  # URLError, RuntimeError("Dataset not found")
            raise AutopruneError(
                f"{cls_name} is not in {root} and could not be downloaded "
                f"({err.__class__.__name__}); give data_dir the extracted archive, or use the "
                "imagefolder dataset with a data_dir holding train/ and test/ folders"
            ) from None
        train_aug = cls(root, train=True, transform=aug, download=False)
        test = cls(root, train=False, transform=plain, download=False)
        info = DatasetInfo(cls_name.lower(), num_classes, 3, 32, tuple(train.classes))
        return RawDataset(info, train, train_aug, test, f"torchvision-{cls_name}",
                          small=(CIFAR_MEAN, CIFAR_STD, 4))

    load.__doc__ = f"torchvision {cls_name}, downloaded to the cache dir or read from --data-dir"
    return load


DATASETS.register("cifar10")(_torchvision_cifar("CIFAR10", 10))
DATASETS.register("cifar100")(_torchvision_cifar("CIFAR100", 100))
STATIC_INFO["digits"] = DatasetInfo("digits", 10, 1, 8, tuple(str(i) for i in range(10)))
STATIC_INFO["cifar10"] = DatasetInfo("cifar10", 10, 3, 32)
STATIC_INFO["cifar100"] = DatasetInfo("cifar100", 100, 3, 32)


@DATASETS.register(
    "imagefolder", help="--data-dir with train/ and val/ or test/ class folders (CIFAR-style when 32x32)"
)
def _imagefolder(data_dir: Path | None, download: bool) -> RawDataset:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    if data_dir is None or not (data_dir / "train").is_dir():
        raise AutopruneError(
            "imagefolder needs data_dir, a folder holding train/<class>/*.jpg and val/ or test/"
        )
    held_out = next((data_dir / s for s in ("test", "val") if (data_dir / s).is_dir()), None)
    if held_out is None:
        raise AutopruneError(f"{data_dir} has train/ but neither val/ nor test/")
    both = (data_dir / "val").is_dir() and (data_dir / "test").is_dir()
    try:
        probe = ImageFolder(data_dir / "train")
        with Image.open(probe.samples[0][0]) as im:
            width, height = im.size
    except (FileNotFoundError, IndexError, OSError) as err:
        raise AutopruneError(f"{data_dir / 'train'} holds no readable images in class folders "
                             f"({type(err).__name__})") from None
    small = max(width, height) <= 64
    if small:
        mean, std = (CIFAR_MEAN, CIFAR_STD) if (width, height) == (32, 32) else (IMAGENET_MEAN, IMAGENET_STD)
        plain, aug = _small_transforms(width, mean, std)
        size, small = width, (mean, std, width // 8)
    else:
        plain, aug = _large_transforms(IMAGENET_MEAN, IMAGENET_STD)
        size, small = 224, None
    train = ImageFolder(data_dir / "train", transform=plain, loader=_rgb_loader)
    train_aug = ImageFolder(data_dir / "train", transform=aug, loader=_rgb_loader)
    test = ImageFolder(held_out, transform=plain, loader=_rgb_loader)
    val = ImageFolder(data_dir / "val", transform=plain, loader=_rgb_loader) if both else None
    for split in (test, val):
        if split is not None and split.classes != train.classes:
            raise AutopruneError(f"{split.root} and {data_dir / 'train'} have different class folders: "
                                 f"{_class_difference(split.classes, train.classes)}")
    if val is not None:
        _check_apart(val, test)
    info = DatasetInfo("imagefolder", len(train.classes), 3, size, tuple(train.classes))
    return RawDataset(info, train, train_aug, test, f"imagefolder:{data_dir.resolve()}", val=val, small=small)


def _check_apart(val, test) -> None:
    """Refuse a val/ that shares images with test/: the same folder or file through a link, or a
    copy (same class and name, same bytes), so search-val never scores a reported image."""
    import hashlib

    def files(ds) -> dict[str, Path]:
        return {str(Path(p).relative_to(ds.root)): Path(p) for p, _ in ds.samples}

    v, t = files(val), files(test)
    real = {p.resolve() for p in t.values()}
    shared = [k for k, p in v.items() if p.resolve() in real or (
        k in t and p.stat().st_size == t[k].stat().st_size
        and hashlib.sha256(p.read_bytes()).digest() == hashlib.sha256(t[k].read_bytes()).digest())]
    if shared:
        raise AutopruneError(f"{val.root} and {test.root} share {len(shared)} image(s) (first: {shared[0]}); "
                             "a held-out search-val must not overlap the reported test images")


def _class_difference(theirs: list[str], train: list[str]) -> str:
    extra, missing = sorted(set(theirs) - set(train)), sorted(set(train) - set(theirs))
    parts = ([f"{', '.join(extra[:3])} not in train/"] if extra else []) + \
        ([f"{', '.join(missing[:3])} missing"] if missing else [])
    return "; ".join(parts) or "the same names in another order"


def _rgb_loader(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")
