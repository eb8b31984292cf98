"""Several worker processes on one study: the parent creates the study, the workers share it."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

from tqdm.auto import tqdm

from autoprune.agents import SEARCHERS
from autoprune.envs import LayerSparsityEnv
from autoprune.errors import AutopruneError
from autoprune.studies.records import best_trial
from autoprune.studies.recovery import recover
from autoprune.studies.runner import (
    SearchConfig,
    SearchResult,
    agent_state_dir,
    default_study_name,
    open_study,
    show_best,
    trial_counts,
)
from autoprune.studies.storage import storage_kind


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
    check_workers(config.searcher, config.storage, workers)
    searcher = SEARCHERS.get(config.searcher)(seed=config.seed, **config.searcher_options)
    task = env.task
    name = config.study_name or default_study_name(task.config.model, task.config.dataset,
                                                   env.budget.slug, config.searcher)
    study = open_study(env, searcher, config, name)
    state_dir = agent_state_dir(config, study)
    searcher.setup(env, study, config.episodes)
    recover(study, searcher, state_dir, quiet=not config.progress)
    done, _ = trial_counts(study)
    quotas = [q for q in split_quota(max(0, config.episodes - done), workers) if q > 0]
    logs, procs = [], []
    for index, quota in enumerate(quotas):
        log = tempfile.TemporaryFile(mode="w+")
        cmd = worker_cmd + ["--study-name", name, "--resume", "--worker-quota", str(quota),
                            "--worker-index", str(index), "-q"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log))
        logs.append(log)
    bar = tqdm(total=config.episodes, initial=done, desc=f"{config.searcher} {name} x{len(procs)} workers",
               unit="ep", disable=not config.progress, dynamic_ncols=True, file=sys.stderr)
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(1.0)
            now, _ = trial_counts(study)
            bar.update(now - bar.n)
            show_best(bar, best_trial(study))
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
    final, _ = trial_counts(study)
    return SearchResult(study, best_trial(study), final - done, state_dir)
