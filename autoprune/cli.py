"""The ``autoprune`` command line: a thin layer over the Python API, in this one module.

Each command parses its flags into the API's own types (:class:`~autoprune.task.TaskConfig`,
:func:`autoprune.api.search`, :func:`autoprune.api.load`) and prints what came back; the work
lives below. Heavy modules are imported inside the commands, so ``autoprune --help`` is quick;
``--help`` alone imports the registries, so the choices it lists are the registered ones.
Errors a user can cause (:class:`~autoprune.errors.AutopruneError`) print one line and exit with
code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from autoprune.errors import AutopruneError
from autoprune.studies import DEFAULT_STORAGE

# Where each extension point's registry lives, imported only when its names are needed.
_REGISTRIES = {
    "model": ("autoprune.model.zoo", "MODELS"),
    "dataset": ("autoprune.data.datasets", "DATASETS"),
    "importance": ("autoprune.prune.importance", "IMPORTANCE"),
    "granularity": ("autoprune.prune.granularity", "GRANULARITIES"),
    "reconstruct": ("autoprune.reconstruct.refit", "RECONSTRUCTIONS"),
    "proxy": ("autoprune.evaluate.metrics", "PROXIES"),
    "searcher": ("autoprune.agents", "SEARCHERS"),
    "reward": ("autoprune.envs.rewards", "REWARDS"),
    "runtime": ("autoprune.cost.runtimes", "RUNTIMES"),
}


def _registry(kind: str):
    module, attr = _REGISTRIES[kind]
    return getattr(importlib.import_module(module), attr)


class _Help:
    """Option help that lists a registry's entries, read only when ``--help`` is asked for."""

    full = False

    @classmethod
    def of(cls, kind: str, lead: str, default: str | None = None) -> str:
        tail = f" (default {default})" if default else ""
        if not cls.full:
            return f"{lead}{tail}"
        reg = _registry(kind)
        listed = "; ".join(f"{n}: {reg.describe(n)}" if reg.describe(n) else n for n in reg.names())
        return f"{lead}{tail}. One of: " + listed.replace("%", "%%")


