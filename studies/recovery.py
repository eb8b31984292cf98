"""Recovering from a killed search, and keeping one process per SQLite study.

A trial left ``RUNNING`` by a dead worker is failed; a sampler's trial is retried with the same
parameters (enqueued, so the next ask picks it up); an RL agent's episode saved with its
checkpoint but not yet told to the study is told. Who is dead is told by the worker's process id on
this host, by RDB heartbeats across hosts, or, for SQLite, by holding the study's lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import warnings
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import optuna
from optuna.trial import TrialState

from autoprune.agents import Searcher
from autoprune.errors import AutopruneError
from autoprune.studies.records import add_record, completed
from autoprune.studies.storage import GRACE_PERIOD, sqlite_path, storage_kind

log = logging.getLogger(__name__)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ------------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(trial, host: str, exclusive: bool) -> bool:
    """A running trial nobody is working on.

    With exclusive access (SQLite, one process per study) every running trial is stale. Otherwise
    a trial is stale if its worker process on this host is gone, or, when it was killed before it
    could say which worker it belongs to, if it started longer than the grace period ago.
    """
    if exclusive:
        return True
    worker = trial.user_attrs.get("worker", "")
    if not worker:
        started = trial.datetime_start
        return started is not None and (datetime.now() - started).total_seconds() > GRACE_PERIOD
    w_host, _, pid = worker.rpartition(":")
    if w_host != host or not pid.isdigit():
        return False
    return int(pid) != os.getpid() and not _pid_alive(int(pid))


def recover(study: optuna.Study, searcher: Searcher, state_dir: Path, quiet: bool = False,
            exclusive: bool = False, storage: optuna.storages.BaseStorage | None = None) -> list[int]:
    """Fail stale running trials (retrying sampler ones) and re-add an RL agent's pending episode.

    Returns the numbers of the trials that were failed.
    """
    host = socket.gethostname()
    failed = []
    finished = _finish_pending(study, searcher.load(state_dir))
    if finished and not quiet:
        log.warning("note: recorded the agent's last episode, saved before the kill")
    if _heartbeat_interval(storage):
        failed += [t.number for t in _fail_heartbeat_stale(study)]
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _is_stale(trial, host, exclusive):
            study.tell(trial.number, state=TrialState.FAIL)
            failed.append(trial.number)
            # a trial killed before (or during) its suggestions still carries its enqueued parameters
            params = {**(trial.system_attrs.get("fixed_params") or {}), **trial.params}
            # retried once: a policy that kills its worker every time must not loop forever
            if params and searcher.uses_trial and "retry_of" not in trial.user_attrs:
                study.enqueue_trial(params, user_attrs=_retry_attrs(trial))
    if failed and not quiet:
        log.warning("note: failed %d trial(s) left running by a killed worker (%s); sampler trials are "
                    "retried with the same parameters", len(failed), ", ".join(map(str, failed)))
    return failed


PLAYED_BY = ("rule", "replay", "aim", "scale", "replay_of")
"""An enqueued trial's attributes that say how it is played (a rule of the portfolio, played again
at a fraction of the aim and with the wall aimed by that rule's own ratio; a searcher's own episode
played again at its own ratio): a retry carries them,
or the wall would cut the same parameters to other widths."""


def _retry_attrs(trial: optuna.trial.FrozenTrial) -> dict:
    return {"retry_of": trial.number, **{k: trial.user_attrs[k] for k in PLAYED_BY if k in trial.user_attrs}}


def _finish_pending(study: optuna.Study, pending: dict | None) -> bool:
    """Tell the trial of an episode whose searcher saved its state but was killed before the
    study heard of it (see :func:`~autoprune.studies.runner.play_episode`); whether one was told."""
    if pending is None:
        return False
    if "user_attrs" in pending:  # a checkpoint written when such episodes were added whole
        uid = pending["user_attrs"]["uid"]
        if any(t.user_attrs.get("uid") == uid for t in completed(study)):
            return False
        add_record(study, pending)
        return True
    trials = study.get_trials(deepcopy=False)
    trial = trials[pending["trial"]] if pending["trial"] < len(trials) else None
    if trial is None or trial.state != TrialState.RUNNING or trial.user_attrs.get("uid") != pending["uid"]:
        return False
    study.tell(trial.number, pending["values"])
    return True


def _fail_heartbeat_stale(study: optuna.Study):
    """Trials of other hosts whose heartbeats stopped (RDB storages), failed and retried."""
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with warnings.catch_warnings():  # marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    # failed by it, not every trial that left RUNNING meanwhile: one its live worker completed in
    # between is no stale trial, and retrying it would ask for the same policy twice
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in before]
    for t in stale:
        if t.params and "retry_of" not in t.user_attrs and "error" not in t.user_attrs:
            study.enqueue_trial(t.params, user_attrs=_retry_attrs(t))
    return stale


def _heartbeat_interval(storage) -> int | None:
    """Seconds between heartbeats of ``storage`` (the study's, as opened by this process), or
    None where it keeps none (SQLite and journal storages: no heartbeat interval set)."""
    interval = getattr(storage, "get_heartbeat_interval", None)  # RDB storages' public method
    return interval() if interval is not None else None


class Heartbeat:
    """Sends a running trial's heartbeats on RDB storages, so other workers can see it is alive.

    Optuna beats by itself inside ``study.optimize`` only; with ask/tell the runner beats through
    the storage's public ``record_heartbeat``. That takes the trial's storage id, which Optuna
    exposes on no public attribute, so ``trial._trial_id`` is read here, in this one place.
    """

    def __init__(self, storage, trial: optuna.Trial) -> None:
        self.interval = _heartbeat_interval(storage)
        self.storage, self.trial_id = storage, trial._trial_id
        self.stop = threading.Event()

    def __enter__(self):
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)
            self.thread = threading.Thread(target=self._beat, daemon=True)
            self.thread.start()
        return self

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            self.storage.record_heartbeat(self.trial_id)

    def __exit__(self, *exc) -> None:
        self.stop.set()


@contextmanager
def sqlite_study_lock(storage_url: str, study_name: str):
    """Hold an exclusive lock on a SQLite study for this process (yields False for other storages).

    SQLite serves one writer: a second process on the same study is refused with a pointer to
    the storages made for several workers, and the lock-holder may treat every running trial it
    finds as left behind by a killed run.
    """
    if storage_kind(storage_url) != "sqlite" or str(sqlite_path(storage_url)) == ":memory:":
        yield False
        return
    db = sqlite_path(storage_url).resolve()
    lock_path = db.with_name(f".{db.name}.{study_name.replace('/', '_')}.lock")
    with open(lock_path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AutopruneError(
                f"another process is already searching study {study_name!r} in {db}; SQLite serves "
                "one worker: for several, use --storage journal:///FILE.log or a PostgreSQL URL"
            ) from None
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
