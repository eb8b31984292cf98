"""What a search leaves: :class:`SearchResult`, a study and what can be made of it.

Policies (the best, any trial, a Pareto point), pruned models rebuilt exactly as the search
scored them, and exports (the model folder, optionally fine-tuned, the best of the top K kept).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import torch
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.finetune.loop import FinetuneConfig
from autoprune.studies.export import choose_trial, trial_policy
from autoprune.studies.records import StudyRecord, best_trial, top_trials
from autoprune.task import PruningTask
from autoprune.units.policy import Policy

log = logging.getLogger(__name__)

Finetune = FinetuneConfig | Callable[[nn.Module], object] | None
"""A fine-tune: a recipe for a registered dataset, or any callable that trains the model in place."""


class SearchResult:
    """A search's study and what can be made of it: policies, pruned models, exports.

    What :func:`autoprune.search` and :func:`autoprune.load` return, and what the study runner
    returns for a search it ran: one type for all three.

    Attributes:
        study: the Optuna study (every episode one trial; the dashboard reads the same storage).
        storage: its storage URL.
        new_trials: episodes this call added (0 for :func:`autoprune.load`).
        state_dir: where the searcher kept its state (RL agents), for a search this process ran.
        record: the study's typed records (task, fingerprint, search, run).
    """

    def __init__(self, study: optuna.Study, storage: str, task: PruningTask | None = None,
                 build: Callable[[str | None], PruningTask] | None = None, new_trials: int = 0,
                 state_dir: Path | None = None) -> None:
        self.study, self.storage, self.new_trials, self.state_dir = study, storage, new_trials, state_dir
        self.record = StudyRecord.of(study)
        self._task, self._build = task, build

    def __repr__(self) -> str:
        best = self.best
        tail = f", best trial {best.number} score {best.user_attrs['accuracy']:.4f}" if best else ""
        return f"SearchResult(study={self.study.study_name!r}, trials={len(self.study.trials)}{tail})"

    # -- reading the study ---------------------------------------------------------------------
    @property
    def best(self) -> optuna.trial.FrozenTrial | None:
        """The best complete trial within budget (``None`` before the first)."""
        return best_trial(self.study)

    def trial(self, number: int | None = None, pick: str = "accuracy") -> optuna.trial.FrozenTrial:
        """Trial ``number``, or the best (two-objective studies: the Pareto point ``pick``:
        ``accuracy``, ``cost`` or ``knee``)."""
        return choose_trial(self.study, number, pick)

    def policy(self, trial: int | optuna.trial.FrozenTrial | None = None) -> Policy:
        """The achieved, self-describing policy of ``trial`` (default: the best)."""
        return trial_policy(self.study, self._trial(trial))

    @property
    def best_policy(self) -> Policy:
        return self.policy()

    # -- models ----------------------------------------------------------------------------------
    def task(self, reconstruct: str | None = None) -> PruningTask:
        """The search's task (rebuilt on first use for a loaded study), or a variant of it that
        reconstructs pruned models with ``reconstruct`` instead."""
        if self._task is None:
            if self._build is None:
                raise AutopruneError("this result has no task to rebuild models from")
            self._task = self._build(None)
        if reconstruct is None or reconstruct == self._task.config.reconstruct:
            return self._task
        return self._task.variant(reconstruct=reconstruct)

    def pruned_model(self, trial: int | optuna.trial.FrozenTrial | None = None, reconstruct: str | None = None,
                     finetune: Finetune = None) -> nn.Module:
        """The pruned model of ``trial`` (default: the best): pruned, reconstructed and recalibrated
        as the search scored it, then fine-tuned if asked (a :class:`~autoprune.finetune.loop.FinetuneConfig`
        on a registered dataset, or any callable that trains the model in place), with masks made
        permanent. A plain ``nn.Module`` on the task's device."""
        from autoprune.export.apply import run_finetune

        task = self.task(reconstruct)
        kept = task.kept(self.policy(trial))
        model, _ = task.pruned(kept)
        if finetune is not None:
            run_finetune(task, model, finetune, quiet=True, kept=kept)
        return task.pruner.finalize(model)

    def speedups(self, trial: int | optuna.trial.FrozenTrial | None = None, pairs: int = 30) -> dict | None:
        """What ``trial`` (default: the best) buys in time, beside the best one-shot rule: each one's latency
        over the dense model's, measured on the study's runtime, batch size and threads (alternated
        runs). ``None`` where there is nothing to time: masks, which run at dense speed, or no
        complete trial. ``slower_than_rule`` flags a searched policy more than 3 % slower than
        the rule it beat on accuracy."""
        from autoprune.cost.latency import default_threads, measure_ratio
        from autoprune.studies.records import best_rule_trial

        best = self.best if trial is None else self._trial(trial)
        task = self.task()
        if best is None or not task.table.strategy.physical:
            return None
        env = self.record.search.env
        threads = env.latency_threads or default_threads(task.device)
        out = {"runtime": env.latency_runtime, "batch": env.latency_batch, "threads": threads}
        rule = best_rule_trial(self.study)
        for key, trial in (("best", best), ("rule", rule)):
            if trial is None:
                continue
            model = task.prune(trial.user_attrs["widths"])
            out[key] = {"trial": trial.number, "rule": trial.user_attrs.get("rule"),
                        "flops": trial.user_attrs["ratios"]["flops"],
                        "latency": measure_ratio(task.dense, model, task.table.input_shape, task.device,
                                                 env.latency_batch, threads, pairs=pairs,
                                                 runtime=env.latency_runtime)[0]}
        out["slower_than_rule"] = bool("rule" in out and out["best"]["trial"] != out["rule"]["trial"]
                                       and out["best"]["latency"] > 1.03 * out["rule"]["latency"])
        return out

    def export(self, directory: str | Path, trial: int | optuna.trial.FrozenTrial | None = None,
               reconstruct: str | None = None, finetune: Finetune = None, onnx: bool = False,
               latency_batches: tuple[int, ...] = (1,), quiet: bool = True, resume: bool = False,
               top_k: int = 1, select_epochs: float = 1.0, latency_runtime: str | None = None,
               latency_device: str = "cpu", select_workers: int = 1, select_images: int = 10_000) -> dict:
        """Write ``trial``'s pruned model and measurements to ``directory`` (made atomically):
        ``model.pt2`` (a ``torch.export`` program: ``torch.export.load(path).module()`` needs no
        autoprune), ``policy.json``, ``metrics.json``, ``pruned.pt`` for registered models, and
        ``model.onnx`` with ``onnx=True``. Latency is measured with ``latency_runtime`` (default:
        the one the study searched with) on ``latency_device``. Returns the metrics.

        A :class:`~autoprune.finetune.loop.FinetuneConfig` fine-tune checkpoints every epoch into
        ``directory`` and logs ``finetune.csv`` there; ``resume`` continues a killed one. With
        ``top_k > 1`` the ``top_k`` best trials are each fine-tuned for ``select_epochs`` with the
        same recipe, the one best on search-val is kept (``metrics["selection"]``) and fine-tuned
        in full. With ``select_epochs=0`` none is fine-tuned: each is scored by the search's proxy
        on ``select_images`` training images outside search-val and calibration, and the best there
        is kept (a pick among policies too close for search-val's images). ``select_workers`` > 1
        fine-tunes that many candidates at once, each in a process of its own (a GPU that one small
        model's fine-tune leaves idle; a registered model's task only, rebuilt in each process)."""
        from autoprune.cost.runtimes import get_runtime
        from autoprune.export.apply import apply_policy

        runtime = latency_runtime or self.record.search.env.latency_runtime
        get_runtime(runtime).check(latency_device)  # before any top-K candidate is fine-tuned
        task = self.task(reconstruct)
        extra = None
        if top_k > 1:
            trial, extra = self._select(task, top_k, select_epochs, finetune, Path(directory), resume, quiet,
                                        select_workers, select_images)
        policy = self.policy(trial)
        return apply_policy(task, policy, directory, finetune, test=task.has_test,
                            latency_batches=latency_batches, onnx=onnx, quiet=quiet, resume=resume, extra=extra,
                            latency_runtime=runtime, latency_device=latency_device)

    def _select(self, task: PruningTask, k: int, epochs: float, finetune: Finetune, directory: Path,
                resume: bool, quiet: bool, workers: int = 1,
                images: int = 10_000) -> tuple[optuna.trial.FrozenTrial, dict]:
        """Fine-tune the ``k`` best trials briefly and keep the best on search-val, or with
        ``epochs=0`` score them on ``images`` more training images and keep the best there. Each
        finished candidate is written to ``directory/selection.json`` at once, so ``resume``
        skips it."""
        from dataclasses import asdict

        from autoprune.common.fileio import write_document
        from autoprune.export.artifacts import check_output_dir

        if epochs < 0 or (epochs > 0 and (not isinstance(finetune, FinetuneConfig) or finetune.epochs <= 0)):
            raise AutopruneError("top-k selection fine-tunes the candidates with the same recipe: "
                                 "pass finetune=FinetuneConfig.recipe(epochs), or select_epochs=0 to score "
                                 "them on more images instead")
        if workers < 1 or images < 1:
            raise AutopruneError(f"select workers and images must be at least 1, not {workers} and {images}")
        short = replace(finetune, epochs=epochs) if epochs > 0 else None
        path = directory / "selection.json"
        record = {"k": k, "select_epochs": epochs, "recipe": asdict(short) if short else None, "candidates": []}
        if short is None:
            record.update(select_images=images, proxy=task.config.proxy)
        keys = ("k", "select_epochs", "recipe", "select_images")
        if resume and path.exists():
            saved = json.loads(path.read_text())
            if all(saved.get(key) == record.get(key) for key in keys):
                record["candidates"] = saved["candidates"]
        check_output_dir(directory)
        directory.mkdir(exist_ok=True)
        done = {c["trial"] for c in record["candidates"]}
        candidates = top_trials(self.study, k)
        pending = [Candidate(t.number, rank, t.user_attrs["accuracy"], self.policy(t),
                             f"top-{k} candidate {rank}/{len(candidates)}")
                   for rank, t in enumerate(candidates, 1) if t.number not in done]
        if short is None:
            rows = (_rescore(task, c, images) for c in pending)
        else:
            record["workers"] = min(workers, max(1, len(pending)))
            rows = fit_candidates(task, pending, short, workers, quiet)
        for row in rows:
            record["candidates"] = sorted([*record["candidates"], row], key=lambda c: c["rank_by_proxy"])
            write_document(path, record)
        by = "val_acc" if short else "more_score"
        best = max(record["candidates"], key=lambda c: (c[by], -c["rank_by_proxy"]))
        record["kept"] = best["trial"]
        if not quiet and short:
            log.warning("top-%d: kept trial %d (proxy rank %d), search-val %.2f%% after %g epoch(s)",
                        k, best["trial"], best["rank_by_proxy"], 100 * best["val_acc"], epochs)
        elif not quiet:
            log.warning("top-%d: kept trial %d (proxy rank %d), %s %.4f on %d more training images",
                        k, best["trial"], best["rank_by_proxy"], task.config.proxy, best["more_score"], images)
        return self.trial(best["trial"]), {"selection": record}

    def _trial(self, trial) -> optuna.trial.FrozenTrial:
        if isinstance(trial, optuna.trial.FrozenTrial):
            return trial
        return self.trial(trial)