def _round_to(text: str) -> int | str:
    """``8`` or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a whole number nor 'auto'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _batch_sizes(text: str) -> tuple[int, ...]:
    """``1`` or ``1,8,32``: batch sizes of at least 1."""
    try:
        sizes = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a batch size or a comma-separated list") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be at least 1")
    return sizes


# ------------------------------------------------------------------------------------------------
# shared options
# ------------------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser, weights_required: bool = False) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="resnet18",
                   help=_Help.of("model", "registered model or package.module:function (or file.py:function)",
                                 "resnet18"))
    g.add_argument("--weights", required=weights_required, metavar="PATH",
                   help="state_dict or checkpoint (loaded strictly, weights_only=True)")
    g.add_argument("--pretrained", action="store_true", help="torchvision's ImageNet weights")
    g.add_argument("--dataset", default=None, help=_Help.of("dataset", "registered dataset", "digits, bundled"))
    g.add_argument("--data-dir", metavar="DIR", help="where the dataset lives or is downloaded to")
    g.add_argument("--split-seed", type=int, default=0,
                   help="seeds which training images form search-val and calibration (default 0)")


def add_unit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("units")
    g.add_argument("--granularity", default="channel", help=_Help.of("granularity", "what a unit is", "channel"))
    g.add_argument("--nm-ladder", default=None, metavar="N:M,...",
                   help="with --granularity nm: the rungs a unit may take (default "
                        "8:8,6:8,4:8,2:4,2:8,1:4,1:8; dense is always one)")
    g.add_argument("--importance", default="l1", help=_Help.of("importance", "channel/weight ranking", "l1"))
    g.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="module-name pattern never pruned (repeatable, fnmatch)")
    g.add_argument("--round-to", type=_round_to, default=None, metavar="N|auto",
                   help="widths are multiples of this (default 8 if every unit has 32+ channels, else 1); "
                        "auto: the widths at which the latency runtime gets faster, read from its latency "
                        "table (search: needs a latency budget or --latency-runtime)")


def add_eval_args(p: argparse.ArgumentParser, reconstruct_default: str) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--search-val-size", type=int, default=None,
                   help="search-val images (default 5000, or 10%% of small sets)")
    g.add_argument("--search-val", default=None, metavar="{train,heldout}",
                   help="where search-val's images come from: train (default; images the checkpoint fit) or "
                        "heldout (its val split, else a seeded part of test, the test report on the rest)")
    g.add_argument("--calib-batches", type=int, default=10, help="calibration batches (default 10)")
    g.add_argument("--calib-batch-size", type=int, default=64, help="default 64")
    g.add_argument("--eval-batch-size", type=int, default=500, help="default 500")
    g.add_argument("--reconstruct", default=None,
                   help=_Help.of("reconstruct", "what is done with calibration images after the cut",
                                 reconstruct_default))
    g.add_argument("--proxy", default="acc",
                   help=_Help.of("proxy", "how search-val scores each pruned model", "acc"))
    g.add_argument("--no-bn-recalibration", action="store_true",
                   help="score pruned models with the dense model's BN statistics")
    g.add_argument("--episode-finetune-steps", type=int, default=0,
                   help="fine-tune steps on each pruned model before scoring (default 0: none)")
    g.add_argument("--episode-finetune", default=None, choices=("distill", "sgd"),
                   help="how those steps train: distill (default: export's recipe, from the dense model) "
                        "or sgd (cross-entropy at lr 0.01, as studies made before this option)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]")


def add_latency_args(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("latency")
    g.add_argument("--latency-batch", type=_batch_sizes, default=(1,), metavar="N[,N...]",
                   help=f"batch size(s) {what} (default 1)")
    g.add_argument("--latency-threads", type=int, default=None, help="CPU threads (default 1)")
    g.add_argument("--latency-runtime", default=None,
                   help=_Help.of("runtime", "what runs the model when its latency is measured", "eager"))


def add_finetune_args(g) -> None:
    g.add_argument("--finetune-epochs", type=float, default=0.0,
                   help="fine-tune the pruned model for N epochs with the recipe: distillation from the "
                        "dense model, augmentation, warm-up then cosine; a checkpoint every epoch, "
                        "finetune.csv beside the model, the best epoch kept by search-val (default 0: none)")
    g.add_argument("--finetune-lr", type=float, default=None, help="peak learning rate (default 0.005)")
    g.add_argument("--finetune-batch-size", type=int, default=128)
    g.add_argument("--finetune-compile", action="store_true",
                   help="train through torch.compile (compiles for minutes first; pays on long GPU runs)")
    g.add_argument("--distill", type=float, default=None,
                   help="weight of distillation from the dense model's logits, 0-1 (default 0.9)")
    g.add_argument("--label-smoothing", type=float, default=None, help="of the cross-entropy term (default 0)")
    g.add_argument("--hint", type=float, default=None,
                   help="weight of feature-map hints: the squared error between the pruned model's BatchNorm "
                        "outputs and the dense model's on the kept channels (default 0: none)")
    g.add_argument("--resume", action="store_true",
                   help="continue the fine-tune a killed run left in the output folder")


def _storage_arg(p) -> None:
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help=f"sqlite:///FILE.db, journal:///FILE.log or postgresql://... (default {DEFAULT_STORAGE})")


def _default_dataset(args: argparse.Namespace) -> str:
    if args.dataset:
        return args.dataset
    print("note: no --dataset given: using the bundled offline 'digits' set (8x8 handwritten "
          "digits). For real data pass --dataset cifar10|cifar100|imagefolder --data-dir DIR "
          "and --weights PATH.", file=sys.stderr)
    return "digits"


def _absolute(path: str | None) -> str | None:
    """Paths recorded in studies are absolute, so export and workers find them from anywhere (a
    path that does not exist stays as typed, for the error that names it)."""
    return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path


def _granularity(args: argparse.Namespace) -> str:
    """``--granularity`` with ``--nm-ladder`` folded in: ``nm:2:4,1:4``, the spec studies store."""
    ladder = getattr(args, "nm_ladder", None)
    if ladder is None:
        return args.granularity
    if args.granularity != "nm":
        raise AutopruneError(f"--nm-ladder goes with --granularity nm, not {args.granularity!r}")
    return f"nm:{ladder}"


def task_config(args: argparse.Namespace, reconstruct: str = "lsq"):
    """The :class:`~autoprune.task.TaskConfig` of the parsed flags (checked by whoever uses it:
    ``TaskConfig.check`` runs before any data is read)."""
    from autoprune.task import TaskConfig

    if getattr(args, "episode_finetune", None) and not getattr(args, "episode_finetune_steps", 0):
        raise AutopruneError("--episode-finetune says how --episode-finetune-steps train; give the steps too")
    return TaskConfig(
        model=args.model, weights=_absolute(args.weights), pretrained=args.pretrained,
        dataset=args.dataset or "digits", data_dir=_absolute(args.data_dir), seed=args.split_seed,
        granularity=_granularity(args), importance=args.importance, exclude=tuple(args.exclude),
        round_to=args.round_to, search_val_size=getattr(args, "search_val_size", None),
        search_val=getattr(args, "search_val", None) or "train",
        calib_batches=getattr(args, "calib_batches", 10), calib_batch_size=getattr(args, "calib_batch_size", 64),
        eval_batch_size=getattr(args, "eval_batch_size", 500),
        bn_recalibration=not getattr(args, "no_bn_recalibration", False), proxy=getattr(args, "proxy", "acc"),
        reconstruct=getattr(args, "reconstruct", None) or reconstruct,
        episode_finetune_steps=getattr(args, "episode_finetune_steps", 0),
        episode_finetune=getattr(args, "episode_finetune", None), device=getattr(args, "device", "cpu"),
    )


def _finetune(args: argparse.Namespace, seed: int):
    from autoprune.finetune.loop import FinetuneConfig

    _check_finetune_flags(args)
    if args.finetune_epochs == 0:
        if args.resume:
            raise AutopruneError("--resume continues a fine-tune: give the same --finetune-epochs as the killed run")
        return None
    given = {"lr": args.finetune_lr, "distill": args.distill, "label_smoothing": args.label_smoothing,
             "hint": args.hint}
    return FinetuneConfig.recipe(args.finetune_epochs, batch_size=args.finetune_batch_size, seed=seed,
                                 compile=args.finetune_compile,
                                 **{k: v for k, v in given.items() if v is not None}).check()


# ------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    titles = {"model": "models", "dataset": "datasets", "importance": "importance criteria",
              "granularity": "granularities", "reconstruct": "reconstructions", "proxy": "search proxies",
              "searcher": "searchers",
              "reward": "rewards", "runtime": "latency runtimes"}
    for kind, title in titles.items():
        reg = _registry(kind)
        print(f"{title}:")
        for name in reg.names():
            print(f"  {name:<20} {reg.describe(name)}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from autoprune.api import inspect

    args.dataset = args.dataset or "digits"
    report = inspect(task_config(args))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from autoprune.api import apply

    config = task_config(args).check()
    args.dataset = _default_dataset(args)
    metrics = apply(args.policy, config, args.output, finetune=_finetune(args, args.split_seed),
                    reconstruct=args.reconstruct, test=not args.no_test, latency_batches=args.latency_batch,
                    latency_device=args.latency_device, latency_threads=args.latency_threads,
                    latency_runtime=args.latency_runtime or "eager", resume=args.resume, progress=not args.quiet)
    print(f"wrote {args.output}/pruned.pt, model.pt2, policy.json, metrics.json "
          f"(FLOPs x{metrics['ratios']['flops']:.3f}, params x{metrics['ratios']['params']:.3f})")
    return 0


def env_settings(args: argparse.Namespace) -> dict:
    """The :class:`~autoprune.envs.EnvConfig` fields among the parsed flags, by name (a flag
    spelled like its field needs nothing here)."""
    from autoprune.envs.config import EnvConfig

    if len(args.latency_batch) != 1:
        raise AutopruneError("--latency-batch: a search measures its latency budget at one batch size")
    settings = {name: getattr(args, name) for name in EnvConfig.names() if hasattr(args, name)}
    settings["latency_batch"] = args.latency_batch[0]
    if settings.get("latency_runtime") is None:  # not given: the default, and round_to auto refuses it
        settings.pop("latency_runtime", None)
    if "budget" in settings:  # --budget given once or more (several: one per metric)
        settings["budget"] = ",".join(settings["budget"] or ["0.5flops"])
    return settings


def cmd_search(args: argparse.Namespace) -> int:
    import optuna

    from autoprune.api import search

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dataset_given = args.dataset is not None
    result = search(
        task_config(args), searcher=args.searcher, episodes=args.episodes, seed=args.seed,
        storage=args.storage, study_name=args.study_name, resume=args.resume, workers=args.workers,
        state_dir=args.state_dir, searcher_options={"warmup": args.warmup} if args.warmup is not None else None,
        early_stop=args.early_stop, progress=not args.quiet,
        command=" ".join(shlex.quote(a) for a in ["autoprune", *args.argv]),
        before_work=None if dataset_given else lambda: _default_dataset(args), **env_settings(args),
    )
    print(summary(result))
    return 0


def _budget_line(budget, ratios: dict) -> str:
    """``latency 0.528 of 0.8, met (measured)``: one budget of a trial."""
    from autoprune.envs.budget_check import within_budget

    value = ratios.get(budget.metric)
    if value is None:
        return f"{budget.metric} not measured (budget {budget.ratio:g})"
    verdict = "met" if within_budget(value, budget) else "MISSED"
    return f"{budget.metric} {value:.3f} of {budget.ratio:g}, {verdict}" + (
        " (measured)" if budget.metric == "latency" else "")


def summary(result) -> str:
    """What a finished search says: the study, its best trial against the best one-shot rule, the
    best policy per unit, and where to look next."""
    from autoprune.evaluate.metrics import proxy_label
    from autoprune.studies.records import best_rule_trial
    from autoprune.studies.storage import journal_path, storage_kind

    study, best, storage = result.study, result.best, result.storage
    lines = [f"study {study.study_name!r} in {storage}: {len(study.trials)} trials ({result.new_trials} new)"]
    if best is None:
        return "\n".join(lines + ["no complete trial yet"])
    a = best.user_attrs
    dense = result.record.fingerprint.dense_score
    ratios = ", ".join(f"{k} {v:.3f}" for k, v in a["ratios"].items())
    label = proxy_label(result.record.task.proxy)
    who = f"the one-shot rule {a['rule']}" if a.get("rule") else f"searched by {a['searcher']}"
    lines.append(f"best: trial {best.number}, {who}: {label} {a['accuracy']:.2%}"
                 + (f" (dense {dense:.2%})" if dense is not None else "")
                 + f", reward {a['reward']:+.4f}; cost ratios: {ratios} (budget {result.record.search.budget})")
    budgets = result.record.search.env.parsed_budgets
    if len(budgets) > 1:
        lines.append("each budget: " + "; ".join(_budget_line(b, a["ratios"]) for b in budgets))
    rule = best_rule_trial(study)
    if rule is not None and rule.number != best.number:
        r = rule.user_attrs
        lines.append(f"best one-shot rule: {r['rule']} (trial {rule.number}), {label} {r['accuracy']:.2%}; "
                     f"the search is {100 * (a['accuracy'] - r['accuracy']):+.2f} points past it")
    elif rule is not None:
        lines.append("the search has not beaten the best one-shot rule yet")
    if result.record.search.env.parsed_budget.metric != "latency":
        lines.extend(speedup_lines(result.speedups()))
    lines.append("per-unit sparsity (achieved -> kept width):")
    policy = result.policy(best)
    sizes = result.task().table.sizes()
    width = max(len(n) for n in policy.sparsity)
    for (name, s), size in zip(policy.sparsity.items(), sizes):
        pattern = f"  {policy.patterns[name]}" if name in policy.patterns else ""
        lines.append(f"  {name:<{width}}  {s:6.3f}  {size:>6} -> {policy.widths[name]}{pattern}")
    plain = str(journal_path(storage)) if storage_kind(storage) == "journal" else storage
    lines.append(f"dashboard: autoprune dashboard --storage {storage}   (or: optuna-dashboard {plain})")
    lines.append(f"export:    autoprune export {study.study_name} --storage {storage} -o policy.json")
    return "\n".join(lines)


def speedup_lines(speed: dict | None) -> list[str]:
    """What a FLOPs or params study's best policy buys in time, beside the best rule's (see
    :meth:`autoprune.SearchResult.speedups`), and a warning where it is slower than the rule."""
    if speed is None:
        return []
    how = f"{speed['runtime']}, batch {speed['batch']}, {speed['threads']} thread(s)"
    best = speed["best"]
    line = f"measured ({how}): best policy x{best['latency']:.3f} of dense latency at FLOPs x{best['flops']:.3f}"
    rule = speed.get("rule")
    if rule is not None and rule["trial"] != best["trial"]:
        line += f"; best rule {rule['rule']} x{rule['latency']:.3f} at FLOPs x{rule['flops']:.3f}"
    lines = [line]
    if speed["slower_than_rule"]:
        lines.append(f"warning: the searched policy runs {100 * (best['latency'] / rule['latency'] - 1):.0f}% "
                     f"slower than the rule {rule['rule']} on {speed['runtime']}; round widths (--round-to) "
                     "or search with a latency budget if speed is what you are after")
    return lines


def _check_finetune_flags(args: argparse.Namespace) -> None:
    if args.finetune_batch_size < 1:
        raise AutopruneError("--finetune-batch-size must be at least 1")
    if not args.finetune_epochs >= 0:  # nan too
        raise AutopruneError(f"--finetune-epochs is {args.finetune_epochs:g}; give 0 (no fine-tune) or more")


def cmd_export(args: argparse.Namespace) -> int:
    from autoprune.api import load
    from autoprune.units.policy import FORMATS

    _check_finetune_flags(args)
    if args.format not in FORMATS:
        raise AutopruneError(f"unknown --format {args.format!r}; choose one of: {', '.join(FORMATS)}")
    from autoprune.task.config import check_device

    check_device(args.latency_device)
    if args.latency_runtime is not None:  # the study's own runtime is checked once the study is read
        from autoprune.cost.runtimes import get_runtime

        get_runtime(args.latency_runtime).check(args.latency_device)
    out = Path(args.output)
    if not out.parent.is_dir():
        raise AutopruneError(f"cannot write {out}: folder {out.parent} does not exist")
    if args.top_k < 1 or args.select_epochs < 0 or args.select_workers < 1 or args.select_images < 1:
        raise AutopruneError("--top-k, --select-workers and --select-images must be at least 1 and "
                             "--select-epochs 0 or more")
    if args.top_k > 1 and (args.trial is not None or not (args.weights or args.model_dir)
                           or (args.select_epochs > 0 and args.finetune_epochs <= 0)):
        raise AutopruneError("--top-k picks among the best trials by fine-tuning them (or, with --select-epochs 0, "
                             "by scoring them on more images): it needs a model (--weights or --model-dir), "
                             "--finetune-epochs unless --select-epochs is 0, and no --trial")
    result = load(args.study, args.storage, weights=args.weights, data_dir=args.data_dir,
                  device=args.device, progress=not args.quiet)
    trial = result.trial(args.trial, args.pick)
    if args.weights or args.model_dir:
        model_dir = Path(args.model_dir) if args.model_dir else out.with_name(out.stem + "_model")
        ft = _finetune(args, result.record.task.seed)
        metrics = result.export(model_dir, trial, reconstruct=args.reconstruct, finetune=ft, onnx=args.onnx,
                                quiet=args.quiet, resume=args.resume, top_k=args.top_k,
                                select_epochs=args.select_epochs, latency_runtime=args.latency_runtime,
                                latency_device=args.latency_device, select_workers=args.select_workers,
                                select_images=args.select_images)
        if "selection" in metrics:
            trial = result.trial(metrics["selection"]["kept"])
        policy = result.policy(trial)
        policy.meta["exported_model"] = {"dir": str(model_dir), "test_accuracy": metrics["pruned"].get(
            "test_acc_finetuned", metrics["pruned"].get("test_acc"))}
        print(f"wrote {model_dir}/: pruned.pt, model.pt2{', model.onnx' if args.onnx else ''}, "
              f"policy.json, metrics.json" + (", finetune.csv" if ft is not None else ""))
        if result.record.search.env.parsed_budget.metric != "latency":
            for line in speedup_lines(result.speedups(trial)):
                print(line)
    else:
        policy = result.policy(trial)
    policy.save(out, format=args.format)
    a = trial.user_attrs
    from autoprune.evaluate.metrics import proxy_label

    ratios = ", ".join(f"{k} {v:.3f}" for k, v in a["ratios"].items())
    print(f"wrote {out} ({args.format}): trial {trial.number} of {result.study.study_name!r}, "
          f"{proxy_label(result.record.task.proxy)} {a['accuracy']:.2%}, {ratios}")
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
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

    written = write_report(load_study(args.study, args.storage), args.output, args.storage)
    print(f"wrote {args.output}/: " + ", ".join(written))
    return 0


# ------------------------------------------------------------------------------------------------
# parser
# ------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """A flag the parser cannot read is bad input as any other: one line and exit code 2 (the
    usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"autoprune: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="autoprune", allow_abbrev=False,
        description="Find how much to prune each layer of a trained model to meet a FLOPs, "
                    "parameter or latency budget.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_models_command, _inspect_command, _apply_command, _search_command, _export_command,
                _studies_commands):
        add(sub)
    return parser


