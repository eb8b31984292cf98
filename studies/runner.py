"""The study runner: plays a searcher's episodes on the env and records each as one trial.

It owns the study's life cycle: creating it with the attributes that identify the search,
refusing to reuse an existing study unless asked to resume (and then only for the same task),
recovering from a killed run (stale running trials are failed and, for samplers, retried with the
same parameters; an RL agent's last episode is restored from its checkpoint), and stopping at
exactly the requested number of complete trials.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from autoprune.agents import SEARCHERS, Searcher
from autoprune.cost.budget import budgets_slug
from autoprune.envs import LayerSparsityEnv
from autoprune.errors import AutopruneError
from autoprune.studies.records import (
    EpisodeRecord,
    Provenance,
    SearchSpec,
    StudyRecord,
    best_trial,
    completed,
)
from autoprune.studies.recovery import Heartbeat, recover, sqlite_study_lock, worker_id
from autoprune.studies.result import SearchResult
from autoprune.studies.storage import (
    DEFAULT_STORAGE,
    open_storage,
    sqlite_path,
    storage_kind,
)

log = logging.getLogger(__name__)


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
    early_stop: str | None = None
    progress: bool = True
    command: str = ""


def model_slug(model: str) -> str:
    """A short, path-free name for a model: ``resnet18``, ``tinynets.tiny``, ``pkg.mod.fn``, and
    the class name of a model given in Python."""
    if model.startswith("python:"):
        return model.rpartition(".")[2]
    module, sep, fn = model.rpartition(":")
    if not sep:
        return model
    stem = Path(module).stem if module.endswith(".py") else module
    return f"{stem}.{fn}"


def default_study_name(model: str, dataset: str, budget: str, searcher: str) -> str:
    return f"{model_slug(model)}-{dataset}-{budget}-{searcher}"


def agent_state_dir(config: SearchConfig, study: optuna.Study) -> Path:
    """Where agents keep their checkpoints: ``--state-dir``, else beside a file storage, else in
    the working directory.

    The default folder is named after the study *and* its unique id, so a study made again under
    an old name (a deleted database, another file in the same folder) never picks up a stale agent.
    """
    if config.state_dir:
        return Path(config.state_dir)
    storage = config.storage
    study_name = f"{study.study_name}-{study.user_attrs.get('study_uid', 'x')[:8]}"
    kind = storage_kind(storage)
    if kind == "sqlite" and str(sqlite_path(storage)) != ":memory:":
        base = sqlite_path(storage).resolve().parent
    elif kind == "journal":
        from autoprune.studies.storage import journal_path

        base = journal_path(storage).resolve().parent
    else:
        base = Path.cwd()
    return base / "autoprune-state" / study_name


def search_spec(env: LayerSparsityEnv, config: SearchConfig) -> SearchSpec:
    """The record of what this search chooses and how it scores (the env's settings and the config's)."""
    return SearchSpec(env=env.config, searcher=config.searcher, episodes=config.episodes, seed=config.seed,
                      early_stop=config.early_stop, options=dict(config.searcher_options))


def study_record(env: LayerSparsityEnv, config: SearchConfig) -> StudyRecord:
    """Everything the study records about this search (evaluates the dense model once)."""
    task = env.task
    return StudyRecord(task.config, task.fingerprint(), search_spec(env, config), Provenance.now(config.command))


def _study_exists(storage, name: str) -> bool:
    try:
        return name in {s.study_name for s in storage.get_all_studies()}
    except Exception as err:  # a storage that opens but cannot be read: a corrupt study
        raise AutopruneError(f"cannot read the studies in this storage: {str(err).splitlines()[0][:200]}") \
            from None


def open_study(env: LayerSparsityEnv, searcher: Searcher, config: SearchConfig, name: str,
               storage=None) -> optuna.Study:
    """Create the study, or load it for ``--resume`` after checking it is the same search."""
    record = study_record(env, config)  # evaluates the dense model: fail before writing anything
    attrs = record.to_attrs()
    storage = storage or open_storage(config.storage)
    if _study_exists(storage, name):
        if not config.resume:
            n = len(optuna.load_study(study_name=name, storage=storage).trials)
            raise AutopruneError(
                f"study {name!r} already exists in {config.storage} ({n} trials); continue it with "
                "resume=True, or give another study_name to start another"
            )
        study = optuna.load_study(study_name=name, storage=storage)
        stored = study.user_attrs
        different = record.mismatch(stored)
        if different:
            key, theirs, mine = different
            raise AutopruneError(
                f"study {name!r} was made with {key}={theirs!r}, this run has {key}={mine!r}; resume "
                "with the same settings or give another study_name"
            )
        for key, value in attrs.items():  # a run killed while creating the study left some out
            if key not in stored:
                study.set_user_attr(key, value)
        if "study_uid" not in stored:
            study.set_user_attr("study_uid", uuid.uuid4().hex)
        sampler = searcher.sampler(env, len(study.trials))
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner(config))
    study = optuna.create_study(storage=storage, study_name=name, directions=list(searcher.directions),
                                sampler=searcher.sampler(env, 0), pruner=pruner(config))
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    study.set_user_attr("study_uid", uuid.uuid4().hex)
    metric = env.budget.metric
    with warnings.catch_warnings():  # names shown by the dashboard; the API is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["proxy accuracy", f"{metric} ratio"] if len(searcher.directions) == 2
                               else [f"reward ({env.config.reward})"])
    return study


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------
def trial_counts(study: optuna.Study) -> tuple[int, int]:
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
                                                   budgets_slug(env.budgets), config.searcher)
    episodes = 1 if searcher.one_shot else config.episodes
    if episodes < 1:
        raise AutopruneError("episodes must be at least 1")
    env.task.dense_accuracy()  # a model that cannot be evaluated fails here, before any file is made
    with sqlite_study_lock(config.storage, name) as exclusive:
        return _run(env, config, searcher, name, episodes, quota, storage, exclusive)


def say_notes(env: LayerSparsityEnv, config: SearchConfig) -> None:
    """Say how the env aims a latency budget and which widths it plays (unless quiet): one
    search process, or the parent of several workers."""
    for note in (env.latency_note(), env.width_note()):
        if note and config.progress:
            log.warning("note: %s", note)


def timed(attrs: Iterable[dict]) -> Iterator[tuple[float, float, list | None]]:
    """``(predicted, measured, widths)`` of every timing a study's trials (their user attributes)
    hold, in order: a played-again episode's first play too (``latency.over``); not a repeat's,
    which was not timed and aimed nothing."""
    for a in attrs:
        if a.get("repeat"):
            continue
        over = (a.get("latency") or {}).get("over")
        if over is not None:
            yield over["latency_predicted"], over["latency"], over["widths"]
        ratios = a.get("ratios", {})
        if {"latency", "latency_predicted"} <= ratios.keys():
            yield ratios["latency_predicted"], ratios["latency"], a.get("widths")


def _run(env, config, searcher, name, episodes, quota, storage, exclusive) -> SearchResult:
    storage = storage or open_storage(config.storage)
    study = open_study(env, searcher, config, name, storage)
    say_notes(env, config)
    env.forget_scores()  # an env shared by several searches scores each one's episodes anew
    state_dir = agent_state_dir(config, study)
    searcher.setup(env, study, episodes)
    recover(study, searcher, state_dir, quiet=not config.progress, exclusive=exclusive, storage=storage)
    if env.budget.metric == "latency":  # a resumed study's measurements aim the wall as they did
        env.replay_latency(timed(t.user_attrs for t in completed(study)))
    done, _ = trial_counts(study)
    todo = max(0, episodes - done) if quota is None else min(quota, max(0, episodes - done))
    progress = Progress(config, name, episodes, done, env.task.config.proxy)
    progress.show(best_trial(study))
    new = 0
    try:
        while new < todo:
            if quota is None and sum(trial_counts(study)) >= episodes:
                break  # other hosts are finishing the last episodes
            trial = play_episode(env, searcher, study, storage, config, state_dir, done + new)
            if trial.state == TrialState.PRUNED:  # recorded, not counted: the study still gets its episodes
                progress.stopped_early()
                continue
            new += 1
            progress.advance(study, trial)
    finally:
        progress.close()
    return SearchResult(study, config.storage, env.task, new_trials=new, state_dir=state_dir)


def play_episode(env: LayerSparsityEnv, searcher: Searcher, study: optuna.Study, storage,
                 config: SearchConfig, state_dir: Path, index: int) -> FrozenTrial:
    """One episode as one trial, whatever the searcher: ask, play, record, save, tell.

    The searcher's state is saved with how to finish the trial before the trial is told, so a
    kill at any moment loses nothing: on resume :func:`~autoprune.studies.recovery.recover`
    either fails the trial (the saved state is the previous episode's) or tells it (the state
    has this one).
    """
    start = time.perf_counter()
    trial = study.ask()
    trial.set_user_attr("worker", worker_id())
    stop = None
    if config.early_stop:
        def stop(value: float, step: int) -> bool:
            trial.report(value, step)
            return trial.should_prune()
    with Heartbeat(storage, trial):
        try:
            ep = searcher.episode(env, trial, stop)
        except AutopruneError as err:
            # recorded as failed, not left running: a resume must not replay it
            trial.set_user_attr("error", str(err))
            study.tell(trial, state=TrialState.FAIL)
            raise
        searcher.record_params(env, trial, ep)
        record = EpisodeRecord.of(ep, config.searcher, index, uuid.uuid4().hex, time.perf_counter() - start)
        for key, value in record.to_attrs().items():
            trial.set_user_attr(key, value)
        if ep.outcome.stopped:
            return study.tell(trial, state=TrialState.PRUNED)
        values = searcher.values(ep)
        searcher.save(state_dir, pending={"trial": trial.number, "uid": record.uid, "values": values})
        return study.tell(trial, values)


class Progress:
    """The search's progress bar: episodes done of the study's total, the best so far, the ETA."""

    def __init__(self, config: SearchConfig, name: str, episodes: int, done: int, proxy: str,
                 label: str = "") -> None:
        self.desc, self.proxy, self.pruned = f"{config.searcher} {name}{label}", proxy, 0
        self.bar = tqdm(total=episodes, initial=done, desc=self.desc, unit="ep", disable=not config.progress,
                        dynamic_ncols=True, file=sys.stderr)
        self.best: FrozenTrial | None = None

    def show(self, best: FrozenTrial | None) -> None:
        self.best = best
        if best is None:
            return
        label = "proxy acc" if self.proxy == "acc" else f"proxy {self.proxy}"
        acc, reward = best.user_attrs.get("accuracy"), best.user_attrs.get("reward")
        self.bar.set_postfix_str(f"best reward {reward:+.4f}, best {label} {acc:.2%} (trial {best.number})"
                                 if reward is not None and not math.isnan(reward) else "")

    def advance(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.bar.update(1)
        if self.best is None or best_trial(study, [self.best, trial]) is trial:
            self.show(trial)

    def set_done(self, n: int, best: FrozenTrial | None) -> None:
        self.bar.update(n - self.bar.n)
        self.show(best)

    def stopped_early(self) -> None:
        self.pruned += 1
        self.bar.set_description_str(f"{self.desc} ({self.pruned} stopped early)")

    def close(self) -> None:
        self.bar.close()


PRUNERS = {
    "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0),
    "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
}


def check_early_stop(name: str | None) -> None:
    if name is not None and name not in PRUNERS:
        raise AutopruneError(f"unknown early_stop {name!r}; choose one of: {', '.join(PRUNERS)}")


def pruner(config: SearchConfig) -> optuna.pruners.BasePruner | None:
    """The study's pruner for ``--early-stop`` (None: every episode is scored in full)."""
    check_early_stop(config.early_stop)
    return None if config.early_stop is None else PRUNERS[config.early_stop]()