@dataclass(frozen=True)
class Candidate:
    """One top-K candidate: its trial, its rank by the proxy and that score, its policy."""

    trial: int
    rank: int
    proxy: float
    policy: Policy
    desc: str


def _row(task: PruningTask, c: Candidate, model: nn.Module, **figures) -> dict:
    """One row of the selection: ``c``, what picked among the candidates (``figures``) and the test
    accuracy of ``model``, recorded to measure the pick afterwards, never used to make it."""
    row = {"trial": c.trial, "rank_by_proxy": c.rank, "proxy_acc": c.proxy, **figures}
    if task.has_test:
        row["test_acc"] = task.test_accuracy(model)
    return row


def _rescore(task: PruningTask, c: Candidate, images: int) -> dict:
    """Prune ``c``'s policy as its episode did and score it on ``images`` more training images."""
    model, _ = task.pruned(task.kept(c.policy))
    return _row(task, c, model, more_score=task.score_more(model, images))


def _fit(task: PruningTask, c: Candidate, short: FinetuneConfig, quiet: bool) -> dict:
    """Prune ``c``'s policy, fine-tune it with ``short`` and score it: one row of the selection."""
    from autoprune.export.apply import run_finetune

    kept = task.kept(c.policy)
    model, _ = task.pruned(kept)
    ran = run_finetune(task, model, short, quiet, desc=c.desc, log_test=False, kept=kept)
    return _row(task, c, model, val_acc=ran.val_acc, best_epoch=ran.best_epoch)


