"""The Python API: search a model's per-unit sparsities under a budget, then use the result.

    import autoprune

    result = autoprune.search(model, example_inputs, budget="0.5flops", score=my_score, calib=loader)
    result.best_policy              # the best policy found (a Policy)
    model = result.pruned_model()   # pruned, reconstructed and recalibrated like the search scored it
    result.export("out/")           # model.pt2 (plain torch.export), policy.json, metrics.json

``model`` is any ``nn.Module`` in eval mode; ``score`` any callable ``model -> float`` (higher is
better: accuracy, mAP, mIoU, minus a loss); ``calib`` any iterable of input batches (BatchNorm
recalibration and reconstruction read up to ``calib_batches * calib_batch_size`` inputs). Or pass
a :class:`~autoprune.task.TaskConfig` to search a registered model on a registered dataset,
scored by top-1 accuracy on search-val; this is what the ``autoprune`` command line does.

Every search is an Optuna study in ``storage``; :func:`load` opens one again (to export another
trial, or after the process ended). The study records a digest of the model's weights and the
data name, so resuming or loading it with another model is refused.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import fields, replace
from pathlib import Path

import optuna
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.finetune import FinetuneConfig
from autoprune.policy import Policy
from autoprune.studies import DEFAULT_STORAGE
from autoprune.task import PruningTask, Score, TaskConfig

# TaskConfig fields a model given in Python does not use (it is already built and loaded).
_REGISTRY_ONLY = ("model", "weights", "pretrained", "dataset", "data_dir", "search_val_size", "eval_batch_size")
Finetune = FinetuneConfig | Callable[[nn.Module], object] | None


def python_model_name(model: nn.Module) -> str:
    return f"python:{type(model).__module__}.{type(model).__qualname__}"


def make_task(model: nn.Module | TaskConfig, example_inputs=None, score: Score | None = None,
              calib: Iterable | None = None, test_score: Score | None = None, data_name: str = "custom",
              progress: bool = True, precheck: Callable | None = None, **settings) -> PruningTask:
    """The :class:`~autoprune.task.PruningTask` of :func:`search`'s arguments (see there);
    ``precheck(table)`` runs on a registered model's architecture before weights are loaded."""
    if isinstance(model, TaskConfig):
        if example_inputs is not None or score is not None or calib is not None or test_score is not None:
            raise AutopruneError("a TaskConfig brings its own data and score; example_inputs, score, "
                                 "calib and test_score are for a model given as an nn.Module")
        return PruningTask(replace(model, **settings), progress=progress, precheck=precheck)
    if not isinstance(model, nn.Module):
        raise AutopruneError(f"model must be an nn.Module or a TaskConfig, not {type(model).__name__}")
    missing = [n for n, v in (("example_inputs", example_inputs), ("score", score), ("calib", calib)) if v is None]
    if missing:
        raise AutopruneError(f"a model given as an nn.Module needs {', '.join(missing)}")
    allowed = {f.name for f in fields(TaskConfig)} - set(_REGISTRY_ONLY)
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise AutopruneError(f"unknown task setting(s) {', '.join(unknown)}; choose from {', '.join(sorted(allowed))}")
    config = TaskConfig(model=python_model_name(model), dataset=data_name, **settings)
    return PruningTask.from_model(model, example_inputs, score, calib, config, data_name, test_score)


