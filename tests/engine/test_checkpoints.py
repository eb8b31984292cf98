from __future__ import annotations

import pickle

import pytest
import torch

from autoprune.errors import AutopruneError
from autoprune.model.checkpoints import load_weights
from tests.tinynets import tiny


def _sd():
    return tiny().state_dict()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "dataparallel"])
def test_checkpoint_layouts_load(tmp_path, wrap):
    sd = _sd()
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd},
           "dataparallel": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    torch.save(obj, tmp_path / "w.pt")
    model = tiny()
    load_weights(model, tmp_path / "w.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])


def test_checkpoint_for_another_architecture_names_the_mismatch(tmp_path):
    torch.save(tiny(num_classes=5).state_dict(), tmp_path / "w.pt")
    with pytest.raises(AutopruneError, match="another shape .*fc.weight"):
        load_weights(tiny(num_classes=10), tmp_path / "w.pt")


def test_truncated_checkpoint(tmp_path):
    torch.save(_sd(), tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "w.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(AutopruneError, match="truncated or corrupt"):
        load_weights(tiny(), tmp_path / "w.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused_by_weights_only(tmp_path):
    torch.save({"state_dict": _sd(), "hook": _Evil()}, tmp_path / "w.pt")
    with pytest.raises(AutopruneError, match="weights_only"):
        load_weights(tiny(), tmp_path / "w.pt")
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(AutopruneError):
        load_weights(tiny(), tmp_path / "raw.pkl")


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(AutopruneError, match="not found"):
        load_weights(tiny(), tmp_path / "nope.pt")
    torch.save({"epoch": 3}, tmp_path / "w.pt")
    with pytest.raises(AutopruneError, match="no state_dict"):
        load_weights(tiny(), tmp_path / "w.pt")
