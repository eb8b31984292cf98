"""Small-image datasets held in memory as one uint8 tensor, augmented a batch at a time.

A CIFAR-size training set is 150 MB as uint8: decoding its 50,000 JPEG files once (cached on
disk) and augmenting whole batches where the model runs (a GPU, or the CPU) replaces a
DataLoader that decodes, crops and flips every image every epoch, which is what a GPU fine-tune
waits for. The batches follow the torchvision pipeline they replace exactly: pixels as decoded
(PIL, RGB), a random crop of the image padded with ``pad`` zero pixels a side, a horizontal flip
with probability one half, ``/ 255``, then ``(x - mean) / std``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from autoprune.common.fileio import atomic_torch_save

log = logging.getLogger(__name__)

MAX_BYTES = 4 << 30  # decoded sets larger than this stay on the per-image path


class ImageTensors(Dataset):
    """Images as uint8 ``(N, C, H, W)`` with their labels, normalised (and augmented, with
    ``pad`` > 0 or ``flip``) on the way out.

    Indexing returns one normalised image as a DataLoader would; :meth:`loader` yields whole
    batches on a device, which is what fine-tuning uses.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 pad: int = 0, flip: bool = False) -> None:
        self.images, self.labels = images, labels.long()
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.pad, self.flip = int(pad), bool(flip)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, _ = self.batch(torch.as_tensor([i]), None, "cpu")  # the global RNG, as torchvision's transforms
        return x[0], int(self.labels[i])

    def subset(self, indices) -> ImageTensors:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageTensors(self.images[idx], self.labels[idx], self.mean, self.std, self.pad, self.flip)

    def plain(self) -> ImageTensors:
        """The same images without augmentation."""
        return ImageTensors(self.images, self.labels, self.mean, self.std)

    def batch(self, idx: torch.Tensor, gen: torch.Generator | None, device: str | torch.device,
              images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``idx``, augmented with draws from ``gen`` (CPU), normalised on ``device``."""
        source = self.images if images is None else images
        x = source[idx.to(source.device)].to(device, non_blocking=True)
        n, _, h, w = x.shape
        if self.pad:
            p = self.pad
            offsets = torch.randint(0, 2 * p + 1, (2, n), generator=gen).to(device)
            padded = torch.nn.functional.pad(x, (p, p, p, p))  # zeros, as RandomCrop(padding=p) fills
            rows = (offsets[0][:, None] + torch.arange(h, device=device))[:, None, :, None]
            cols = (offsets[1][:, None] + torch.arange(w, device=device))[:, None, None, :]
            x = padded[torch.arange(n, device=device)[:, None, None, None],
                       torch.arange(x.shape[1], device=device)[None, :, None, None], rows, cols]
        if self.flip:
            flips = (torch.rand(n, generator=gen) < 0.5).to(device)
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        mean = torch.tensor(self.mean, device=device)[:, None, None]
        std = torch.tensor(self.std, device=device)[:, None, None]
        out = x.float().div(255).sub_(mean).div_(std)
        return out, self.labels[idx].to(device, non_blocking=True)

    def loader(self, batch_size: int, seed: int = 0, device: str = "cpu", shuffle: bool = True,
               drop_last: bool = True) -> TensorLoader:
        return TensorLoader(self, batch_size, seed, device, shuffle, drop_last)


class TensorLoader:
    """Batches of an :class:`ImageTensors`, shuffled and augmented from ``generator`` (seed it
    per epoch to repeat an epoch exactly), produced on ``device``. The images move to the
    device once, on the first epoch."""

    def __init__(self, data: ImageTensors, batch_size: int, seed: int, device: str, shuffle: bool,
                 drop_last: bool) -> None:
        self.data, self.batch_size, self.device = data, batch_size, device
        self.shuffle, self.drop_last = shuffle, drop_last
        self.generator = torch.Generator().manual_seed(seed)
        self._on_device: torch.Tensor | None = None

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._on_device is None:
            self._on_device = self.data.images.to(self.device)
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.data.batch(idx, self.generator, self.device, self._on_device)


def decode(ds: Dataset, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``ds`` as uint8 ``(N, C, H, W)`` images and labels, or ``None`` where it cannot be (images
    of mixed sizes, a dataset kind this does not know, more than :data:`MAX_BYTES`).

    torchvision's CIFAR sets hold their pixels already; an ImageFolder is decoded once with its
    own loader and cached under ``cache_dir`` by a digest of its files' names, sizes and times.
    """
    data, targets = getattr(ds, "data", None), getattr(ds, "targets", None)
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4 and targets is not None:
        return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(targets, dtype=torch.long)
    samples = getattr(ds, "samples", None)
    if samples is None or not hasattr(ds, "loader"):
        return None
    key = hashlib.sha256()
    for path, label in samples:
        st = Path(path).stat()
        key.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    cached = cache_dir / f"{key.hexdigest()[:32]}.pt"
    if cached.is_file():
        try:
            blob = torch.load(cached, weights_only=True)
            return blob["images"], blob["labels"]
        except Exception as err:  # a truncated or foreign file: decode again
            log.warning("ignoring unreadable image cache %s (%s)", cached, type(err).__name__)
    images = _decode_files(ds, samples)
    if images is None:
        return None
    labels = torch.as_tensor([label for _, label in samples], dtype=torch.long)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"images": images, "labels": labels}, cached)
    return images, labels


def _decode_files(ds, samples) -> torch.Tensor | None:
    first = np.array(ds.loader(samples[0][0]), dtype=np.uint8)
    if first.ndim != 3 or first.size * len(samples) > MAX_BYTES:
        return None
    out = torch.empty((len(samples), first.shape[2], first.shape[0], first.shape[1]), dtype=torch.uint8)
    for i, (path, _) in enumerate(samples):
        arr = np.array(ds.loader(path), dtype=np.uint8)
        if arr.shape != first.shape:
            return None  # mixed sizes: per-image transforms resize them
        out[i] = torch.as_tensor(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    return out
