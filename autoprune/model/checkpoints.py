"""Loading user weights safely and strictly, and identifying them.

Checkpoints are read with ``weights_only=True``: a file that needs arbitrary unpickling is refused
rather than executed. A checkpoint that does not fit the model is a user error naming the keys
that differ, never a silently half-loaded model.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from autoprune.errors import AutopruneError

_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file: the identity of a weights file in studies and exports."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def read_checkpoint(path: str | Path) -> object:
    """``torch.load`` with ``weights_only=True``, turning every failure into one clear line."""
    path = Path(path)
    if not path.is_file():
        raise AutopruneError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = _ANSI.sub("", str(err)).strip()  # torch colours its message for terminals
        first = text.splitlines()[0] if text else "unpickling refused"
        raise AutopruneError(
            f"{path} holds objects that weights_only loading refuses ({first[:160]}); "
            "save a plain state_dict with torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise AutopruneError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
            f"{str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__}"
        ) from None


def extract_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state_dict in ``obj``: itself, or under a usual key; a DataParallel prefix is removed."""
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(v, torch.Tensor) for v in obj.values()
    ):
        raise AutopruneError(
            f"{source} holds no state_dict (expected a dict of tensors, or one under "
            f"{', '.join(repr(k) for k in _NESTED_KEYS)})"
        )
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ``path`` into ``model`` strictly (every key, every shape) and return the model."""
    state = extract_state_dict(read_checkpoint(path), str(path))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} of another shape (first: {k} {tuple(state[k].shape)} "
                f"vs {tuple(own[k].shape)})"
            )
        raise AutopruneError(
            f"{path} does not fit this model: {'; '.join(parts)}; check the model and the dataset"
            " (number of classes, image size)"
        )
    model.load_state_dict(state, strict=True)  # casts e.g. float16 fixtures into float32
    return model