def _command(sub, name: str, func, help: str, **kw) -> argparse.ArgumentParser:
    p = sub.add_parser(name, allow_abbrev=False, help=help, **kw)
    p.set_defaults(func=func, parser=p)
    return p


def _models_command(sub) -> None:
    _command(sub, "models", cmd_models, "list the registered models, datasets, criteria, searchers and rewards")


def _inspect_command(sub) -> None:
    p = _command(sub, "inspect", cmd_inspect, "show a model's prunable units and what each costs")
    add_model_args(p)
    add_unit_args(p)
    p.add_argument("--json", action="store_true", help="print the table as JSON")


def _apply_command(sub) -> None:
    p = _command(sub, "apply", cmd_apply, "prune a model with a policy file and measure the result")
    add_model_args(p)
    add_unit_args(p)
    add_eval_args(p, "the policy's, else lsq")
    p.add_argument("--policy", required=True, metavar="FILE", help="policy JSON or YAML")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    add_finetune_args(p)
    p.add_argument("--no-test", action="store_true", help="skip test-set accuracy")
    add_latency_args(p, "the pruned and dense models are timed at")
    p.add_argument("--latency-device", default="cpu")
    p.add_argument("-q", "--quiet", action="store_true")


def _search_command(sub) -> None:
    p = _command(sub, "search", cmd_search, "search per-unit sparsities that meet a budget",
                 description="Search per-unit sparsities that meet a budget; every episode is one "
                             "trial of an Optuna study.")
    add_model_args(p)
    add_unit_args(p)
    g = p.add_argument_group("search")
    g.add_argument("--budget", action="append", default=None,
                   help="0.5flops, 0.3params, 0.7latency, 2xflops or 50%%flops (default 0.5flops); repeat it "
                        "for several at once, one per metric (--budget 0.5flops --budget 0.75latency): "
                        "every episode meets them all")
    g.add_argument("--searcher", default="tpe", help=_Help.of("searcher", "how policies are chosen", "tpe"))
    g.add_argument("--episodes", type=int, default=60, help="complete trials the study should hold (default 60)")
    g.add_argument("--seed", type=int, default=0,
                   help="the searcher's seed (the data split has its own, --split-seed)")
    g.add_argument("--reward", default="acc", help=_Help.of("reward", "the episode's reward", "acc"))
    g.add_argument("--reward-lambda", type=float, default=1.0, help="penalty weight of acc-penalty")
    g.add_argument("--min-sparsity", type=float, default=0.0)
    g.add_argument("--max-sparsity", type=float, default=0.8)
    g.add_argument("--range", action="append", default=[], metavar="PATTERN=LO:HI", dest="ranges",
                   help="bound the sparsity of the units matching PATTERN (fnmatch), or fix it with "
                        "PATTERN=V, e.g. 'layer1.*=0:0.3', 'conv1=0'; the pattern 'coupled' names the units an "
                        "add or concat ties across layers (repeatable; later ones win). '--range coupled=0 "
                        "--share stage' is the stage space: residual stream whole, one sparsity per stage")
    g.add_argument("--share", action="append", default=[], metavar="PATTERN|stage",
                   help="units matching PATTERN take one sparsity (units a range fixes share with none); "
                        "'stage' shares within each first "
                        "name component (layer1, layer2, ...) (repeatable)")
    g.add_argument("--early-stop", default=None, choices=("median", "halving"),
                   help="score search-val in chunks (--eval-batch-size images each) and let an Optuna "
                        "pruner stop a policy that trails after a chunk: median or halving (successive "
                        "halving). Stopped trials are recorded as PRUNED and never exported (samplers only)")
    g.add_argument("--warmup", type=int, default=None,
                   help="RL warm-up episodes: the one-shot rules, then random actions")
    add_latency_args(p, "a latency budget is measured at (one)")
    p.add_argument("--latency-margin", type=float, default=None, metavar="FRACTION",
                   help="a latency budget's episodes aim at budget/(1+FRACTION) (default: the latency "
                        "table's mean fit error; 0: at the budget)")
    p.add_argument("--latency-pairs", type=int, default=30, metavar="N",
                   help="alternated dense/pruned runs behind each episode's measured latency (default 30)")
    p.add_argument("--no-latency-correct", dest="latency_correct", action="store_false",
                   help="trust the latency table; by default, from the third episode the wall aims by the "
                        "median of measured over predicted latency")
    p.add_argument("--latency-refit", action="store_true",
                   help="correct the latency table by fitting its coefficients again after each episode, on its "
                        "calibration and every episode measured so far; by default it is scaled by the median "
                        "of measured over predicted latency (the refit predicts episodes closer; with it two TPE "
                        "searches found about as good policies, two DDPG searches worse ones)")
    p.add_argument("--latency-adapt", action="store_true",
                   help="from the tenth episode, aim with a margin of how far over their median 9 in 10 ratios of "
                        "measured to predicted latency ran (never more than the first); off by default: timings "
                        "taken under load can size it too small")
    p.add_argument("--no-latency-fill", dest="latency_fill", action="store_false",
                   help="play each policy as the action wall leaves it; by default a latency budget's policy "
                        "is widened into what it leaves below the wall's aim")
    p.add_argument("--no-latency-retry", dest="latency_retry", action="store_false",
                   help="keep an episode that measures over its latency budget as it ran; by default it is "
                        "played once more with the wall aimed by its own measured over predicted latency")
    s = p.add_argument_group("study")
    _storage_arg(s)
    s.add_argument("--study-name", default=None, help="default: <model>-<dataset>-<budget>-<searcher>")
    s.add_argument("--resume", action="store_true", help="continue an existing study")
    s.add_argument("--state-dir", default=None, help="where RL agents keep their checkpoints")
    s.add_argument("--workers", type=int, default=1,
                   help="worker processes on one study (samplers; journal or PostgreSQL storage)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_eval_args(p, "lsq")


def _export_command(sub) -> None:
    p = _command(sub, "export", cmd_export, "write a study's best policy (and, with weights, the pruned model)")
    p.add_argument("study", help="study name (see `autoprune studies`)")
    _storage_arg(p)
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
    add_finetune_args(m)
    m.add_argument("--top-k", type=int, default=1, metavar="K",
                   help="fine-tune the K best trials within budget for --select-epochs each, keep the one best "
                        "on search-val, then fine-tune it fully (default 1: the best proxy score)")
    m.add_argument("--select-epochs", type=float, default=1.0, metavar="E",
                   help="epochs each --top-k candidate is fine-tuned for (default 1; 0: none, each is scored "
                        "by the proxy on --select-images more training images instead)")
    m.add_argument("--select-images", type=int, default=10_000, metavar="N",
                   help="with --select-epochs 0: training images outside search-val the candidates are "
                        "scored on (default 10000)")
    m.add_argument("--select-workers", type=int, default=1, metavar="N",
                   help="fine-tune N --top-k candidates at once, each in a process of its own (default 1; "
                        "on a GPU that one small model leaves idle)")
    m.add_argument("--onnx", action="store_true", help="also write model.onnx, checked in onnxruntime")
    m.add_argument("--latency-runtime", default=None,
                   help=_Help.of("runtime", "what runs the models whose latency metrics.json reports",
                                 "the study's"))
    m.add_argument("--latency-device", default="cpu",
                   help="where that latency is timed (default cpu; cuda[:N] for the semi-structured runtime)")
    m.add_argument("--reconstruct", default=None,
                   help=_Help.of("reconstruct", "how the model is rebuilt", "as the study's episodes were scored"))
    m.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("-q", "--quiet", action="store_true")


def _studies_commands(sub) -> None:
    p = _command(sub, "studies", cmd_studies, "list the studies in a storage")
    _storage_arg(p)
    p.add_argument("--json", action="store_true")

    p = _command(sub, "dashboard", cmd_dashboard, "serve optuna-dashboard on the study storage")
    _storage_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback only)")
    p.add_argument("--port", type=int, default=8080)

    p = _command(sub, "report", cmd_report, "trials CSV, markdown summary and plots of a study")
    p.add_argument("study")
    _storage_arg(p)
    p.add_argument("-o", "--output", required=True, metavar="DIR")


