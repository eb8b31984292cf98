"""Several worker processes on one study: the parent creates the study, the workers share it."""

from __future__ import annotations

import multiprocessing
import sys
import time
from dataclasses import replace

from autoprune.agents import SEARCHERS
from autoprune.cost.budget import budgets_slug
from autoprune.envs import LayerSparsityEnv
from autoprune.errors import AutopruneError
from autoprune.studies.records import best_trial
from autoprune.studies.recovery import recover
from autoprune.studies.result import SearchResult
from autoprune.studies.runner import (
    Progress,
    SearchConfig,
    agent_state_dir,
    default_study_name,
    open_study,
    run_search,
    say_notes,
    trial_counts,
)
from autoprune.studies.storage import open_storage, storage_kind


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
            f"several workers need a sampler searcher (tpe, cmaes, gp, qmc, random, nsga2): {searcher_name} "
            + ("learns from its own episodes in order" if not cls.one_shot else "is a single episode")
        )
    if storage_kind(storage) == "sqlite":
        raise AutopruneError(
            "SQLite serves one writer, so several workers would fail on locked-database errors; use "
            "a journal storage, journal:///FILE.log (one host), or a PostgreSQL URL (several hosts)"
        )


def run_workers(env: LayerSparsityEnv, config: SearchConfig, workers: int) -> SearchResult:
    """Run ``workers`` processes on one study, each with its share of the episodes.

    This process creates (or resumes) the study first, so the workers never race to create it.
    Each worker is a fresh Python process (``spawn``) that rebuilds the task from the study's own
    records (:func:`work`), so what the workers search is, by construction, what the study
    says; this process shows one progress bar for all of them.
    """
    check_workers(config.searcher, config.storage, workers)
    task = env.task
    if task.splits is None:
        raise AutopruneError("several workers rebuild the task from the study's records, which a model "
                             "given in Python cannot be; run one worker per process with resume=True")
    searcher = SEARCHERS.get(config.searcher)(seed=config.seed, **config.searcher_options)
    name = config.study_name or default_study_name(task.config.model, task.config.dataset,
                                                   budgets_slug(env.budgets), config.searcher)
    storage = open_storage(config.storage)
    study = open_study(env, searcher, config, name, storage)
    say_notes(env, config)
    state_dir = agent_state_dir(config, study)
    searcher.setup(env, study, config.episodes)
    recover(study, searcher, state_dir, quiet=not config.progress, storage=storage)
    done, _ = trial_counts(study)
    quotas = [q for q in split_quota(max(0, config.episodes - done), workers) if q > 0]
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.SimpleQueue()
    procs = [ctx.Process(target=work, args=(config, name, quota, index, errors))
             for index, quota in enumerate(quotas)]  # not daemons: a worker may load data with DataLoader workers
    for p in procs:
        p.start()
    progress = Progress(config, name, config.episodes, done, task.config.proxy, label=f" x{len(procs)} workers")
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(1.0)
            progress.set_done(trial_counts(study)[0], best_trial(study))
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    finally:
        progress.close()
        for p in procs:
            p.join()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    failures += [f"worker {p.pid} exited {p.exitcode}" for p in procs if p.exitcode and not failures]
    if failures:
        raise AutopruneError("; ".join(failures))
    final, _ = trial_counts(study)
    return SearchResult(study, config.storage, task, new_trials=final - done, state_dir=state_dir)


def work(config: SearchConfig, name: str, quota: int, index: int, errors) -> None:
    """One worker: rebuild the study's task and env from its records and play ``quota`` episodes
    with a seed of its own (or all workers would draw the same policies)."""
    import optuna

    from autoprune.envs import LayerSparsityEnv
    from autoprune.studies.export import load_study, rebuild_task
    from autoprune.studies.records import StudyRecord

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        record = StudyRecord.of(load_study(name, config.storage))
        task = rebuild_task(record, progress=False, study_name=name)
        env = LayerSparsityEnv(task, record.search.env)
        mine = replace(config, study_name=name, resume=True, progress=False, seed=config.seed + 7919 * (index + 1))
        run_search(env, mine, quota=quota)
    except AutopruneError as err:
        errors.put(f"worker {index}: {err}")
        sys.exit(2)
    except Exception as err:  # reported, not swallowed: the parent says which worker failed and why
        errors.put(f"worker {index}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        sys.exit(1)
