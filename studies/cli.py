"""Subcommands of the study layer: ``search`` (and, as they land, export, studies, dashboard, report)."""

from __future__ import annotations

import argparse
import shlex
import sys

from autoprune.errors import AutopruneError


def add_commands(sub) -> None:
    from autoprune.cli import add_eval_args, add_model_args, add_unit_args

    p = sub.add_parser("search", allow_abbrev=False, help="search per-unit sparsities that meet a budget",
                       description="Search per-unit sparsities that meet a budget; every episode is "
                                   "one trial of an Optuna study.")
    add_model_args(p)
    add_unit_args(p)
    g = p.add_argument_group("search")
    g.add_argument("--budget", default="0.5flops",
                   help="0.5flops, 0.3params, 0.7latency, 2xflops or 50%%flops (default 0.5flops)")
    g.add_argument("--searcher", default="tpe", help=f"{_searchers()} (default tpe)")
    g.add_argument("--episodes", type=int, default=60, help="complete trials the study should hold")
    g.add_argument("--seed", type=int, default=0,
                   help="the searcher's seed (the data split has its own, --split-seed)")
    g.add_argument("--reward", default="acc", help="acc (AMC R_err), acc-log-flops, acc-penalty")
    g.add_argument("--reward-lambda", type=float, default=1.0, help="penalty weight of acc-penalty")
    g.add_argument("--min-sparsity", type=float, default=0.0)
    g.add_argument("--max-sparsity", type=float, default=0.8)
    g.add_argument("--warmup", type=int, default=None, help="RL warm-up episodes of random actions")
    g.add_argument("--latency-batch", type=int, default=1, help="batch size of latency budgets")
    g.add_argument("--latency-threads", type=int, default=None, help="CPU threads (default 1)")
    s = p.add_argument_group("study")
    s.add_argument("--storage", default="sqlite:///autoprune.db",
                   help="sqlite:///FILE.db (default autoprune.db), journal:///FILE.log, postgresql://...")
    s.add_argument("--study-name", default=None,
                   help="default: <model>-<dataset>-<budget>-<searcher>")
    s.add_argument("--resume", action="store_true", help="continue an existing study")
    s.add_argument("--state-dir", default=None, help="where RL agents keep their checkpoints")
    s.add_argument("--workers", type=int, default=1,
                   help="worker processes on one study (samplers; journal or PostgreSQL storage)")
    s.add_argument("--worker-quota", type=int, default=None, help=argparse.SUPPRESS)
    s.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_eval_args(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", allow_abbrev=False,
                       help="write a study's best policy (and, with weights, the pruned model)")
    p.add_argument("study", help="study name (see `autoprune studies`)")
    p.add_argument("--storage", default="sqlite:///autoprune.db")
    p.add_argument("--trial", type=int, default=None, help="export this trial instead of the best")
    p.add_argument("--pick", default="accuracy",
                   help="two-objective studies: the Pareto point with the best accuracy (default), "
                        "the lowest cost, or the knee")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="policy file (.json or .yaml)")
    p.add_argument("--format", default="autoprune", help="autoprune (default), torch-pruning, nni")
    m = p.add_argument_group("pruned model (with --weights or --model-dir)")
    m.add_argument("--weights", default=None, help="the dense weights the study searched")
    m.add_argument("--model-dir", default=None, help="where the model files go "
                   "(default: <output stem>_model next to the policy file)")
    m.add_argument("--data-dir", default=None, help="the dataset's folder, if it moved since the search")
    m.add_argument("--finetune-epochs", type=float, default=0.0)
    m.add_argument("--finetune-lr", type=float, default=0.01)
    m.add_argument("--finetune-batch-size", type=int, default=128)
    m.add_argument("--distill", type=float, default=0.0, help="distillation weight from the dense model")
    m.add_argument("--onnx", action="store_true", help="also write model.onnx, checked in onnxruntime")
    m.add_argument("--reconstruct", default=None,
                   help="lsq or none (default: as the study's episodes were scored)")
    m.add_argument("--device", default="cpu")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("studies", allow_abbrev=False, help="list the studies in a storage")
    p.add_argument("--storage", default="sqlite:///autoprune.db")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_studies)

    p = sub.add_parser("dashboard", allow_abbrev=False, help="serve optuna-dashboard on the study storage")
    p.add_argument("--storage", default="sqlite:///autoprune.db")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("report", allow_abbrev=False, help="trials CSV, markdown summary and plots of a study")
    p.add_argument("study")
    p.add_argument("--storage", default="sqlite:///autoprune.db")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.set_defaults(func=cmd_report)


