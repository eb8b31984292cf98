"""autoprune.envs: the Gymnasium environment ``autoprune/LayerSparsity-v0``.

Importing this package registers the environment, so that::

    import gymnasium, autoprune.envs
    env = gymnasium.make("autoprune/LayerSparsity-v0", model="resnet20", budget="0.5flops")

works; the keyword arguments are the fields of :class:`EnvConfig` (budget, reward, sparsity range,
...) and of :class:`~autoprune.task.TaskConfig` (model, weights, dataset, granularity, importance, ...).
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

from autoprune.envs.config import EnvConfig
from autoprune.envs.layer_sparsity import LayerSparsityEnv, Stop, make_cost_model
from autoprune.envs.outcome import EpisodeOutcome
from autoprune.envs.rewards import REWARDS, Outcome
from autoprune.envs.wall import ActionWall

ENV_ID = "autoprune/LayerSparsity-v0"

if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="autoprune.envs.layer_sparsity:LayerSparsityEnv")

__all__ = ["ENV_ID", "ActionWall", "EnvConfig", "EpisodeOutcome", "LayerSparsityEnv", "Outcome", "REWARDS", "Stop",
           "make_cost_model"]
