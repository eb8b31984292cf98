"""autoprune: find per-layer pruning ratios that meet a budget with the least accuracy loss.

The Python API (:mod:`autoprune.api`)::

    import autoprune

    result = autoprune.search(model, example_inputs, budget="0.5flops", score=score, calib=batches)
    result.export("pruned/")

The names below are imported on first use, so ``import autoprune`` stays light.
"""

__version__ = "0.1.0"

__all__ = ["search", "load", "apply", "inspect", "SearchResult", "TaskConfig", "EnvConfig", "Policy",
           "FinetuneConfig", "AutopruneError", "semi_structured"]

_EXPORTS = {
    "search": "autoprune.api", "load": "autoprune.api", "apply": "autoprune.api", "inspect": "autoprune.api",
    "SearchResult": "autoprune.studies.result", "EnvConfig": "autoprune.envs.config",
    "TaskConfig": "autoprune.task", "Policy": "autoprune.units.policy", "FinetuneConfig": "autoprune.finetune.loop",
    "AutopruneError": "autoprune.errors", "semi_structured": "autoprune.cost.semi_structured",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'autoprune' has no attribute {name!r}")
