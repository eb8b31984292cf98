"""The ``autoprune`` command line.

Parsing lives here; the work lives in the engine, ``autoprune.studies`` and ``autoprune.agents``,
imported lazily so ``autoprune --help`` is instant. Errors a user can cause
(:class:`~autoprune.errors.AutopruneError`) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace

from autoprune.errors import AutopruneError

# ------------------------------------------------------------------------------------------------
# shared options
# ------------------------------------------------------------------------------------------------
# Where each extension point's registry lives, imported only when its names are needed.
_REGISTRIES = {
    "model": ("autoprune.models", "MODELS"),
    "dataset": ("autoprune.data", "DATASETS"),
    "importance": ("autoprune.importance", "IMPORTANCE"),
    "granularity": ("autoprune.granularity", "GRANULARITIES"),
    "reconstruct": ("autoprune.reconstruct", "RECONSTRUCTIONS"),
}


def _names(kind: str) -> list[str]:
    import importlib

    module, attr = _REGISTRIES[kind]
    return getattr(importlib.import_module(module), attr).names()


def add_model_args(p: argparse.ArgumentParser, weights_required: bool = False) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="resnet18",
                   help="registered model (see `autoprune models`) or package.module:function "
                        "(default: resnet18)")
    g.add_argument("--weights", required=weights_required, metavar="PATH",
                   help="state_dict or checkpoint (loaded strictly, weights_only=True)")
    g.add_argument("--pretrained", action="store_true", help="torchvision's ImageNet weights")
    g.add_argument("--dataset", default=None,
                   help="digits (bundled, offline default), cifar10, cifar100, imagefolder")
    g.add_argument("--data-dir", metavar="DIR", help="where the dataset lives or is downloaded to")
    g.add_argument("--split-seed", type=int, default=0,
                   help="seeds which training images form search-val and calibration (default 0)")


def add_unit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("units")
    g.add_argument("--granularity", default="channel", help="channel (default) or unstructured")
    g.add_argument("--importance", default="l1",
                   help="channel/weight ranking: l1 (default), l2, bn_scale, fpgm, taylor, thinet, random")
    g.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="module-name pattern never pruned (repeatable, fnmatch)")
    g.add_argument("--round-to", type=int, default=None,
                   help="widths are multiples of this (default 8 if every unit has 32+ channels, else 1)")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--search-val-size", type=int, default=None,
                   help="search-val images carved from train (default 5000, or 10%% of small sets)")
    g.add_argument("--calib-batches", type=int, default=10, help="BN recalibration batches")
    g.add_argument("--calib-batch-size", type=int, default=64)
    g.add_argument("--eval-batch-size", type=int, default=500)
    g.add_argument("--reconstruct", default=None,
                   help="after the cut: lsq (the default: least-squares refit of every layer the policy "
                        "changed, to the dense outputs on calibration images), lsq-all (also every later "
                        "layer) or none")
    g.add_argument("--no-bn-recalibration", action="store_true",
                   help="score pruned models with the dense model's BN statistics")
    g.add_argument("--episode-finetune-steps", type=int, default=0,
                   help="SGD steps on each pruned model before scoring")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]")


def _default_dataset(args: argparse.Namespace) -> str:
    if args.dataset:
        return args.dataset
    print("note: no --dataset given: using the bundled offline 'digits' set (8x8 handwritten "
          "digits). For real data pass --dataset cifar10|cifar100|imagefolder --data-dir DIR "
          "and --weights PATH.", file=sys.stderr)
    return "digits"


def task_config(args: argparse.Namespace):
    from autoprune.task import TaskConfig

    for kind in ("dataset", "importance", "granularity", "reconstruct"):
        value = getattr(args, kind, None)
        if value is not None and value not in _names(kind):
            raise AutopruneError(f"unknown {kind} {value!r}; choose one of: {', '.join(_names(kind))}")
    for name in ("calib_batches", "calib_batch_size", "eval_batch_size"):
        if getattr(args, name, 1) < 1:
            raise AutopruneError(f"--{name.replace('_', '-')} must be at least 1")
    return TaskConfig(
        model=args.model,
        weights=args.weights,
        pretrained=args.pretrained,
        dataset=args.dataset,
        data_dir=args.data_dir,
        seed=args.split_seed,
        granularity=args.granularity,
        importance=args.importance,
        exclude=tuple(args.exclude),
        round_to=args.round_to,
        search_val_size=getattr(args, "search_val_size", None),
        calib_batches=getattr(args, "calib_batches", 10),
        calib_batch_size=getattr(args, "calib_batch_size", 64),
        eval_batch_size=getattr(args, "eval_batch_size", 500),
        bn_recalibration=not getattr(args, "no_bn_recalibration", False),
        reconstruct=getattr(args, "reconstruct", None) or "lsq",
        episode_finetune_steps=getattr(args, "episode_finetune_steps", 0),
        device=getattr(args, "device", "cpu"),
    )


def _check_model_name(name: str) -> None:
    from autoprune.models import MODELS

    if name not in MODELS and ":" not in name:
        raise AutopruneError(
            f"unknown model {name!r}; choose one of: {', '.join(MODELS.names())}, "
            "or pass package.module:function"
        )


# ------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from autoprune.data import DATASETS
    from autoprune.importance import IMPORTANCE
    from autoprune.models import MODELS

    for title, reg in (("models", MODELS), ("datasets", DATASETS), ("importance", IMPORTANCE)):
        print(f"{title}:")
        for name in reg.names():
            print(f"  {name:<20} {reg.describe(name)}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    from autoprune.checkpoints import load_weights
    from autoprune.data import dataset_info
    from autoprune.inspect import format_units, unit_rows
    from autoprune.models import ModelSpec, build_model
    from autoprune.units import build_unit_table

    _check_model_name(args.model)
    dataset = args.dataset or "digits"
    config = task_config(argparse.Namespace(**{**vars(args), "dataset": dataset}))
    info = dataset_info(dataset, args.data_dir)
    model = build_model(args.model, ModelSpec(info.num_classes, info.in_channels, info.image_size))
    if args.weights:
        load_weights(model, args.weights)
    example = torch.zeros(1, info.in_channels, info.image_size, info.image_size)
    table = build_unit_table(model, example, config.granularity, config.exclude,
                             1 if config.round_to is None else config.round_to)
    if config.round_to is None:
        table.round_to = 8 if min(u.size for u in table.units) >= 32 else 1
    if args.json:
        print(json.dumps({"model": args.model, "dataset": dataset, "granularity": table.granularity,
                          "dense_flops": table.dense_macs, "dense_params": table.dense_params,
                          "round_to": table.round_to, "units": unit_rows(table)}, indent=2))
    else:
        title = (f"{args.model} on {dataset} ({info.in_channels}x{info.image_size}x{info.image_size}, "
                 f"{info.num_classes} classes), {table.granularity} granularity")
        print(format_units(table, title))
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from autoprune.apply import apply_policy
    from autoprune.finetune import FinetuneConfig
    from autoprune.policy import Policy
    from autoprune.task import PruningTask

    _check_model_name(args.model)
    args.dataset = _default_dataset(args)
    config = task_config(args)
    if any(b < 1 for b in args.latency_batch) or args.finetune_batch_size < 1:
        raise AutopruneError("--latency-batch and --finetune-batch-size must be at least 1")
    from autoprune.task import check_device

    check_device(args.latency_device)
    policy = Policy.load(args.policy)  # a malformed policy fails before any model is built
    if args.reconstruct is None:  # rebuild the model as the policy's search scored it
        config = replace(config, reconstruct=policy.meta.get("reconstruct", "lsq"))
    task = PruningTask(config, progress=not args.quiet)
    ft = None
    if args.finetune_epochs > 0:
        ft = FinetuneConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, distill=args.distill,
                            batch_size=args.finetune_batch_size, seed=args.split_seed)
    metrics = apply_policy(task, policy, args.output, ft, test=not args.no_test,
                           latency_batches=tuple(args.latency_batch), latency_device=args.latency_device,
                           latency_threads=args.latency_threads, quiet=args.quiet)
    print(f"wrote {args.output}/pruned.pt, model.pt2, policy.json, metrics.json "
          f"(FLOPs x{metrics['ratios']['flops']:.3f}, params x{metrics['ratios']['params']:.3f})")
    return 0


# ------------------------------------------------------------------------------------------------
# parser
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoprune",
        allow_abbrev=False,  # worker command lines are rewritten flag by flag: no abbreviations
        description="Find how much to prune each layer of a trained model to meet a FLOPs, "
                    "parameter or latency budget.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("models", allow_abbrev=False, help="list registered models, datasets and importance criteria")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("inspect", allow_abbrev=False, help="show a model's prunable units and what each costs")
    add_model_args(p)
    add_unit_args(p)
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("apply", allow_abbrev=False, help="prune a model with a policy file and measure the result")
    add_model_args(p)
    add_unit_args(p)
    add_eval_args(p)
    p.add_argument("--policy", required=True, metavar="FILE", help="policy JSON or YAML")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--finetune-epochs", type=float, default=0.0)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--finetune-batch-size", type=int, default=128)
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of distillation from the dense model during fine-tuning (0-1)")
    p.add_argument("--no-test", action="store_true", help="skip test-set accuracy")
    p.add_argument("--latency-batch", type=int, action="append", default=None,
                   help="batch size for latency (repeatable; default 1)")
    p.add_argument("--latency-device", default="cpu")
    p.add_argument("--latency-threads", type=int, default=None,
                   help="intra-op threads for latency (default 1 on CPU)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_apply)

    _add_study_commands(sub)
    return parser


def _add_study_commands(sub) -> None:
    """Subcommands of the search and study layers, when those packages are installed."""
    try:
        from autoprune.studies import cli as study_cli
    except ImportError:
        return
    study_cli.add_commands(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if getattr(args, "latency_batch", "unset") is None:
        args.latency_batch = [1]
    try:
        return int(args.func(args) or 0)
    except AutopruneError as err:
        print(f"autoprune: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("autoprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
