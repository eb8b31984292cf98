"""The study runner: plays a searcher's episodes on the env and records each as one trial.

It owns the study's life cycle: creating it with the attributes that identify the search,
refusing to reuse an existing study unless asked to resume (and then only for the same task),
recovering from a killed run (stale running trials are failed and, for samplers, retried with the
same parameters; an RL agent's last episode is restored from its checkpoint), and stopping at
exactly the requested number of complete trials.
"""

from __future__ import annotations

import fcntl
import math
import os
import socket
import sys
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from autoprune.agents import SEARCHERS, Searcher
from autoprune.envs import LayerSparsityEnv
from autoprune.errors import AutopruneError
from autoprune.studies.records import add_record, best_trial, completed, episode_attrs, frozen_record
from autoprune.studies.storage import (
    DEFAULT_STORAGE,
    GRACE_PERIOD,
    open_storage,
    sqlite_path,
    storage_kind,
)

# Study attributes that must match for --resume to continue a study.
IDENTITY_KEYS = ("model", "weights", "dataset", "data", "split_seed", "granularity", "importance",
                 "round_to", "units_digest", "budget", "reward", "reward_lambda", "searcher",
                 "min_sparsity", "max_sparsity", "search_val_size", "bn_recalibration")


@dataclass(frozen=True)
class SearchConfig:
    """How to run a search (the task and env are configured separately)."""

    searcher: str = "tpe"
    episodes: int = 50
    seed: int = 0
    storage: str = DEFAULT_STORAGE
    study_name: str | None = None
    resume: bool = False
    state_dir: str | None = None
    searcher_options: dict = field(default_factory=dict)
    progress: bool = True
    command: str = ""


@dataclass
class SearchResult:
    study: optuna.Study
    best: optuna.trial.FrozenTrial | None
    new_trials: int
    state_dir: Path


def model_slug(model: str) -> str:
    """A short, path-free name for a model: ``resnet18``, ``tinynets.tiny``, ``pkg.mod.fn``."""
    module, sep, fn = model.rpartition(":")
    if not sep:
        return model
    stem = Path(module).stem if module.endswith(".py") else module
    return f"{stem}.{fn}"


def default_study_name(model: str, dataset: str, budget: str, searcher: str) -> str:
    return f"{model_slug(model)}-{dataset}-{budget}-{searcher}"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def default_state_dir(storage: str, study_name: str) -> Path:
    """Where agents keep their checkpoints: beside a file storage, else in the working directory."""
    kind = storage_kind(storage)
    if kind == "sqlite" and str(sqlite_path(storage)) != ":memory:":
        base = sqlite_path(storage).resolve().parent
    elif kind == "journal":
        from autoprune.studies.storage import journal_path

        base = journal_path(storage).resolve().parent
    else:
        base = Path.cwd()
    return base / "autoprune-state" / study_name


def study_attributes(env: LayerSparsityEnv, config: SearchConfig) -> dict:
    import gymnasium
    import stable_baselines3
    import torch
    import torch_pruning

    import autoprune

    task = env.task
    ident = task.identity()
    return {
        **ident,
        "budget": str(env.budget),
        "budget_metric": env.budget.metric,
        "budget_ratio": env.budget.ratio,
        "reward": env.reward_name,
        "reward_lambda": env.reward_lambda,
        "searcher": config.searcher,
        "min_sparsity": env.min_sparsity,
        "max_sparsity": env.max_sparsity,
        "search_val_size": len(task.splits.search_val),
        "calib_images": len(task.splits.calib),
        "calib_batches": task.config.calib_batches,
        "calib_batch_size": task.config.calib_batch_size,
        "data_dir": str(Path(task.config.data_dir).expanduser().resolve()) if task.config.data_dir else None,
        "weights_path": task.weights_path,
        "pretrained": task.config.pretrained,
        "exclude": list(task.config.exclude),
        "bn_recalibration": task.config.bn_recalibration,
        "episode_finetune_steps": task.config.episode_finetune_steps,
        "device": task.device,
        "dense_accuracy": task.dense_accuracy(),
        "dense_flops": task.dense_costs.flops,
        "dense_params": task.dense_costs.params,
        "unit_names": task.table.names,
        "episodes_requested": config.episodes,
        "seed": config.seed,
        "versions": {"autoprune": autoprune.__version__, "torch": torch.__version__,
                     "optuna": optuna.__version__, "stable_baselines3": stable_baselines3.__version__,
                     "gymnasium": gymnasium.__version__, "torch_pruning": torch_pruning.__version__},
        "command": config.command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _study_exists(storage, name: str) -> bool:
    try:
        return name in {s.study_name for s in storage.get_all_studies()}
    except Exception as err:  # a storage that opens but cannot be read: a corrupt study
        raise AutopruneError(f"cannot read the studies in this storage: {str(err).splitlines()[0][:200]}") \
            from None


def open_study(env: LayerSparsityEnv, searcher: Searcher, config: SearchConfig, name: str,
               storage=None) -> optuna.Study:
    """Create the study, or load it for ``--resume`` after checking it is the same search."""
    attrs = study_attributes(env, config)  # evaluates the dense model: fail before writing anything
    storage = storage or open_storage(config.storage)
    if _study_exists(storage, name):
        if not config.resume:
            n = len(optuna.load_study(study_name=name, storage=storage).trials)
            raise AutopruneError(
                f"study {name!r} already exists in {config.storage} ({n} trials); pass --resume to "
                "continue it, or --study-name to start another"
            )
        study = optuna.load_study(study_name=name, storage=storage)
        stored = study.user_attrs
        for key in IDENTITY_KEYS:
            if key in stored and stored[key] != attrs[key]:
                raise AutopruneError(
                    f"study {name!r} was made with {key}={stored[key]!r}, this run has "
                    f"{key}={attrs[key]!r}; resume with the same settings or pick another --study-name"
                )
        sampler = searcher.sampler(env, len(study.trials))
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    study = optuna.create_study(storage=storage, study_name=name, directions=list(searcher.directions),
                                sampler=searcher.sampler(env, 0))
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    metric = env.budget.metric
    with warnings.catch_warnings():  # names shown by the dashboard; the API is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["proxy accuracy", f"{metric} ratio"] if len(searcher.directions) == 2
                               else [f"reward ({env.reward_name})"])
    return study


