"""autoprune.envs: the Gymnasium environment ``autoprune/LayerSparsity-v0``.

Importing this package registers the environment, so that::

    import gymnasium, autoprune.envs
    env = gymnasium.make("autoprune/LayerSparsity-v0", model="resnet20", budget="0.5flops")

works; the keyword arguments are those of :class:`LayerSparsityEnv` and of
:class:`~autoprune.task.TaskConfig` (model, weights, dataset, granularity, importance, ...).
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

from autoprune.envs.layer_sparsity import LayerSparsityEnv, make_cost_model
from autoprune.envs.rewards import REWARDS, Outcome
from autoprune.envs.wall import ActionWall

ENV_ID = "autoprune/LayerSparsity-v0"

if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="autoprune.envs.layer_sparsity:LayerSparsityEnv")

__all__ = ["ENV_ID", "LayerSparsityEnv", "ActionWall", "REWARDS", "Outcome", "make_cost_model"]
