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
from optuna.distributions import BaseDistribution

from autoprune.common.registry import Registry
from autoprune.envs import EpisodeOutcome, LayerSparsityEnv, Stop


@dataclass(frozen=True)
class Episode:
    """One finished episode: what was asked, and what the env made of it.

    Attributes:
        requested: per-unit sparsity the searcher asked for (before the wall).
        outcome: the env's record of the policy it played (achieved widths, score, costs, reward).
        rule: the one-shot rule this episode played, if it played one (the portfolio).
        agent: what an RL agent learned from it (losses, exploration), if it learned.
    """

    requested: np.ndarray
    outcome: EpisodeOutcome
    rule: str | None = None
    agent: dict | None = None

    @property
    def reward(self) -> float:
        return self.outcome.reward


def param_name(unit: str) -> str:
    """The Optuna parameter of a unit's sparsity."""
    return f"s/{unit}"


def run_policy(env: LayerSparsityEnv, requested: Sequence[float], seed: int | None = None,
               stop: Stop | None = None) -> Episode:
    """Play one episode with a whole requested policy, through the env's steps (and its wall)."""
    env.reset(seed=seed, options={"stop": stop})
    info: dict = {}
    for t in range(env.n_units):
        _, _, done, _, info = env.step(env.sparsity_to_action(requested[t]))
    assert done
    return Episode(np.asarray(requested, dtype=np.float64), info["outcome"])


class PlaybackSampler(optuna.samplers.BaseSampler):
    """The sampler of a study whose searcher decides its own policies (an RL agent, a rule): it
    hands Optuna back the sparsities the searcher asked for, so that every searcher's episode is
    recorded through the same ask/tell path, with the same parameters."""

    def __init__(self) -> None:
        self.plan: dict[str, float] = {}

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict:
        return {}

    def sample_independent(self, study, trial, param_name: str, param_distribution) -> float:
        return self.plan[param_name]


class Searcher(ABC):
    """Chooses the policy of each episode.

    The study runner calls :meth:`setup` once, then, for every episode, asks the study for a
    trial, calls :meth:`episode` with it and :meth:`record_params`, saves the searcher's state
    (:meth:`save`) and tells the study the episode's values: one path for every searcher.
    Searchers that keep state outside the study (RL agents) implement :meth:`save` and
    :meth:`load`, called after every episode and on resume.

    Attributes:
        name: the registry name.
        directions: the study's objective directions (one per recorded value).
        uses_trial: ``True`` if :meth:`episode` draws its parameters from the Optuna trial
            (samplers); ``False`` if it decides them itself, and :meth:`record_params` puts them
            in the trial afterwards.
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
        """The Optuna sampler the study is opened with: by default one that plays back what
        :meth:`episode` decided (:class:`PlaybackSampler`).

        ``n_existing`` trials are already in the study: samplers offset their seeds by it, so a
        resumed search does not replay the random draws of its first run.
        """
        self._playback = PlaybackSampler()
        return self._playback

    def record_params(self, env: LayerSparsityEnv, trial: optuna.Trial, episode: Episode) -> None:
        """Put the episode's requested sparsities into ``trial`` as its parameters ``s/<unit>``
        (each clipped to its unit's range). Samplers drew them from the trial already: nothing to do."""
        if self.uses_trial:
            return
        names = [param_name(u.name) for u in env.table.units]
        low, high = env.space.low, env.space.high
        self._playback.plan = {n: float(min(max(r, lo), hi))
                               for n, r, lo, hi in zip(names, episode.requested, low, high)}
        for n, lo, hi in zip(names, low, high):
            trial.suggest_float(n, float(lo), float(hi))

    def setup(self, env: LayerSparsityEnv, study: optuna.Study, episodes: int) -> None:
        """Called once before the first episode of this run (fresh or resumed)."""

    @abstractmethod
    def episode(self, env: LayerSparsityEnv, trial: optuna.Trial, stop: Stop | None = None) -> Episode:
        """Play one episode as ``trial``; a sampler draws its parameters from it. ``stop``, if
        given, may end the episode's scoring early (``--early-stop``; samplers only)."""

    def values(self, episode: Episode) -> list[float]:
        """The objective value(s) to record: the reward by default."""
        return [episode.reward]

    def save(self, directory: Path, pending: dict | None = None) -> None:
        """Persist state kept outside the study, after every episode.

        ``pending`` says how to finish the episode's trial, which is about to be told: its
        ``trial`` number and ``values``. It is saved in the same atomic write, so a kill between
        the two loses nothing (on resume the runner tells the trial if the study has not).
        """

    def load(self, directory: Path) -> dict | None:
        """Restore what :meth:`save` wrote, on resume; returns the pending record, if any."""
        return None


SEARCHERS: Registry[type[Searcher]] = Registry("searcher")
