"""The Python API: search a model's per-unit sparsities under a budget, then use the result.

    import autoprune

    autoprune.inspect(model, example_inputs)       # the prunable units and what each costs
    result = autoprune.search(model, example_inputs, budget="0.5flops", score=my_score, calib=loader)
    result.best_policy              # the best policy found (a Policy)
    model = result.pruned_model()   # pruned, reconstructed and recalibrated like the search scored it
    result.export("out/")           # model.pt2 (plain torch.export), policy.json, metrics.json
    autoprune.apply("policy.json", model, "out/", example_inputs, score=my_score, calib=loader)

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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields, replace
from pathlib import Path

from torch import nn

from autoprune.envs.config import EnvConfig
from autoprune.errors import AutopruneError
from autoprune.studies import DEFAULT_STORAGE
from autoprune.studies.result import Finetune, SearchResult
from autoprune.task import PruningTask, Score, TaskConfig
from autoprune.task.task import first_tensor
from autoprune.units.policy import Policy
from autoprune.units.summary import UnitReport

# TaskConfig fields a model given in Python does not use (it is already built and loaded).
_REGISTRY_ONLY = ("model", "weights", "pretrained", "dataset", "data_dir", "search_val_size", "search_val",
                  "eval_batch_size")


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
    config = _python_config(model, data_name, settings)
    return PruningTask.from_model(model, example_inputs, score, calib, config, data_name, test_score)


def _refuse_unknown(task_settings: dict, allowed: set[str]) -> None:
    """One clear error for settings that are neither the task's (``allowed``) nor the env's."""
    unknown = sorted(set(task_settings) - allowed)
    if unknown:
        raise AutopruneError(f"unknown setting(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(sorted(allowed | EnvConfig.names()))}")


def _python_config(model: nn.Module, data_name: str, settings: dict) -> TaskConfig:
    """The :class:`~autoprune.task.TaskConfig` of a model given in Python: the settings that
    apply to a built model, refused by name otherwise."""
    _refuse_unknown(settings, {f.name for f in fields(TaskConfig)} - set(_REGISTRY_ONLY))
    return TaskConfig(model=python_model_name(model), dataset=data_name, **settings)


def search(model: nn.Module | TaskConfig, example_inputs=None, budget: str | None = None,
           score: Score | None = None, calib: Iterable | None = None, *, test_score: Score | None = None,
           data_name: str = "custom", searcher: str = "tpe", episodes: int = 60, seed: int = 0,
           storage: str = DEFAULT_STORAGE, study_name: str | None = None, resume: bool = False,
           workers: int = 1, state_dir: str | None = None, searcher_options: dict | None = None,
           early_stop: str | None = None, env: EnvConfig | None = None, progress: bool = True,
           command: str = "", before_work: Callable[[], object] | None = None, **settings) -> SearchResult:
    """Search per-unit sparsities of ``model`` that meet ``budget``; every episode is one trial of
    an Optuna study in ``storage``.

    Args:
        model: an ``nn.Module`` (with ``example_inputs``, ``score`` and ``calib``), or a
            :class:`~autoprune.task.TaskConfig` naming a registered model and dataset.
        example_inputs: one input batch (a tensor), traced to find the prunable units.
        budget: ``0.5flops`` (the default), ``0.3params``, ``0.7latency``, ``2xflops``, ``50%flops``.
        score: ``model -> float``, higher is better; called on every pruned model, on ``device``.
        calib: an iterable of input batches (or ``(input, target)`` tuples).
        test_score: a held-out score reported by :meth:`SearchResult.export`.
        data_name: names the data behind ``score`` in the study, so that a resume with other data
            is refused.
        searcher: a registered searcher (``tpe``, ``cmaes``, ``ddpg``, ``uniform``, ...).
        episodes: complete trials the study should hold.
        seed: the searcher's seed (the data split has its own, ``seed`` of a TaskConfig).
        storage: an Optuna storage URL (``sqlite:///FILE.db``, ``journal:///FILE.log``, PostgreSQL).
        study_name: default ``<model>-<data>-<budget>-<searcher>``.
        resume: continue an existing study of the same search.
        workers: processes on one study (samplers; journal or PostgreSQL storage; TaskConfig only).
        state_dir: where RL agents keep their checkpoints (default: beside the storage).
        searcher_options: e.g. ``{"warmup": 100}`` for RL agents.
        early_stop: ``median`` or ``halving``: score search-val in chunks and let an Optuna pruner
            stop a trailing policy (samplers; such trials are PRUNED and never exported).
        env: the environment's settings (:class:`~autoprune.envs.EnvConfig`), or give them by name
            in ``settings``.
        command: the command line to record with the study (the CLI's own).
        before_work: called once every cheap check passed, before any data is loaded or model
            built (the CLI prints its notes there, so a typo gets one line and nothing else).
        settings: fields of :class:`~autoprune.envs.EnvConfig` (``reward``, ``min_sparsity``,
            ``max_sparsity``, ``ranges``, ``share``, ``latency_runtime``, ``latency_batch``, ...)
            and of :class:`~autoprune.task.TaskConfig` (``granularity``, ``importance``,
            ``exclude``, ``round_to``, ``reconstruct``, ``proxy``, ``calib_batches``, ``device``, ...).
    """
    from autoprune.envs import LayerSparsityEnv
    from autoprune.envs.layer_sparsity import check_reachable
    from autoprune.studies.runner import SearchConfig, run_search

    env_settings, task_settings = EnvConfig.split(settings)
    if budget is not None:
        env_settings["budget"] = budget
    env_config = replace(env or EnvConfig(), **env_settings)
    _check_search(model, env_config, task_settings, searcher, episodes, early_stop, workers, storage,
                  runtime_given=env is not None or "latency_runtime" in env_settings)
    if before_work is not None:
        before_work()
    # before a baseline is trained: an unreachable budget costs seconds
    task = make_task(model, example_inputs, score, calib, test_score, data_name, progress,
                     lambda table: check_reachable(table, env_config), **task_settings)
    config = SearchConfig(searcher=searcher, storage=storage, episodes=episodes, seed=seed,
                          study_name=study_name, resume=resume, state_dir=state_dir,
                          searcher_options=dict(searcher_options or {}), early_stop=early_stop,
                          progress=progress, command=command)
    pruning_env = LayerSparsityEnv(task, env_config, progress=progress)
    if workers > 1:
        from autoprune.studies.workers import run_workers

        return run_workers(pruning_env, config, workers)
    return run_search(pruning_env, config)


def _check_search(model, env_config: EnvConfig, task_settings: dict, searcher: str, episodes: int,
                  early_stop: str | None, workers: int, storage: str, runtime_given: bool = True) -> None:
    """Every check that needs no data and no model: a typo must not cost a baseline training or a
    data download. ``runtime_given``: the latency runtime was asked for, not defaulted."""
    from autoprune.agents import SEARCHERS
    from autoprune.cost.latency import check_timeable
    from autoprune.cost.runtimes import get_runtime
    from autoprune.prune.granularity import granularity_of
    from autoprune.studies.runner import check_early_stop
    from autoprune.studies.storage import check_storage
    from autoprune.studies.workers import check_workers

    env_config.check()
    SEARCHERS.get(searcher)
    metric = env_config.parsed_budget.metric
    auto = task_settings.get("round_to", model.round_to if isinstance(model, TaskConfig) else None) == "auto"
    if auto and metric != "latency" and not runtime_given:
        raise AutopruneError(f"round_to auto reads widths from a latency table, and a {metric} budget has none: "
                             "name the runtime the model will run on (--latency-runtime eager|compile|onnxruntime, "
                             "and --latency-batch), or give a width multiple")
    if metric == "latency" or auto:  # a missing package is refused before any work
        device = model.device if isinstance(model, TaskConfig) else task_settings.get("device", "cpu")
        get_runtime(env_config.latency_runtime).check(device)
        granularity = model.granularity if isinstance(model, TaskConfig) else "channel"
        if metric == "latency":  # round_to auto over masks: the task config says why not
            check_timeable(granularity_of(task_settings.get("granularity", granularity)))
    if episodes < 1:
        raise AutopruneError("episodes must be at least 1")
    check_early_stop(early_stop)
    if workers < 1:
        raise AutopruneError("workers must be at least 1")
    check_workers(searcher, storage, workers)
    check_storage(storage)
    if isinstance(model, TaskConfig):
        _refuse_unknown(task_settings, {f.name for f in fields(TaskConfig)})
        replace(model, **task_settings).check()


def apply(policy: Policy | str | Path, model: nn.Module | TaskConfig, output: str | Path, example_inputs=None,
          score: Score | None = None, calib: Iterable | None = None, *, test_score: Score | None = None,
          finetune: Finetune = None, reconstruct: str | None = None, onnx: bool = False,
          latency_batches: Sequence[int] = (1,),
          latency_runtime: str = "eager", latency_device: str = "cpu", latency_threads: int | None = None,
          test: bool = True, resume: bool = False, progress: bool = True, **task_settings) -> dict:
    """Apply a policy to a model and write what a user keeps into ``output`` (made atomically):
    the pruned model, reconstructed and recalibrated exactly as a search scored it, fine-tuned if
    asked, as ``pruned.pt`` and ``model.pt2``, with ``policy.json`` and ``metrics.json`` (dense
    against pruned FLOPs, params, measured latency and accuracy). Returns the metrics.

    Args:
        policy: a :class:`~autoprune.units.policy.Policy` or a policy file (``export`` wrote it).
        model: as for :func:`search`: an ``nn.Module`` with ``example_inputs``, ``score`` and
            ``calib``, or a :class:`~autoprune.task.TaskConfig`.
        finetune: a :class:`~autoprune.finetune.loop.FinetuneConfig` (registered datasets), or a
            callable that trains the model in place; ``resume`` continues a killed fine-tune.
        latency_batches, latency_runtime, latency_device, latency_threads: how latency is measured.
        test: score the held-out test split (or ``test_score``) too, where there is one.
        reconstruct: how the pruned model is rebuilt (default: as the policy's search scored it).
        task_settings: :class:`~autoprune.task.TaskConfig` fields.
    """
    from autoprune.cost.runtimes import get_runtime
    from autoprune.export.apply import apply_policy
    from autoprune.task import check_device

    check_device(latency_device)
    get_runtime(latency_runtime).check(latency_device)
    if not isinstance(policy, Policy):
        policy = Policy.load(policy)  # a malformed policy fails before any model is built
    # rebuild the model as the policy's search scored it, unless told otherwise
    task_settings["reconstruct"] = reconstruct or policy.meta.get("reconstruct", "lsq")
    task = make_task(model, example_inputs, score, calib, test_score, progress=progress, **task_settings)
    return apply_policy(task, policy, output, finetune, test=test and task.has_test, onnx=onnx,
                        latency_batches=tuple(latency_batches),
                        latency_device=latency_device, latency_threads=latency_threads,
                        latency_runtime=latency_runtime, quiet=not progress, resume=resume)


def inspect(model: nn.Module | TaskConfig, example_inputs=None, **task_settings) -> UnitReport:
    """A model's prunable units and what each costs, without data or a search: the report's
    ``rows()`` are dicts, ``str(report)`` the table ``autoprune inspect`` prints.

    Args:
        model: an ``nn.Module`` with ``example_inputs`` (one input batch), or a
            :class:`~autoprune.task.TaskConfig` (its architecture is built, and its ``weights``
            loaded if it names a file; no data is read but the dataset's shape).
        task_settings: :class:`~autoprune.task.TaskConfig` fields that shape the units:
            ``granularity``, ``exclude``, ``round_to``.
    """
    import torch

    from autoprune.data.datasets import dataset_info
    from autoprune.model.checkpoints import load_weights
    from autoprune.model.zoo import ModelSpec, build_model
    from autoprune.task import unit_table

    if isinstance(model, TaskConfig):
        config = replace(model, **task_settings).check(data=False)
        info = dataset_info(config.dataset, config.data_dir)
        net = build_model(config.model, ModelSpec(info.num_classes, info.in_channels, info.image_size))
        if config.weights:
            load_weights(net, config.weights)
        example = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
        title = (f"{config.model} on {config.dataset} ({info.in_channels}x{info.image_size}x{info.image_size}, "
                 f"{info.num_classes} classes)")
    elif isinstance(model, nn.Module):
        if example_inputs is None:
            raise AutopruneError("a model given as an nn.Module needs example_inputs")
        config = _python_config(model, "custom", task_settings).check(model=False, data=False)
        net, example, title = model.eval(), first_tensor(example_inputs)[:1], type(model).__name__
    else:
        raise AutopruneError(f"model must be an nn.Module or a TaskConfig, not {type(model).__name__}")
    table = unit_table(net, example, config)
    return UnitReport(table, f"{title}, {table.granularity} granularity", config.model, config.dataset)


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