def search(model: nn.Module | TaskConfig, example_inputs=None, budget: str = "0.5flops",
           score: Score | None = None, calib: Iterable | None = None, *, test_score: Score | None = None,
           data_name: str = "custom", searcher: str = "tpe", episodes: int = 60, seed: int = 0,
           storage: str = DEFAULT_STORAGE, study_name: str | None = None, resume: bool = False,
           workers: int = 1, state_dir: str | None = None, reward: str = "acc", reward_lambda: float = 1.0,
           min_sparsity: float = 0.0, max_sparsity: float = 0.8, ranges: Iterable[str] = (),
           share: Iterable[str] = (), latency_batch: int = 1,
           latency_threads: int | None = None, latency_runtime: str = "eager",
           latency_margin: float | None = None, latency_correct: bool = True,
           searcher_options: dict | None = None, early_stop: str | None = None,
           progress: bool = True, command: str = "", before_work: Callable[[], object] | None = None,
           **task_settings) -> SearchResult:
    """Search per-unit sparsities of ``model`` that meet ``budget``; every episode is one trial of
    an Optuna study in ``storage``.

    Args:
        model: an ``nn.Module`` (with ``example_inputs``, ``score`` and ``calib``), or a
            :class:`~autoprune.task.TaskConfig` naming a registered model and dataset.
        example_inputs: one input batch (a tensor), traced to find the prunable units.
        budget: ``0.5flops``, ``0.3params``, ``0.7latency``, ``2xflops``, ``50%flops``.
        score: ``model -> float``, higher is better; called on every pruned model, on ``device``.
        calib: an iterable of input batches (or ``(input, target)`` tuples).
        test_score: a held-out score reported by :meth:`SearchResult.export`.
        data_name: names the data behind ``score`` in the study, so that a resume with other data
            is refused.
        searcher: a registered searcher (``tpe``, ``cmaes``, ``ddpg``, ``uniform``, ...).
        episodes: complete trials the study should hold.
        seed: the searcher's seed (the data split has its own, ``seed`` in ``task_settings``
            for a TaskConfig).
        storage: an Optuna storage URL (``sqlite:///FILE.db``, ``journal:///FILE.log``, PostgreSQL).
        study_name: default ``<model>-<data>-<budget>-<searcher>``.
        resume: continue an existing study of the same search.
        workers: processes on one study (samplers; journal or PostgreSQL storage; TaskConfig only).
        reward, reward_lambda, min_sparsity, max_sparsity, latency_batch, latency_threads: the
            environment's settings (:class:`~autoprune.envs.LayerSparsityEnv`).
        latency_runtime: what runs the model when its latency is measured: ``eager``,
            ``compile`` or ``onnxruntime`` (:data:`~autoprune.runtimes.RUNTIMES`).
        latency_margin: under a latency budget, aim at ``budget / (1 + margin)``; ``None`` takes
            the latency table's mean fit error, 0 aims at the budget itself.
        latency_correct: from the third measured episode, aim by the median of measured over
            predicted latency (False: trust the table).
        ranges: per-unit bounds, ``"PATTERN=LO:HI"`` or ``"PATTERN=V"`` (fnmatch on unit names).
        share: ``"PATTERN"`` or ``"stage"``: units that take one sparsity (:mod:`autoprune.envs.space`).
        searcher_options: e.g. ``{"warmup": 100}`` for RL agents.
        early_stop: ``median`` or ``halving``: score search-val in chunks and let an Optuna pruner
            stop a trailing policy (samplers; such trials are PRUNED and never exported).
        command: the command line to record with the study (the CLI's own).
        before_work: called once every cheap check passed, before any data is loaded or model
            built (the CLI prints its notes there, so a typo gets one line and nothing else).
        task_settings: :class:`~autoprune.task.TaskConfig` fields: ``granularity``,
            ``importance``, ``exclude``, ``round_to``, ``reconstruct``, ``calib_batches``,
            ``calib_batch_size``, ``bn_recalibration``, ``device``, ...
    """
    from autoprune.agents import SEARCHERS
    from autoprune.budget import parse_budget
    from autoprune.envs import REWARDS, LayerSparsityEnv
    from autoprune.envs.layer_sparsity import check_reachable
    from autoprune.runtimes import get_runtime
    from autoprune.studies.runner import SearchConfig, check_early_stop, run_search
    from autoprune.studies.storage import check_storage
    from autoprune.studies.workers import check_workers

    # cheap checks first: a typo must not cost a baseline training or a data download
    parsed = parse_budget(budget)
    from autoprune.envs.space import parse_range

    ranges, share = tuple(ranges), tuple(share)
    for entry in ranges:  # the patterns are matched once the model is traced
        parse_range(entry)
    SEARCHERS.get(searcher)
    REWARDS.get(reward)
    runtime = get_runtime(latency_runtime)
    if parsed.metric == "latency":  # a missing package is refused before any work
        runtime.check(model.device if isinstance(model, TaskConfig) else task_settings.get("device", "cpu"))
    if episodes < 1:
        raise AutopruneError("episodes must be at least 1")
    check_early_stop(early_stop)
    if workers < 1:
        raise AutopruneError("workers must be at least 1")
    check_workers(searcher, storage, workers)
    check_storage(storage)
    if isinstance(model, TaskConfig):
        model.check()
    if before_work is not None:
        before_work()
    def reachable(table) -> None:  # before a baseline is trained: an unreachable budget costs seconds
        check_reachable(table, parsed, min_sparsity, max_sparsity, ranges, share)

    task = make_task(model, example_inputs, score, calib, test_score, data_name, progress, reachable,
                     **task_settings)
    env = LayerSparsityEnv(task, budget=parsed, reward=reward, reward_lambda=reward_lambda,
                           min_sparsity=min_sparsity, max_sparsity=max_sparsity, ranges=tuple(ranges),
                           share=tuple(share), latency_batch=latency_batch,
                           latency_threads=latency_threads, latency_runtime=latency_runtime,
                           latency_margin=latency_margin, latency_correct=latency_correct, progress=progress)
    config = SearchConfig(searcher=searcher, storage=storage, episodes=episodes, seed=seed,
                          study_name=study_name, resume=resume, state_dir=state_dir,
                          searcher_options=dict(searcher_options or {}), early_stop=early_stop,
                          progress=progress, command=command)
    if workers > 1:
        from autoprune.studies.workers import run_workers

        run = run_workers(env, config, workers)
    else:
        run = run_search(env, config)
    return SearchResult(run.study, storage, task, new_trials=run.new_trials)


