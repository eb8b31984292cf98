"""Kill a search with SIGKILL mid-episode and resume it: no trial lost, none duplicated."""

from __future__ import annotations

import os
import random
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


def _kill_after(proc, db, complete: int, delay: float, timeout: float = 300) -> None:
    """SIGKILL ``proc`` ``delay`` seconds after the study first holds ``complete`` finished trials."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if sum(s == "COMPLETE" for s in _states(db)) >= complete:
            time.sleep(delay)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"search ended (exit {proc.returncode}) before it could be killed: {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"search made no progress in {timeout}s: states {_states(db)}")


@pytest.mark.slow
@pytest.mark.parametrize("searcher", ["tpe", "ddpg"])
def test_five_random_sigkills_then_resume(tmp_path, tiny_weights, searcher):
    """kill -9 at five random points (mid-episode, mid-write, between episodes), resume each time."""
    db = tmp_path / "s.db"
    episodes = 12
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(f"kills-{searcher}")
    for k, at in enumerate((1, 3, 5, 7, 9)):
        cmd = _search_cmd(db, tiny_weights, searcher, episodes) + (["--resume"] if k else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=tmp_path)
        _kill_after(proc, db, at, delay=rng.uniform(0.0, 0.4))
    done = subprocess.run(_search_cmd(db, tiny_weights, searcher, episodes) + ["--resume"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    summary = [(t.number, t.state.name, t.user_attrs.get("retry_of")) for t in study.trials]
    assert len(complete) == episodes, summary
    uids = [t.user_attrs["uid"] for t in complete]
    assert len(set(uids)) == len(uids), summary
    assert not study.get_trials(states=(TrialState.RUNNING,)), summary
    failed = study.get_trials(states=(TrialState.FAIL,))
    by_number = {t.number: t for t in study.trials}
    for t in complete:
        if "retry_of" in t.user_attrs:  # a retried sampler trial repeats what the killed one asked
            original = by_number[t.user_attrs["retry_of"]]
            assert original.state == TrialState.FAIL
            assert original.params.items() <= t.params.items()
    # a trial killed while its record was being written is failed with what it had written (Optuna
    # writes user attributes one at a time): its episode is never counted, nor told again
    assert not {t.user_attrs.get("uid") for t in failed} & set(uids), summary
    if searcher == "ddpg":
        (state,) = (tmp_path / "autoprune-state").glob("s-*/agent.pt")
        agent = torch.load(state, weights_only=True)
        assert agent["episode_index"] == episodes  # the agent learned from exactly the episodes the study holds


class _Killed(BaseException):
    pass


def test_pending_rl_episode_is_recorded_on_resume(tiny_task, tmp_path, monkeypatch):
    """A kill between the agent's checkpoint and telling the study loses nothing: the resumed run
    tells the trial the checkpoint describes, once."""
    from autoprune.agents.rl import DDPGSearcher
    from autoprune.envs import LayerSparsityEnv
    from autoprune.studies.recovery import recover
    from autoprune.studies.runner import SearchConfig, play_episode

    env = LayerSparsityEnv(tiny_task, budget="0.5flops")
    agent = DDPGSearcher(seed=0, warmup=1)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/p.db", study_name="p", sampler=agent.sampler(env, 0))
    agent.setup(env, study, 4)

    def die(*args, **kwargs):
        raise _Killed  # the process dies after the agent saved its state, before the study heard

    with monkeypatch.context() as m:
        m.setattr(optuna.study.Study, "tell", die)
        with pytest.raises(_Killed):
            play_episode(env, agent, study, None, SearchConfig(searcher="ddpg"), tmp_path / "state", 0)
    (running,) = study.get_trials(states=(TrialState.RUNNING,))
    assert running.params and running.user_attrs["searcher"] == "ddpg"  # recorded before the save
    fresh = DDPGSearcher(seed=0, warmup=1)
    fresh.sampler(env, 1)
    fresh.setup(env, study, 4)
    recover(study, fresh, tmp_path / "state", quiet=True, exclusive=True)
    (done,) = study.trials
    assert done.state == TrialState.COMPLETE and done.values == [running.user_attrs["reward"]]
    assert fresh.episode_index == 1  # the agent's state has the episode the study now has
    recover(study, fresh, tmp_path / "state", quiet=True, exclusive=True)  # idempotent
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]


def test_a_pending_episode_saved_whole_by_an_older_checkpoint_is_added(tiny_task, tmp_path):
    """Checkpoints written before every episode went through ask/tell held the whole trial."""
    from autoprune.agents.base import param_name
    from autoprune.agents.rl import DDPGSearcher
    from autoprune.envs import LayerSparsityEnv
    from autoprune.studies.records import EpisodeRecord
    from autoprune.studies.recovery import recover

    env = LayerSparsityEnv(tiny_task, budget="0.5flops")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/p.db", study_name="p")
    agent = DDPGSearcher(seed=0, warmup=1)
    agent.sampler(env, 0)
    agent.setup(env, study, 4)
    ep = agent.episode(env, None)
    attrs = EpisodeRecord.of(ep, "ddpg", 0, "uid-1", 0.1).to_attrs()
    low, high = env.space.low.tolist(), env.space.high.tolist()
    params = {param_name(n): min(max(float(r), lo), hi)
              for n, r, lo, hi in zip(env.table.names, ep.requested, low, high)}
    agent.save(tmp_path / "state", pending={"params": params, "low": low, "high": high, "values": [ep.reward],
                                            "user_attrs": attrs})
    fresh = DDPGSearcher(seed=0, warmup=1)
    fresh.setup(env, study, 4)
    recover(study, fresh, tmp_path / "state", quiet=True)
    assert [t.user_attrs["uid"] for t in study.trials] == ["uid-1"]
    recover(study, fresh, tmp_path / "state", quiet=True)  # idempotent
    assert len(study.trials) == 1


def test_a_trial_completed_while_heartbeats_are_checked_is_not_retried(tmp_path, monkeypatch):
    """Only the trials the heartbeat check failed are retried; one its live worker completed
    meanwhile is not (a retry would ask for the same policy twice: seen with four workers)."""
    from optuna.distributions import FloatDistribution

    from autoprune.studies import recovery

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/h.db")
    done = study.ask({"x": FloatDistribution(0, 1)})
    stale = study.ask({"x": FloatDistribution(0, 1)})

    def check(s):  # meanwhile its worker completes one; the heartbeat check fails the other
        s.tell(done, 1.0)
        s.tell(stale, state=TrialState.FAIL)

    monkeypatch.setattr(optuna.storages, "fail_stale_trials", check)
    assert [t.number for t in recovery._fail_heartbeat_stale(study)] == [stale.number]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs["retry_of"] for t in waiting] == [stale.number]


def test_a_retried_rule_is_played_as_the_killed_one_was(tmp_path, monkeypatch):
    """A rule played again with the wall aimed by its own ratio keeps that aim when its trial is
    retried: the same parameters under another aim would be cut to other widths."""
    from optuna.distributions import FloatDistribution

    from autoprune.studies import recovery

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/r.db")
    played = {"rule": "uncoupled", "replay": True, "aim": 0.97, "scale": 0.9}
    study.enqueue_trial({"x": 0.5}, user_attrs=played)
    stale = study.ask({"x": FloatDistribution(0, 1)})
    monkeypatch.setattr(optuna.storages, "fail_stale_trials", lambda s: s.tell(stale, state=TrialState.FAIL))
    assert [t.number for t in recovery._fail_heartbeat_stale(study)] == [stale.number]
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.user_attrs == {"retry_of": stale.number, **played}
    assert retry.system_attrs["fixed_params"] == {"x": 0.5}


def test_a_hot_journal_left_by_a_kill_mid_write_is_rolled_back_not_refused(tmp_path):
    """kill -9 inside a write transaction leaves a hot journal; the storage check must accept it."""
    from autoprune.studies.storage import check_storage

    db = tmp_path / "s.db"
    writer = f"""
import os, sqlite3
con = sqlite3.connect({str(db)!r}, isolation_level=None)
con.execute("PRAGMA cache_size=1")
con.execute("CREATE TABLE t(x BLOB)")
con.execute("BEGIN")
for _ in range(200):
    con.execute("INSERT INTO t VALUES (randomblob(4000))")
con.execute("COMMIT")
con.execute("BEGIN")
con.execute("UPDATE t SET x = randomblob(4000)")
os._exit(9)
"""
    subprocess.run([sys.executable, "-c", writer], check=False)
    assert (tmp_path / "s.db-journal").is_file()  # the kill left a hot journal behind
    check_storage(f"sqlite:///{db}")
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*) FROM t").fetchone() == (200,)  # the committed rows stand
    assert not (tmp_path / "s.db-journal").exists()