# ------------------------------------------------------------------------------------------------
# recovery after a kill
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
            exclusive: bool = False) -> list[int]:
    """Fail stale running trials (retrying sampler ones) and re-add an RL agent's pending episode.

    Returns the numbers of the trials that were failed.
    """
    host = socket.gethostname()
    failed = []
    storage = study._storage
    if hasattr(storage, "record_heartbeat") and storage.get_heartbeat_interval():
        failed += [t.number for t in _fail_heartbeat_stale(study)]
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _is_stale(trial, host, exclusive):
            study.tell(trial.number, state=TrialState.FAIL)
            failed.append(trial.number)
            # a trial killed before its first suggestion still carries its enqueued parameters
            params = trial.params or trial.system_attrs.get("fixed_params")
            if params and searcher.uses_trial:
                study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
    if failed and not quiet:
        print(f"note: failed {len(failed)} trial(s) left running by a killed worker "
              f"({', '.join(map(str, failed))}); sampler trials are retried with the same parameters",
              file=sys.stderr)
    pending = searcher.load(state_dir)
    if pending is not None:
        uid = pending["user_attrs"]["uid"]
        if not any(t.user_attrs.get("uid") == uid for t in completed(study)):
            add_record(study, pending)
            if not quiet:
                print("note: recorded the agent's last episode, saved before the kill", file=sys.stderr)
    return failed


def _fail_heartbeat_stale(study: optuna.Study):
    """Trials of other hosts whose heartbeats stopped (RDB storages), failed and retried."""
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with warnings.catch_warnings():  # marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    stale = [t for t in study.get_trials(deepcopy=False) if t.number in before - after]
    for t in stale:
        if t.params and "retry_of" not in t.user_attrs:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    return stale