def _searchers() -> str:
    """The registered searchers for --help; importing them costs seconds, so only when asked."""
    if not {"-h", "--help"} & set(sys.argv):
        return "a registered searcher, e.g. tpe, ddpg, uniform"
    from autoprune.agents import SEARCHERS

    return "one of: " + ", ".join(SEARCHERS.names())


def cmd_search(args: argparse.Namespace) -> int:
    import optuna

    from autoprune.agents import SEARCHERS
    from autoprune.budget import parse_budget
    from autoprune.cli import _check_model_name, _default_dataset, task_config
    from autoprune.envs import REWARDS, LayerSparsityEnv
    from autoprune.studies.runner import SearchConfig, run_search
    from autoprune.studies.storage import check_storage
    from autoprune.task import PruningTask

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Cheap checks first: a typo must not cost a baseline training or a data download.
    _check_model_name(args.model)
    budget = parse_budget(args.budget)
    SEARCHERS.get(args.searcher)
    REWARDS.get(args.reward)
    if args.episodes < 1:
        raise AutopruneError("--episodes must be at least 1")
    if args.workers < 1:
        raise AutopruneError("--workers must be at least 1")
    from autoprune.studies.workers import check_workers

    check_workers(args.searcher, args.storage, args.workers)
    check_storage(args.storage)
    args.dataset = _default_dataset(args)
    config = task_config(args)
    task = PruningTask(config, progress=not args.quiet)
    env = LayerSparsityEnv(task, budget=budget, reward=args.reward, reward_lambda=args.reward_lambda,
                           min_sparsity=args.min_sparsity, max_sparsity=args.max_sparsity,
                           latency_batch=args.latency_batch, latency_threads=args.latency_threads,
                           progress=not args.quiet)
    options = {"warmup": args.warmup} if args.warmup is not None else {}
    search = SearchConfig(
        # each worker samples with its own seed, or they would all draw the same policies
        searcher=args.searcher, storage=args.storage, episodes=args.episodes,
        seed=args.seed + 7919 * (args.worker_index + 1) if args.worker_index is not None else args.seed,
        study_name=args.study_name, resume=args.resume, state_dir=args.state_dir,
        searcher_options=options, progress=not args.quiet,
        command=" ".join(shlex.quote(a) for a in ["autoprune", *args.argv]),
    )
    if args.workers > 1:
        from autoprune.studies.workers import run_workers

        result = run_workers(env, search, args.workers, _worker_command(args.argv))
    else:
        result = run_search(env, search, quota=args.worker_quota)
    if args.worker_quota is None:
        print(summary(result, env, args.storage))
    return 0


# Flags the parent sets for each worker itself: dropped from the command line it hands down.
_PER_WORKER_VALUED = ("--workers", "--study-name", "--worker-quota", "--worker-index")
_PER_WORKER_SWITCHES = ("--resume", "-q", "--quiet")


