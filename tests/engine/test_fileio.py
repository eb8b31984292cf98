import os
import stat

import pytest
import torch

from autoprune.common.fileio import atomic_torch_save, atomic_write_text
from autoprune.errors import AutopruneError


def test_atomic_files_get_the_permissions_of_a_plain_write(tmp_path):
    old = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        text = atomic_write_text(tmp_path / "policy.json", "{}")
        blob = atomic_torch_save({"a": torch.zeros(1)}, tmp_path / "agent.pt")
    finally:
        os.umask(old)
    want = stat.S_IMODE(plain.stat().st_mode)
    assert want == 0o644
    assert stat.S_IMODE(text.stat().st_mode) == want
    assert stat.S_IMODE(blob.stat().st_mode) == want


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "cache.json", "old")

    def explode(f):
        f.write(b"half")
        raise RuntimeError("killed mid-write")

    from autoprune.common import fileio

    with pytest.raises(RuntimeError):
        fileio._atomic(path, explode)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]


def test_an_unwritable_folder_is_a_user_error(tmp_path):
    with pytest.raises(AutopruneError, match="cannot write"):
        atomic_write_text(tmp_path / "missing" / "policy.json", "{}")
