"""The searcher contract: every way of choosing a policy runs episodes on the same env.

A :class:`Searcher` turns the env's units into a policy per episode. Whatever it is, a sampler
asking Optuna for parameters, an RL agent acting step by step, or a one-shot baseline, each of its
episodes goes through :class:`~autoprune.envs.LayerSparsityEnv` (the action wall, the same
evaluation) and is recorded by the study runner as one Optuna trial. That is what makes searchers
comparable like for like, and what lets one dashboard, export and resume path serve all of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna

from autoprune.envs import LayerSparsityEnv
from autoprune.registry import Registry


@dataclass
class Episode:
    """One finished episode: what was asked, what the wall made of it, and the outcome.

    Attributes:
        requested: per-unit sparsity the searcher asked for (before the wall).
        reward: the env's reward.
        summary: the last step's info (policy, accuracy, ratios, reward parts, ...).
    """

    requested: np.ndarray
    reward: float
    summary: dict


def param_name(unit: str) -> str:
    """The Optuna parameter of a unit's sparsity."""
    return f"s/{unit}"


def run_policy(env: LayerSparsityEnv, requested: Sequence[float], seed: int | None = None) -> Episode:
    """Play one episode with a whole requested policy, through the env's steps (and its wall)."""
    env.reset(seed=seed)
    info: dict = {}
    reward = 0.0
    for t in range(env.n_units):
        _, reward, done, _, info = env.step(env.sparsity_to_action(requested[t]))
    assert done
    return Episode(np.asarray(requested, dtype=np.float64), float(reward), info)


class Searcher(ABC):
    """Chooses the policy of each episode.

    The study runner calls :meth:`setup` once, then :meth:`episode` until the study holds the
    requested number of complete trials. Searchers that keep state outside the study (RL agents)
    implement :meth:`save` and :meth:`load`, called after every episode and on resume.

    Attributes:
        name: the registry name.
        directions: the study's objective directions (one per recorded value).
        uses_trial: ``True`` if :meth:`episode` draws its parameters from an Optuna trial
            (samplers); ``False`` if it decides them itself and the runner records them.
        one_shot: a deterministic baseline: one episode is the whole search.
    """

    name: str = ""
    directions: tuple[str, ...] = ("maximize",)
    uses_trial: bool = True
    one_shot: bool = False

    def __init__(self, seed: int = 0, **options) -> None:
        self.seed = seed
        self.options = options

    def sampler(self, env: LayerSparsityEnv, n_existing: int) -> optuna.samplers.BaseSampler:
        """The Optuna sampler the study is opened with (a plain random one by default).

        ``n_existing`` trials are already in the study: seeds are offset by it, so a resumed
        search does not replay the random draws of its first run.
        """
        return optuna.samplers.RandomSampler(seed=self.seed + n_existing)

    def setup(self, env: LayerSparsityEnv, study: optuna.Study, episodes: int) -> None:
        """Called once before the first episode of this run (fresh or resumed)."""

    @abstractmethod
    def episode(self, env: LayerSparsityEnv, trial: optuna.Trial | None) -> Episode:
        """Play one episode; ``trial`` is given when :attr:`uses_trial` is set."""

    def values(self, episode: Episode) -> list[float]:
        """The objective value(s) to record: the reward by default."""
        return [episode.reward]

    def save(self, directory: Path, pending: dict | None = None) -> None:
        """Persist state kept outside the study, after every episode.

        ``pending`` is the record of the episode just played, about to be added to the study;
        it is saved in the same atomic write, so a kill between the two loses nothing (the
        runner adds it on resume if the study lacks it).
        """

    def load(self, directory: Path) -> dict | None:
        """Restore what :meth:`save` wrote, on resume; returns the pending record, if any."""
        return None


SEARCHERS: Registry[type[Searcher]] = Registry("searcher")