def _in_flags(message: str, command: argparse.ArgumentParser) -> str:
    """A library error in the command line's terms: a setting it names (``calib_batches``) becomes
    the flag that sets it (``--calib-batches``), where the command has that flag."""
    flags = set(re.findall(r"--[a-z][a-z0-9-]*", command.format_help()))

    def flag(m: re.Match) -> str:
        name = "--" + m.group(1).replace("_", "-")
        return name if name in flags else m.group(0)

    message = re.sub(r"\b([a-z]+(?:_[a-z0-9]+)*)=True\b", flag, message)  # resume=True -> --resume
    return re.sub(r"(?<![\w-])([a-z]+(?:_[a-z0-9]+)+)\b", flag, message)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # a command's --help lists its registries' entries (importing them); the top-level one needs none
    _Help.full = bool({"-h", "--help"} & set(argv[1:])) and argv[0] not in ("-h", "--help")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0), or a flag it cannot read (2, said in one line)
        return int(done.code or 0)
    args.argv = argv
    # the library's notes, one line each on stderr (the search's progress bar is tqdm's)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    lib = logging.getLogger("autoprune")
    lib.addHandler(handler)
    lib.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)  # -q: no progress
    lib.propagate = False
    try:
        return int(args.func(args) or 0)
    except AutopruneError as err:
        print(f"autoprune: error: {_in_flags(str(err), args.parser)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("autoprune: interrupted", file=sys.stderr)
        return 130
    finally:
        lib.removeHandler(handler)
        lib.propagate, lib.level = True, logging.NOTSET


if __name__ == "__main__":
    sys.exit(main())
