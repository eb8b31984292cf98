"""Atomic file writes: a file is either the old one or the complete new one, never half of it.

Every write goes to a uniquely named temporary file in the destination's folder, then
``os.replace`` moves it into place; two processes writing the same cache never tear it. The file
gets the permissions a plain ``open(path, "w")`` would give (``mkstemp`` makes it owner-only).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from autoprune.errors import AutopruneError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: str | Path, write) -> Path:
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise AutopruneError(f"cannot write {path}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise AutopruneError(f"cannot write {path}: {err.strerror}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return _atomic(path, lambda f: f.write(text.encode()))


def atomic_torch_save(obj, path: str | Path) -> Path:
    """``torch.save(obj, path)`` atomically."""
    return _atomic(path, lambda f: torch.save(obj, f))


def write_document(path: str | Path, data) -> Path:
    """Write ``data`` atomically as YAML when the suffix is ``.yaml``/``.yml``, else as JSON."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    return atomic_write_text(path, text)
