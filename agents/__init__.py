"""autoprune.agents: searchers behind one interface.

Optuna samplers (tpe, cmaes, gp, qmc, random, nsga2), AMC-style RL agents (ddpg, td3, sac) and
one-shot baselines (uniform, global, erk, lamp), all in :data:`SEARCHERS`.
"""

from __future__ import annotations

from autoprune.agents import baselines, rl, samplers  # noqa: F401  (fill the registry)
from autoprune.agents.base import SEARCHERS, Episode, Searcher, param_name, run_policy

__all__ = ["SEARCHERS", "Episode", "Searcher", "param_name", "run_policy"]
