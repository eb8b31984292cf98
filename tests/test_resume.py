"""Kill a search with SIGKILL mid-episode and resume it: no trial lost, none duplicated."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
import torch
from optuna.trial import TrialState

from tests.conftest import REPO

TINY = f"{REPO / 'tests' / 'tinynets.py'}:tiny"


@pytest.fixture
def tiny_weights(trained_tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(trained_tiny.state_dict(), path)
    return path


def _states(db) -> list[str]:
    """Trial states in order; a running trial with all five TinyNet parameters reads RUNNING+."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            rows = con.execute("SELECT t.state, (SELECT count(*) FROM trial_params p WHERE "
                               "p.trial_id = t.trial_id) FROM trials t ORDER BY t.number").fetchall()
            return [state + ("+" if state == "RUNNING" and n == 5 else "") for state, n in rows]
    except sqlite3.OperationalError:  # not created yet, or locked for a moment
        return []


def _search_cmd(db, weights, searcher, episodes):
    cmd = [sys.executable, "-m", "autoprune.cli", "search", "--model", TINY, "--weights", str(weights),
           "--dataset", "digits", "--budget", "0.5flops", "--searcher", searcher,
           "--episodes", str(episodes), "--storage", f"sqlite:///{db}", "--study-name", "s",
           "--episode-finetune-steps", "10", "-q"]
    return cmd + (["--warmup", "3"] if searcher == "ddpg" else [])


def _kill_after(proc, db, complete: int, running: bool, timeout: float = 120) -> None:
    """SIGKILL ``proc`` once ``complete`` trials are done (and one is running, if asked)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = _states(db)
        if states.count("COMPLETE") >= complete and (not running or states[-1:] == ["RUNNING+"]):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"search ended before it could be killed: {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("search made no progress")


@pytest.mark.parametrize("searcher", ["tpe", "ddpg"])
def test_sigkill_mid_episode_then_resume(tmp_path, tiny_weights, searcher):
    db = tmp_path / "s.db"
    episodes = 10
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for kill_at in (2, 5):  # two kills, two resumes
        cmd = _search_cmd(db, tiny_weights, searcher, episodes) + (["--resume"] if kill_at > 2 else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=tmp_path)
        _kill_after(proc, db, kill_at, running=searcher == "tpe")
    done = subprocess.run(_search_cmd(db, tiny_weights, searcher, episodes) + ["--resume"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == episodes
    uids = [t.user_attrs["uid"] for t in complete]
    assert len(set(uids)) == len(uids)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    failed = study.get_trials(states=(TrialState.FAIL,))
    if searcher == "tpe":
        # each kill left one running trial: failed on resume, retried with the same parameters
        assert len(failed) == 2
        retries = [t for t in complete if "retry_of" in t.user_attrs]
        assert sorted(t.user_attrs["retry_of"] for t in retries) == sorted(t.number for t in failed)
        by_number = {t.number: t for t in study.trials}
        for t in retries:
            assert t.params == by_number[t.user_attrs["retry_of"]].params
    else:
        assert not failed
        assert (tmp_path / "autoprune-state" / "s" / "agent.pt").is_file()


def test_pending_rl_episode_is_recorded_on_resume(tiny_task, tmp_path):
    """A kill between the agent's checkpoint and the trial insert loses nothing."""
    from autoprune.agents.rl import DDPGSearcher
    from autoprune.envs import LayerSparsityEnv
    from autoprune.studies.records import episode_attrs, frozen_record
    from autoprune.studies.runner import recover

    env = LayerSparsityEnv(tiny_task, budget="0.5flops")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/p.db", study_name="p")
    agent = DDPGSearcher(seed=0, warmup=1)
    agent.setup(env, study, 4)
    ep = agent.episode(env, None)
    record = frozen_record(ep, env.table.names, env.min_sparsity, env.max_sparsity, [ep.reward],
                           episode_attrs(ep, "ddpg", 0, "uid-1", 0.1))
    agent.save(tmp_path / "state", pending=record)  # ...and the process dies here
    fresh = DDPGSearcher(seed=0, warmup=1)
    fresh.setup(env, study, 4)
    recover(study, fresh, tmp_path / "state", quiet=True)
    assert [t.user_attrs["uid"] for t in study.trials] == ["uid-1"]
    assert fresh.episode_index == 1
    recover(study, fresh, tmp_path / "state", quiet=True)  # idempotent
    assert len(study.trials) == 1