def fit_candidates(task: PruningTask, pending: list[Candidate], short: FinetuneConfig, workers: int,
                   quiet: bool) -> Iterator[dict]:
    """Each candidate's row, as it finishes: in this process one after another, or with
    ``workers`` > 1 in that many processes at once, each building the task again from its config
    (spawned, so CUDA works in them) and running with its share of this process's threads."""
    if workers <= 1 or len(pending) <= 1:
        for c in pending:
            yield _fit(task, c, short, quiet)
        return
    if task.config.model.startswith("python:"):
        raise AutopruneError("select workers rebuild the task in processes of their own: a model given in "
                             "Python cannot be; select with one worker")
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    workers = min(workers, len(pending))
    threads = max(1, torch.get_num_threads() // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                             initargs=(task.config, threads)) as pool:
        futures = {pool.submit(_fit_in_worker, c, short): c for c in pending}
        for future in as_completed(futures):
            row = future.result()
            if not quiet:
                log.warning("%s: search-val %.2f%% after %g epoch(s)", futures[future].desc, 100 * row["val_acc"],
                            short.epochs)
            yield row


_WORKER_TASK: PruningTask | None = None


def _start_worker(config, threads: int) -> None:
    global _WORKER_TASK
    torch.set_num_threads(threads)
    _WORKER_TASK = PruningTask(config, progress=False)


def _fit_in_worker(c: Candidate, short: FinetuneConfig) -> dict:
    return _fit(_WORKER_TASK, c, short, quiet=True)