class _Heartbeat:
    """Sends a running trial's heartbeats on RDB storages, so other workers can see it is alive."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial) -> None:
        storage = study._storage
        self.interval = storage.get_heartbeat_interval() if hasattr(storage, "record_heartbeat") else None
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


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------
def _counts(study: optuna.Study) -> tuple[int, int]:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    done = sum(t.state == TrialState.COMPLETE for t in trials)
    return done, len(trials) - done


def run_search(env: LayerSparsityEnv, config: SearchConfig, quota: int | None = None,
               storage=None) -> SearchResult:
    """Run ``config.searcher`` on ``env`` until the study holds ``config.episodes`` complete trials.

    Args:
        env: the environment (its task defines the model, data and evaluation).
        config: searcher, episodes, storage, study name, resume.
        quota: at most this many new episodes from this process (multi-worker runs split the
            remaining episodes between workers so the total comes out exact).
        storage: an already opened storage (else opened from ``config.storage``).
    """
    searcher = SEARCHERS.get(config.searcher)(seed=config.seed, **config.searcher_options)
    task = env.task
    name = config.study_name or default_study_name(task.config.model, task.config.dataset,
                                                   env.budget.slug, config.searcher)
    episodes = 1 if searcher.one_shot else config.episodes
    if episodes < 1:
        raise AutopruneError("--episodes must be at least 1")
    env.task.dense_accuracy()  # a model that cannot be evaluated fails here, before any file is made
    with sqlite_study_lock(config.storage, name) as exclusive:
        return _run(env, config, searcher, name, episodes, quota, storage, exclusive)


def _run(env, config, searcher, name, episodes, quota, storage, exclusive) -> SearchResult:
    study = open_study(env, searcher, config, name, storage)
    state_dir = Path(config.state_dir) if config.state_dir else default_state_dir(config.storage, name)
    searcher.setup(env, study, episodes)
    recover(study, searcher, state_dir, quiet=not config.progress, exclusive=exclusive)
    done, _ = _counts(study)
    todo = max(0, episodes - done) if quota is None else min(quota, max(0, episodes - done))
    names = env.table.names
    best = best_trial(study)
    bar = tqdm(total=episodes, initial=done, desc=f"{config.searcher} {name}", unit="ep",
               disable=not config.progress, dynamic_ncols=True, file=sys.stderr)
    _show_best(bar, best)
    me = worker_id()
    new = 0
    try:
        while new < todo:
            if quota is None and sum(_counts(study)) >= episodes:
                break  # other hosts are finishing the last episodes
            start = time.perf_counter()
            uid = uuid.uuid4().hex
            if searcher.uses_trial:
                trial = study.ask()
                trial.set_user_attr("worker", me)
                with _Heartbeat(study, trial):
                    ep = searcher.episode(env, trial)
                    for key, value in episode_attrs(ep, config.searcher, done + new, uid,
                                                    time.perf_counter() - start).items():
                        trial.set_user_attr(key, value)
                    frozen = study.tell(trial, searcher.values(ep))
            else:
                ep = searcher.episode(env, None)
                attrs = episode_attrs(ep, config.searcher, done + new, uid, time.perf_counter() - start)
                record = frozen_record(ep, names, env.min_sparsity, env.max_sparsity, searcher.values(ep),
                                       attrs | {"worker": me})
                searcher.save(state_dir, pending=record)
                add_record(study, record)
                frozen = None
            new += 1
            bar.update(1)
            candidate = frozen if frozen is not None else completed(study)[-1]
            if best is None or best_trial(study, [best, candidate]) is candidate:
                best = candidate
            _show_best(bar, best)
    finally:
        bar.close()
    return SearchResult(study, best_trial(study), new, state_dir)


def _show_best(bar, best) -> None:
    if best is None:
        return
    acc = best.user_attrs.get("accuracy")
    reward = best.user_attrs.get("reward")
    bar.set_postfix_str(f"best reward {reward:+.4f}, best proxy acc {acc:.2%} (trial {best.number})"
                        if reward is not None and not math.isnan(reward) else "")


# ------------------------------------------------------------------------------------------------
# several worker processes on one study
# ------------------------------------------------------------------------------------------------
def split_quota(remaining: int, workers: int) -> list[int]:
    """Episodes per worker, so the total comes out exactly ``remaining``."""
    return [remaining // workers + (i < remaining % workers) for i in range(workers)]


def check_workers(searcher_name: str, storage: str, workers: int) -> None:
    """Refuse a worker count the searcher or the storage cannot serve (before any real work)."""
    if workers <= 1:
        return
    cls = SEARCHERS.get(searcher_name)
    if not cls.uses_trial or cls.one_shot:
        raise AutopruneError(
            f"--workers needs a sampler searcher (tpe, cmaes, gp, qmc, random, nsga2): {searcher_name} "
            + ("learns from its own episodes in order" if not cls.one_shot else "is a single episode")
        )
    if storage_kind(storage) == "sqlite":
        raise AutopruneError(
            "SQLite serves one writer, so several workers would fail on locked-database errors; use "
            "--storage journal:///FILE.log (one host) or a PostgreSQL URL (several hosts)"
        )


def run_workers(env: LayerSparsityEnv, config: SearchConfig, workers: int, worker_cmd: list[str]) -> SearchResult:
    """Run ``workers`` processes of ``worker_cmd`` on one study, each with its share of the episodes.

    This process creates (or resumes) the study first, so the workers never race to create it,
    then starts the workers with ``--resume --worker-quota K`` and shows one progress bar for all.
    """
    import subprocess
    import tempfile

    check_workers(config.searcher, config.storage, workers)
    searcher = SEARCHERS.get(config.searcher)(seed=config.seed, **config.searcher_options)
    task = env.task
    name = config.study_name or default_study_name(task.config.model, task.config.dataset,
                                                   env.budget.slug, config.searcher)
    study = open_study(env, searcher, config, name)
    state_dir = Path(config.state_dir) if config.state_dir else default_state_dir(config.storage, name)
    searcher.setup(env, study, config.episodes)
    recover(study, searcher, state_dir, quiet=not config.progress)
    done, _ = _counts(study)
    quotas = [q for q in split_quota(max(0, config.episodes - done), workers) if q > 0]
    logs, procs = [], []
    for quota in quotas:
        log = tempfile.TemporaryFile(mode="w+")
        cmd = worker_cmd + ["--study-name", name, "--resume", "--worker-quota", str(quota), "-q"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log))
        logs.append(log)
    bar = tqdm(total=config.episodes, initial=done, desc=f"{config.searcher} {name} x{len(procs)} workers",
               unit="ep", disable=not config.progress, dynamic_ncols=True, file=sys.stderr)
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(1.0)
            now, _ = _counts(study)
            bar.update(now - bar.n)
            _show_best(bar, best_trial(study))
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    finally:
        bar.close()
    failures = []
    for p, log in zip(procs, logs):
        if p.returncode != 0:
            log.seek(0)
            lines = [line for line in log.read().splitlines() if line.strip()]
            failures.append(f"worker {p.pid} exited {p.returncode}: {lines[-1] if lines else 'no output'}")
        log.close()
    if failures:
        raise AutopruneError("; ".join(failures))
    final, _ = _counts(study)
    return SearchResult(study, best_trial(study), final - done, state_dir)