def _worker_command(argv: list[str]) -> list[str]:
    """This command line without --workers (and the flags the parent sets for each worker)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in _PER_WORKER_VALUED:
            skip = True
            continue
        if a.startswith(tuple(f"{flag}=" for flag in _PER_WORKER_VALUED)) or a in _PER_WORKER_SWITCHES:
            continue
        out.append(a)
    return [sys.executable, "-m", "autoprune.cli", *out]


def summary(result, env, storage: str) -> str:
    study, best = result.study, result.best
    lines = [f"study {study.study_name!r} in {storage}: {len(study.trials)} trials "
             f"({result.new_trials} new)"]
    if best is None:
        return "\n".join(lines + ["no complete trial yet"])
    a = best.user_attrs
    dense = study.user_attrs.get("dense_accuracy")
    ratios = ", ".join(f"{k} {v:.3f}" for k, v in a["ratios"].items())
    lines.append(f"best: trial {best.number} ({a['searcher']}), proxy accuracy {a['accuracy']:.2%}"
                 + (f" (dense {dense:.2%})" if dense is not None else "")
                 + f", reward {a['reward']:+.4f}; cost ratios: {ratios} (budget {env.budget})")
    lines.append("per-unit sparsity (achieved -> kept width):")
    width = max(len(n) for n in a["policy"])
    for (name, s), k, u in zip(a["policy"].items(), a["widths"], env.table.units):
        lines.append(f"  {name:<{width}}  {s:6.3f}  {u.size:>6} -> {k}")
    from autoprune.studies.storage import journal_path, storage_kind

    plain = str(journal_path(storage)) if storage_kind(storage) == "journal" else storage
    lines.append(f"dashboard: autoprune dashboard --storage {storage}   (or: optuna-dashboard {plain})")
    lines.append(f"export:    autoprune export {study.study_name} --storage {storage} -o policy.json")
    return "\n".join(lines)


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from autoprune.studies.export import (
        FORMATS,
        choose_trial,
        export_model,
        load_study,
        policy_document,
        write_policy,
    )

    if args.format not in FORMATS:
        raise AutopruneError(f"unknown --format {args.format!r}; choose one of: {', '.join(FORMATS)}")
    out = Path(args.output)
    if not out.parent.is_dir():
        raise AutopruneError(f"cannot write {out}: folder {out.parent} does not exist")
    study = load_study(args.study, args.storage)
    trial = choose_trial(study, args.trial, args.pick)
    doc = policy_document(study, trial)
    if args.weights or args.model_dir:
        from autoprune.finetune import FinetuneConfig

        model_dir = Path(args.model_dir) if args.model_dir else out.with_name(out.stem + "_model")
        ft = None
        if args.finetune_epochs > 0:
            ft = FinetuneConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, distill=args.distill,
                                batch_size=args.finetune_batch_size, seed=doc.get("split_seed") or 0)
        metrics = export_model(study, trial, model_dir, args.weights, args.data_dir, args.device, ft,
                               args.onnx, quiet=args.quiet, reconstruct=args.reconstruct)
        doc["exported_model"] = {"dir": str(model_dir), "test_accuracy": metrics["pruned"].get(
            "test_acc_finetuned", metrics["pruned"].get("test_acc"))}
        print(f"wrote {model_dir}/: pruned.pt, model.pt2{', model.onnx' if args.onnx else ''}, "
              f"policy.json, metrics.json")
    write_policy(doc, out, args.format)
    a = trial.user_attrs
    print(f"wrote {out} ({args.format}): trial {trial.number} of {study.study_name!r}, proxy accuracy "
          f"{a['accuracy']:.2%}, " + ", ".join(f"{k} {v:.3f}" for k, v in a["ratios"].items()))
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    import json

    from autoprune.studies.report import format_studies, list_studies

    rows = list_studies(args.storage)
    print(json.dumps(rows, indent=2) if args.json else format_studies(rows))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from autoprune.studies.report import serve_dashboard

    serve_dashboard(args.storage, args.host, args.port)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from autoprune.studies.export import load_study
    from autoprune.studies.report import write_report

    study = load_study(args.study, args.storage)
    written = write_report(study, args.output)
    print(f"wrote {args.output}/: " + ", ".join(written))
    return 0
