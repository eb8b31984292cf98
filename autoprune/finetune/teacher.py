"""The dense teacher's logits, computed once per batch and shared by every fine-tune that sees it.

Distillation runs the dense model forward on every training batch: on a pruned ResNet-56 that is
about half of a step. Yet on the in-memory path (:mod:`autoprune.data.tensors`, and a tensor
dataset such as the bundled digits) each epoch's batches follow from ``(seed, epoch)`` alone, so
every fine-tune with the same seed and batch size meets the same augmented images: the top-K
candidates of an export, the winner's full fine-tune after them, a study's pairs and predictor
runs. The teacher's answer to those batches is
the same each time; :class:`TeacherLogits` keeps it, in memory and as one file per epoch under the
cache folder, keyed by everything that decides it (the teacher's weights, the images and labels,
the augmentation, seed, batch size, precision, memory layout and device kind). A run that finds an
epoch there trains on the stored logits and skips the teacher.

A hit is checked: the first batch of each epoch read back is run through the teacher again and must
match what was stored (bfloat16 rounding apart); a mismatch (something the key missed) turns the
store off for the rest of the run, with a warning, and the run computes as it would have.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from autoprune.common.fileio import atomic_torch_save
from autoprune.data.datasets import default_cache_dir
from autoprune.data.tensors import TensorLoader

log = logging.getLogger(__name__)

_FORMAT = "autoprune.teacher-logits/1"
_MEMORY: dict[tuple[str, int], torch.Tensor] = {}  # (key, epoch) -> logits, for runs in one process
_MEMORY_BYTES = 256 << 20
EPOCH_BYTES = 64 << 20  # an epoch's logits beyond this are not kept (CIFAR-10's: 1 MB)


def default_folder() -> Path:
    """Where stored teacher logits live: ``teacher-logits/`` under the cache folder."""
    return default_cache_dir() / "teacher-logits"


def _digest(h, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _batches(loader) -> tuple | None:
    """What decides ``loader``'s batches once its generator is seeded, or ``None`` where that is
    not all (image files decoded and augmented in worker processes, a dataset type not known here)."""
    if isinstance(loader, TensorLoader):
        data = loader.data
        return (_data_digest(data, (data.images, data.labels)), "tensors", data.pad, data.flip, data.mean,
                data.std, loader.batch_size, loader.shuffle, loader.drop_last)
    if not isinstance(loader, DataLoader) or loader.num_workers or loader.generator is None:
        return None
    ds, rows = loader.dataset, None
    if isinstance(ds, Subset):
        ds, rows = ds.dataset, torch.as_tensor(ds.indices)
    if not isinstance(ds, TensorDataset):  # a tensor dataset has no transform: nothing random per item
        return None
    parts = (*ds.tensors, rows) if rows is not None else ds.tensors
    return (_data_digest(loader.dataset, parts), "dataloader", type(loader.sampler).__name__,
            loader.batch_size, loader.drop_last)


def _data_digest(owner, tensors) -> str:
    cached = getattr(owner, "_teacher_digest", None)
    if cached is None:  # the training images are hashed once per process
        h = hashlib.blake2b(digest_size=16)
        for t in tensors:
            _digest(h, t)
        cached = h.hexdigest()
        owner._teacher_digest = cached
    return cached


class TeacherLogits:
    """The stored logits of one teacher on one seeded run's batches (see the module docstring).

    Build with :meth:`for_run`, which returns ``None`` where the batches are not decided by the
    seed alone (a DataLoader decoding and augmenting image files in worker processes).
    ``epoch(e)`` gives the stored ``(steps, batch, classes)`` logits of epoch ``e`` or ``None``;
    ``store(e, logits)`` keeps a computed epoch (a longer one replaces a shorter one, as a run of
    more steps than an earlier one extends it).
    """

    def __init__(self, key: str, folder: Path | None) -> None:
        self.key, self.folder = key, folder
        self.enabled = True

    @classmethod
    def for_run(cls, teacher: nn.Module, loader, *, seed: int, amp: bool, layout: torch.memory_format,
                device: str, folder: Path | None) -> TeacherLogits | None:
        batches = _batches(loader)
        if batches is None:
            return None
        h = hashlib.blake2b(digest_size=20)
        h.update(repr((_FORMAT, torch.__version__, batches, int(seed), bool(amp), str(layout),
                       torch.device(device).type)).encode())
        for name, value in teacher.state_dict().items():
            h.update(name.encode())
            _digest(h, value)
        return cls(h.hexdigest(), folder)

    def _path(self, epoch: int) -> Path | None:
        return None if self.folder is None else self.folder / self.key / f"epoch-{epoch}.pt"

    def epoch(self, epoch: int) -> torch.Tensor | None:
        if not self.enabled:
            return None
        found = _MEMORY.get((self.key, epoch))
        path = self._path(epoch)
        if found is None and path is not None and path.exists():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved.get("format") == _FORMAT and saved.get("key") == self.key:
                    found = saved["logits"]
                    _remember(self.key, epoch, found)
            except Exception as e:  # an unreadable file is a miss; the run computes and rewrites it
                log.warning("teacher logits %s unreadable (%s); computing them again", path, e)
        return found

    def store(self, epoch: int, logits: list[torch.Tensor]) -> None:
        if not (self.enabled and logits):
            return
        stacked = torch.stack([t.detach().cpu() for t in logits])
        known = self.epoch(epoch)
        if known is not None and len(known) >= len(stacked):
            return
        _remember(self.key, epoch, stacked)
        path = self._path(epoch)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_torch_save({"format": _FORMAT, "key": self.key, "logits": stacked}, path)
            except OSError as e:  # a read-only or full cache costs speed, never the run
                log.warning("could not store teacher logits under %s (%s)", path.parent, e)

    def fits(self, batch_logits: torch.Tensor, steps: int) -> bool:
        """Whether an epoch of ``steps`` batches like ``batch_logits`` is small enough to keep
        (:data:`EPOCH_BYTES`); if not, the store is off for this run, which then runs as without it."""
        size = steps * batch_logits.numel() * batch_logits.element_size()
        if size > EPOCH_BYTES:
            self.enabled = False
            log.info("teacher logits not kept: an epoch's would take %d MB", size >> 20)
        return size <= EPOCH_BYTES

    def verify(self, stored: torch.Tensor, computed: torch.Tensor) -> bool:
        """Whether ``computed`` (the teacher run again on a batch) matches ``stored``; if not, the
        store is off for this run."""
        a, b = stored.float(), computed.detach().float().cpu()
        ok = a.shape == b.shape and bool(torch.allclose(a, b, rtol=2e-2, atol=5e-2))
        if not ok:
            self.enabled = False
            log.warning("stored teacher logits do not match the teacher on this run's batch "
                        "(largest difference %s); computing them for the rest of the run",
                        f"{(a - b).abs().max().item():.3g}" if a.shape == b.shape else "shape")
        return ok


def _remember(key: str, epoch: int, logits: torch.Tensor) -> None:
    _MEMORY[(key, epoch)] = logits
    total = sum(t.numel() * t.element_size() for t in _MEMORY.values())
    while total > _MEMORY_BYTES and len(_MEMORY) > 1:  # oldest first
        oldest = next(iter(_MEMORY))
        total -= _MEMORY[oldest].numel() * _MEMORY[oldest].element_size()
        del _MEMORY[oldest]
