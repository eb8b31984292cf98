"""The Python API: a model the registry does not know, scored by the user's own function."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import autoprune
from autoprune.errors import AutopruneError
from autoprune.evaluate.metrics import accuracy


@pytest.fixture(scope="module")
def user_task(trained_tiny, digits):
    """What a user holds: a model in memory, a score of their own and batches of inputs."""
    val = digits.search_val

    def score(model: nn.Module) -> float:  # e.g. a detector's mAP; here a top-1 accuracy
        return accuracy(model, val, 256)

    calib = [(x, y) for x, y in digits.calib.batches(64)]
    return trained_tiny, digits.example_input(1), score, calib


def _search(user_task, tmp_path, **kw):
    model, example, score, calib = user_task
    return autoprune.search(model, example, "0.5flops", score=score, calib=calib, data_name="digits-val",
                            searcher="random", episodes=3, storage=f"sqlite:///{tmp_path}/api.db",
                            study_name="api", progress=False, **kw)


@pytest.mark.slow
def test_search_export_and_reload_a_user_model(user_task, tmp_path):
    result = _search(user_task, tmp_path)
    trials = result.study.trials
    assert len(trials) == 3 and result.new_trials == 3
    model, _, score, _ = user_task
    best = result.best
    # every episode was scored by the user's function: the record is what it returns
    pruned = result.pruned_model(best)
    assert score(pruned) == pytest.approx(best.user_attrs["accuracy"], abs=1e-9)
    assert best.user_attrs["ratios"]["flops"] <= 0.5 + 1e-9
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    record = result.record
    assert record.task.model == "python:tests.tinynets.TinyNet" and record.task.dataset == "digits-val"
    assert record.fingerprint.weights.startswith("state-sha256:")

    metrics = result.export(tmp_path / "out")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files == {"model.pt2", "policy.json", "metrics.json"}  # no pruned.pt: autoprune cannot rebuild it
    program = torch.export.load(str(tmp_path / "out" / "model.pt2")).module()
    x = user_task[1].repeat(4, 1, 1, 1)
    torch.testing.assert_close(program(x), pruned(x), rtol=1e-4, atol=1e-5)
    assert metrics["pruned"]["proxy_acc"] == pytest.approx(best.user_attrs["accuracy"], abs=1e-9)
    doc = json.loads((tmp_path / "out" / "policy.json").read_text())
    assert {u["name"]: u["kept"] for u in doc["units"]} == result.best_policy.widths


@pytest.mark.slow
def test_resume_and_load_refuse_other_weights(user_task, tmp_path):
    _search(user_task, tmp_path)
    model, example, score, calib = user_task
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc.bias.add_(0.1)
    with pytest.raises(AutopruneError, match="made with weights=.state-sha256"):
        autoprune.search(other, example, "0.5flops", score=score, calib=calib, data_name="digits-val",
                         searcher="random", episodes=4, storage=f"sqlite:///{tmp_path}/api.db",
                         study_name="api", resume=True, progress=False)
    with pytest.raises(AutopruneError, match="rebuilt task's weights differ"):
        autoprune.load("api", f"sqlite:///{tmp_path}/api.db", model=other, example_inputs=example,
                       score=score, calib=calib).pruned_model()
    with pytest.raises(AutopruneError, match="model given in Python"):
        autoprune.load("api", f"sqlite:///{tmp_path}/api.db").pruned_model()
    # the same model resumes, and a loaded result rebuilds the very model the search scored
    resumed = autoprune.search(model, example, "0.5flops", score=score, calib=calib, data_name="digits-val",
                               searcher="random", episodes=4, storage=f"sqlite:///{tmp_path}/api.db",
                               study_name="api", resume=True, progress=False)
    assert resumed.new_trials == 1 and len(resumed.study.trials) == 4
    loaded = autoprune.load("api", f"sqlite:///{tmp_path}/api.db", model=model, example_inputs=example,
                            score=score, calib=calib)
    assert score(loaded.pruned_model()) == pytest.approx(loaded.best.user_attrs["accuracy"], abs=1e-9)


def test_bad_api_arguments_are_one_clear_error(user_task, tmp_path):
    model, example, score, calib = user_task
    with pytest.raises(AutopruneError, match="needs score, calib"):
        autoprune.search(model, example, storage=f"sqlite:///{tmp_path}/x.db")
    with pytest.raises(AutopruneError, match="unknown setting"):
        _search(user_task, tmp_path, granularty="channel")
    with pytest.raises(AutopruneError, match="needs class labels"):
        _search(user_task, tmp_path, importance="taylor")
    with pytest.raises(AutopruneError, match="score function returned nan"):
        autoprune.search(model, example, score=lambda m: float("nan"), calib=calib, episodes=1,
                         storage=f"sqlite:///{tmp_path}/x.db", progress=False)
    assert not (tmp_path / "x.db").exists()  # refused before any study was written
