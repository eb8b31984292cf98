"""Every use of Torch-Pruning in autoprune, in autoprune's own terms.

Torch-Pruning (VainF/Torch-Pruning) owns what it does best here: finding the channels a network
couples (its ``DependencyGraph``), scoring a coupled group, and slimming one layer. Part of what
autoprune needs is not its public API, so all of it lives in this one module: an upgrade that
moves something breaks here, and ``tests/engine/test_tp_adapter.py`` says what moved. Nothing else in
autoprune imports ``torch_pruning`` (``studies/runner.py`` only records its version).

Relied on, public (documented in Torch-Pruning's README and docstrings):

* ``tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False)``;
* ``DependencyGraph.get_all_groups(ignored_layers=..., root_module_types=...)``, yielding groups
  with full indices; ``group[i]`` is an item with ``dep`` and ``idxs``;
* ``DependencyGraph.is_out_channel_pruning_fn(fn)`` and ``is_in_channel_pruning_fn(fn)``;
* ``tp.importance.GroupMagnitudeImportance(p=..., normalizer=None)``, ``BNScaleImportance``,
  ``FPGMImportance`` and ``GroupTaylorImportance`` (``normalizer=None``): ``imp(group)`` gives one
  score per root channel of a full-index group, or ``None`` when it has nothing to score;
* ``tp.__version__``.

Relied on, NOT public API (internals that may change in any release):

* ``item.root_idxs``: the root channel of each index, set by ``get_all_groups`` on its items
  (not a field of the ``GroupItem`` namedtuple);
* ``Dependency.handler``, ``Dependency.target.module`` and ``Dependency.target.pruning_dim``;
* a handler is a bound method of a ``tp.pruner.function.BasePruningFunc``; its ``pruning_dim``
  attribute picks the dimension it cuts (``handler.__self__.pruning_dim = dim``, as
  ``Dependency.__call__`` does), ``handler(module, idxs)`` slims a module in place and
  ``handler(parameter, idxs)`` returns a new, smaller ``nn.Parameter``.

Names of modules and bare parameters come from the model itself (``named_modules``,
``named_parameters``), which is how the graph names them too, so the graph's private
``_module2name`` and ``_param_to_name`` are not needed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from autoprune.errors import AutopruneError

# What tests/engine/test_tp_adapter.py checks exists, as paths under the ``torch_pruning`` package.
RELIED_ON = (
    "__version__",
    "DependencyGraph",
    "DependencyGraph.build_dependency",
    "DependencyGraph.get_all_groups",
    "DependencyGraph.is_out_channel_pruning_fn",
    "DependencyGraph.is_in_channel_pruning_fn",
    "pruner.function.BasePruningFunc",
    "importance.GroupMagnitudeImportance",
    "importance.BNScaleImportance",
    "importance.FPGMImportance",
    "importance.GroupTaylorImportance",
)


def version() -> str:
    """The installed Torch-Pruning's version (recorded with every study)."""
    import torch_pruning as tp

    return tp.__version__