def load(study_name: str, storage: str = DEFAULT_STORAGE, model: nn.Module | None = None,
         example_inputs=None, score: Score | None = None, calib: Iterable | None = None,
         test_score: Score | None = None, weights: str | None = None, data_dir: str | None = None,
         device: str | None = None, progress: bool = True) -> SearchResult:
    """Open a finished (or running) search again.

    A study of a registered model rebuilds its task from the study's records when a model is
    needed (``weights`` and ``data_dir`` point to files that moved). A study of a model given in
    Python needs that model again, with ``example_inputs``, ``score`` and ``calib``; its weights
    must be those searched (checked by digest).
    """
    from autoprune.studies.export import check_fingerprint, load_study, rebuild_task
    from autoprune.studies.records import StudyRecord

    study = load_study(study_name, storage)
    record = StudyRecord.of(study)

    def build(reconstruct: str | None) -> PruningTask:
        if model is None:
            return rebuild_task(record, weights, data_dir, device, reconstruct, progress, study_name)
        settings = {f.name: getattr(record.task, f.name) for f in fields(TaskConfig)
                    if f.name not in _REGISTRY_ONLY}
        settings.update(device=device or record.task.device, reconstruct=reconstruct or record.task.reconstruct)
        task = make_task(model, example_inputs, score, calib, test_score, record.task.dataset, progress,
                         **settings)
        check_fingerprint(task.fingerprint(), record.fingerprint)
        return task

    return SearchResult(study, storage, build=build)


