"""Several worker processes on one study: journal storage on one host, PostgreSQL across hosts."""

from __future__ import annotations

import os
import uuid
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState

from autoprune.cli import main
from tests.conftest import REPO

TINY = f"{REPO / 'tests' / 'tinynets.py'}:tiny"


def _four_workers(capsys, storage: str, study: str, weights, episodes: int = 16):
    os.environ["PYTHONPATH"] = str(REPO)  # the workers import tests.tinynets by file path anyway
    code = main(["search", "--model", TINY, "--weights", str(weights), "--dataset", "digits",
                 "--budget", "0.5flops", "--searcher", "tpe", "--episodes", str(episodes),
                 "--storage", storage, "--study-name", study, "--workers", "4", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _check(study: optuna.Study, episodes: int) -> None:
    trials = study.get_trials()
    states = Counter(t.state for t in trials)
    assert states == {TrialState.COMPLETE: episodes}  # every trial completed, none failed
    uids = [t.user_attrs["uid"] for t in trials]
    assert len(set(uids)) == episodes  # no episode recorded twice
    workers = Counter(t.user_attrs["worker"] for t in trials)
    assert len(workers) == 4 and set(workers.values()) == {episodes // 4}
    assert all(t.user_attrs["ratios"]["flops"] <= 0.5 + 1e-9 for t in trials)
    # each worker samples with its own seed: no policy is asked for twice
    assert len({tuple(sorted(t.params.items())) for t in trials}) == episodes


@pytest.mark.slow
def test_four_workers_on_journal_storage(capsys, tmp_path, tiny_weights):
    storage = f"journal:///{tmp_path}/search.log"
    out = _four_workers(capsys, storage, "w", tiny_weights)
    assert "study 'w' in journal:///" in out and "16 trials (16 new)" in out
    from autoprune.studies.storage import open_storage

    _check(optuna.load_study(study_name="w", storage=open_storage(storage)), 16)


@pytest.mark.slow
def test_four_workers_on_postgresql(capsys, tiny_weights):
    url = os.environ.get("AUTOPRUNE_TEST_POSTGRES")
    if not url:
        pytest.skip("no PostgreSQL: .ci/run starts one and sets AUTOPRUNE_TEST_POSTGRES")
    name = f"w-{uuid.uuid4().hex[:8]}"
    try:
        _four_workers(capsys, url, name, tiny_weights)
        from autoprune.studies.storage import open_storage

        _check(optuna.load_study(study_name=name, storage=open_storage(url)), 16)
    finally:
        optuna.delete_study(study_name=name, storage=url)


@pytest.mark.parametrize("extra,match", [
    (["--storage", "sqlite:///x.db"], "SQLite serves one writer"),
    (["--storage", "journal:///x.log", "--searcher", "ddpg"], "learns from its own episodes in order"),
    (["--storage", "journal:///x.log", "--searcher", "uniform"], "is a single episode"),
])
def test_workers_refused_where_they_cannot_work(capsys, tmp_path, monkeypatch, extra, match):
    monkeypatch.chdir(tmp_path)
    code = main(["search", "--model", "resnet20", "--workers", "3", "-q", *extra])
    _, err = capsys.readouterr()
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