@dataclass(frozen=True)
class Coupling:
    """One module dimension that a group's root channels map onto.

    Attributes:
        target: qualified name of the module, or of the bare parameter, that is cut.
        handler: Torch-Pruning's pruning function for it; opaque, handed back to :func:`cut`.
        pruning_dim: the dimension ``handler`` cuts.
        is_param: ``target`` is a bare ``nn.Parameter`` (replaced when cut), not a module.
        target_idxs: the target's indices, one per coupled index (full: every root channel).
        root_idxs: the root channel each of ``target_idxs`` follows.
        is_out: cuts the target's outputs.
        is_in: cuts the target's inputs.
    """

    target: str
    handler: object
    pruning_dim: int
    is_param: bool
    target_idxs: np.ndarray
    root_idxs: np.ndarray
    is_out: bool = True
    is_in: bool = False


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels that are pruned together, and every module dimension they reach.

    Attributes:
        size: root channels (the root layer's outputs).
        couplings: the model's modules and bare parameters in the group, in the graph's order;
            the graph's own ops (add, concat, ...) are left out.
        graph_group: Torch-Pruning's group with full indices, which its importances score; it
            holds the traced graph, so drop it once scored.
    """

    size: int
    couplings: tuple[Coupling, ...]
    graph_group: object


def channel_groups(model: nn.Module, example: torch.Tensor, ignored: Sequence[str] = (),
                   root_types: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)) -> list[ChannelGroup]:
    """Trace ``model`` once and return its groups of coupled output channels.

    Args:
        model: read, never modified (tracing runs one forward pass with autograd on).
        example: one input batch.
        ignored: names of modules whose outputs are never pruned: no group is rooted at them,
            and a group that would cut their outputs is left out.
        root_types: module types a group may be rooted at.
    """
    import torch_pruning as tp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dg = tp.DependencyGraph().build_dependency(model, example, verbose=False)
        except Exception as err:  # an op its tracer does not follow (ShuffleNet's channel shuffle)
            raise AutopruneError(
                "Torch-Pruning could not trace this model's channel dependencies "
                f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else 'no message'}); "
                "granularity 'unstructured' or 'nm' prunes weights and needs no channel graph") from err
    modules = dict(model.named_modules())
    name_of = {m: n for n, m in model.named_modules()}
    param_name = {p: n for n, p in model.named_parameters()}
    groups = []
    for group in dg.get_all_groups(ignored_layers=[modules[n] for n in ignored], root_module_types=root_types):
        couplings = []
        for item in group:
            dep = item.dep
            target = dep.target.module
            is_param = isinstance(target, nn.Parameter)
            name = param_name.get(target) if is_param else name_of.get(target)
            if name is None:
                continue  # an op of the graph (add, concat, ...), not a module of the model
            couplings.append(Coupling(
                name, dep.handler, dep.target.pruning_dim, is_param,
                np.asarray(item.idxs, dtype=np.int64), np.asarray(item.root_idxs, dtype=np.int64),
                bool(dg.is_out_channel_pruning_fn(dep.handler)), bool(dg.is_in_channel_pruning_fn(dep.handler)),
            ))
        groups.append(ChannelGroup(len(group[0].idxs), tuple(couplings), group))
    return groups


def cut(model: nn.Module, target: str, handler: object, pruning_dim: int, is_param: bool,
        idxs: Sequence[int]) -> None:
    """Remove indices ``idxs`` of dimension ``pruning_dim`` of ``target`` in ``model``, in place.

    ``model`` may be a copy of the traced one: only names and ``handler`` (a :class:`Coupling`'s)
    are used.
    """
    handler.__self__.pruning_dim = pruning_dim  # what Torch-Pruning's Dependency.__call__ does
    idxs = list(idxs)
    if is_param:
        parent_name, _, attr = target.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, handler(getattr(parent, attr), idxs))
    else:
        handler(model.get_submodule(target), idxs)


# ------------------------------------------------------------------------------------------------
# group importances: one score per root channel, or None for a group with nothing to score
# ------------------------------------------------------------------------------------------------
Scorer = Callable[[ChannelGroup], "torch.Tensor | None"]


def _scores(make: Callable[[object], object]) -> Scorer:
    def score(group: ChannelGroup) -> torch.Tensor | None:
        import torch_pruning as tp

        return make(tp.importance)(group.graph_group)

    return score


def magnitude_scorer(p: int) -> Scorer:
    """The Lp norm of each channel's weights across the coupled layers."""
    return _scores(lambda imp: imp.GroupMagnitudeImportance(p=p, normalizer=None))


def bn_scale_scorer() -> Scorer:
    """|gamma| of the BatchNorm layers in the group (network slimming)."""
    return _scores(lambda imp: imp.BNScaleImportance(normalizer=None))


def fpgm_scorer() -> Scorer:
    """Distance of each filter to the geometric median of the layer's filters (FPGM)."""
    return _scores(lambda imp: imp.FPGMImportance(normalizer=None))


def taylor_scorer() -> Scorer:
    """First-order Taylor |w * dL/dw| over the group; needs the weights' gradients."""
    return _scores(lambda imp: imp.GroupTaylorImportance(normalizer=None))
