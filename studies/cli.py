"""Subcommands of the study layer: ``search`` (and, as they land, export, studies, dashboard, report)."""

from __future__ import annotations

import argparse
import shlex
import sys

from autoprune.errors import AutopruneError


def add_commands(sub) -> None:
    from autoprune.cli import add_eval_args, add_model_args, add_unit_args

    p = sub.add_parser("search", help="search per-unit sparsities that meet a budget",
                       description="Search per-unit sparsities that meet a budget; every episode is "
                                   "one trial of an Optuna study.")
    add_model_args(p)
    add_unit_args(p)
    g = p.add_argument_group("search")
    g.add_argument("--budget", default="0.5flops",
                   help="0.5flops, 0.3params, 0.7latency, 2xflops or 50%%flops (default 0.5flops)")
    g.add_argument("--searcher", default="tpe", help=f"one of: {', '.join(_searchers())} (default tpe)")
    g.add_argument("--episodes", type=int, default=60, help="complete trials the study should hold")
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
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_eval_args(p)
    p.set_defaults(func=cmd_search)


def _searchers() -> list[str]:
    from autoprune.agents import SEARCHERS

    return SEARCHERS.names()


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
    check_storage(args.storage)
    args.dataset = _default_dataset(args)
    config = task_config(args)
    task = PruningTask(config, progress=not args.quiet)
    env = LayerSparsityEnv(task, budget=budget, reward=args.reward, reward_lambda=args.reward_lambda,
                           min_sparsity=args.min_sparsity, max_sparsity=args.max_sparsity,
                           latency_batch=args.latency_batch, latency_threads=args.latency_threads,
                           progress=not args.quiet)
    options = {"warmup": args.warmup} if args.warmup else {}
    search = SearchConfig(
        searcher=args.searcher, episodes=args.episodes, seed=args.seed, storage=args.storage,
        study_name=args.study_name, resume=args.resume, state_dir=args.state_dir,
        searcher_options=options, progress=not args.quiet,
        command=" ".join(shlex.quote(a) for a in ["autoprune", *sys.argv[1:]]),
    )
    result = run_search(env, search)
    print(summary(result, env, args.storage))
    return 0


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
    lines.append(f"dashboard: autoprune dashboard --storage {storage}   "
                 f"(or: optuna-dashboard {storage})")
    lines.append(f"export:    autoprune export {study.study_name} --storage {storage} -o policy.json")
    return "\n".join(lines)