class SearchResult:
    """A search's study and what can be made of it: policies, pruned models, exports.

    Attributes:
        study: the Optuna study (every episode one trial; the dashboard reads the same storage).
        storage: its storage URL.
        new_trials: episodes this call added (0 for :func:`load`).
    """

    def __init__(self, study: optuna.Study, storage: str, task: PruningTask | None = None,
                 build: Callable[[str | None], PruningTask] | None = None, new_trials: int = 0) -> None:
        from autoprune.studies.records import StudyRecord

        self.study, self.storage, self.new_trials = study, storage, new_trials
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
        from autoprune.studies.records import best_trial

        return best_trial(self.study)

    def trial(self, number: int | None = None, pick: str = "accuracy") -> optuna.trial.FrozenTrial:
        """Trial ``number``, or the best (two-objective studies: the Pareto point ``pick``:
        ``accuracy``, ``cost`` or ``knee``)."""
        from autoprune.studies.export import choose_trial

        return choose_trial(self.study, number, pick)

    def policy(self, trial: int | optuna.trial.FrozenTrial | None = None) -> Policy:
        """The achieved, self-describing policy of ``trial`` (default: the best)."""
        from autoprune.studies.export import trial_policy

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
        as the search scored it, then fine-tuned if asked (a :class:`~autoprune.finetune.FinetuneConfig`
        on a registered dataset, or any callable that trains the model in place), with masks made
        permanent. A plain ``nn.Module`` on the task's device."""
        from autoprune.apply import run_finetune

        task = self.task(reconstruct)
        kept = task.kept(self.policy(trial))
        model, _ = task.pruned(kept)
        if finetune is not None:
            run_finetune(task, model, finetune, quiet=True, kept=kept)
        return task.pruner.finalize(model)

    def export(self, directory: str | Path, trial: int | optuna.trial.FrozenTrial | None = None,
               reconstruct: str | None = None, finetune: Finetune = None, onnx: bool = False,
               latency_batches: tuple[int, ...] = (1,), quiet: bool = True, resume: bool = False,
               top_k: int = 1, select_epochs: float = 1.0, latency_runtime: str | None = None) -> dict:
        """Write ``trial``'s pruned model and measurements to ``directory`` (made atomically):
        ``model.pt2`` (a ``torch.export`` program: ``torch.export.load(path).module()`` needs no
        autoprune), ``policy.json``, ``metrics.json``, ``pruned.pt`` for registered models, and
        ``model.onnx`` with ``onnx=True``. Latency is measured with ``latency_runtime`` (default:
        the one the study searched with). Returns the metrics.

        A :class:`~autoprune.finetune.FinetuneConfig` fine-tune checkpoints every epoch into
        ``directory`` and logs ``finetune.csv`` there; ``resume`` continues a killed one. With
        ``top_k > 1`` the ``top_k`` best trials are each fine-tuned for ``select_epochs`` with the
        same recipe, the one best on search-val is kept (``metrics["selection"]``) and fine-tuned
        in full."""
        from autoprune.apply import apply_policy

        task = self.task(reconstruct)
        extra = None
        if top_k > 1:
            trial, extra = self._select(task, top_k, select_epochs, finetune, Path(directory), resume, quiet)
        policy = self.policy(trial)
        return apply_policy(task, policy, directory, finetune, test=task.has_test,
                            latency_batches=latency_batches, onnx=onnx, quiet=quiet, resume=resume, extra=extra,
                            latency_runtime=latency_runtime or self.record.search.latency_runtime)

    def _select(self, task: PruningTask, k: int, epochs: float, finetune: Finetune, directory: Path,
                resume: bool, quiet: bool) -> tuple[optuna.trial.FrozenTrial, dict]:
        """Fine-tune the ``k`` best trials briefly and keep the best on search-val. Each finished
        candidate is written to ``directory/selection.json`` at once, so ``resume`` skips it."""
        from dataclasses import asdict

        from autoprune.apply import run_finetune
        from autoprune.artifacts import check_output_dir
        from autoprune.fileio import write_document
        from autoprune.studies.records import top_trials

        if not isinstance(finetune, FinetuneConfig) or finetune.epochs <= 0:
            raise AutopruneError("top-k selection fine-tunes the candidates with the same recipe: "
                                 "pass finetune=FinetuneConfig.recipe(epochs)")
        short = replace(finetune, epochs=epochs)
        path = directory / "selection.json"
        record = {"k": k, "select_epochs": epochs, "recipe": asdict(short), "candidates": []}
        if resume and path.exists():
            saved = json.loads(path.read_text())
            if all(saved.get(key) == record[key] for key in ("k", "select_epochs", "recipe")):
                record["candidates"] = saved["candidates"]
        check_output_dir(directory)
        directory.mkdir(exist_ok=True)
        done = {c["trial"] for c in record["candidates"]}
        candidates = top_trials(self.study, k)
        for rank, t in enumerate(candidates, 1):
            if t.number in done:
                continue
            kept = task.kept(self.policy(t))
            model, _ = task.pruned(kept)
            ran = run_finetune(task, model, short, quiet, desc=f"top-{k} candidate {rank}/{len(candidates)}",
                               log_test=False, kept=kept)
            row = {"trial": t.number, "rank_by_proxy": rank, "proxy_acc": t.user_attrs["accuracy"],
                   "val_acc": ran.val_acc, "best_epoch": ran.best_epoch}
            if task.has_test:  # recorded to measure the pick afterwards, never used to make it
                row["test_acc"] = task.test_accuracy(model)
            record["candidates"].append(row)
            write_document(path, record)
        best = max(record["candidates"], key=lambda c: (c["val_acc"], -c["rank_by_proxy"]))
        record["kept"] = best["trial"]
        if not quiet:
            print(f"top-{k}: kept trial {best['trial']} (proxy rank {best['rank_by_proxy']}), search-val "
                  f"{best['val_acc']:.2%} after {epochs:g} epoch(s)", file=sys.stderr)
        return self.trial(best["trial"]), {"selection": record}

    def _trial(self, trial) -> optuna.trial.FrozenTrial:
        if isinstance(trial, optuna.trial.FrozenTrial):
            return trial
        return self.trial(trial)
