"""Optuna samplers as searchers: each trial's parameters are the per-unit sparsities.

The parameters ``s/<unit>`` are requested sparsities in [min_sparsity, max_sparsity]; they pass
through the env's action wall like any agent's actions, so every trial meets the budget. The
one-shot rules of the portfolio (:func:`~autoprune.agents.baselines.portfolio`) are enqueued as
the first trials (each trial records its ``rule``), so every sampler starts from the rules it must
beat and a search never ends below the best of them. Under a latency budget the rules are the
first measured episodes, by which the wall corrects and sizes its aim; each rule's knob is
bisected to the wall's aim and its policy filled into the slack left below it. After the last of
them the best rule is played again, bisected to the aim the measurements left (it may have moved)
and to a little below it, each filled, so the search starts from the best of the rule at the aim it
searches at. (CMA-ES's own start, ``x0`` and ``sigma0``, is deprecated since Optuna 4.9, so it is
not set: CMA-ES starts from the rules as every sampler.)
"""

from __future__ import annotations

import dataclasses
import warnings

import optuna
from optuna.trial import TrialState

from autoprune.agents.base import SEARCHERS, Episode, Searcher, param_name, run_policy
from autoprune.envs import LayerSparsityEnv, Stop


class SamplerSearcher(Searcher):
    """A searcher whose policies come from an Optuna sampler."""

    uses_trial = True

    def make_sampler(self, env: LayerSparsityEnv, seed: int) -> optuna.samplers.BaseSampler:
        raise NotImplementedError

    def sampler(self, env: LayerSparsityEnv, n_existing: int) -> optuna.samplers.BaseSampler:
        with warnings.catch_warnings():  # GP's and QMC's options are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return self.make_sampler(env, self.seed + n_existing)

    def setup(self, env: LayerSparsityEnv, study: optuna.Study, episodes: int) -> None:
        self.episodes = episodes
        if not study.trials:
            from autoprune.agents.baselines import portfolio

            units, leaders = env.table.units, env.space.leaders
            for rule, policy in portfolio(env)[:episodes]:  # a short search plays the first rules only
                study.enqueue_trial({param_name(units[u].name): float(policy[u]) for u in leaders},
                                    user_attrs={"rule": rule})

    def episode(self, env: LayerSparsityEnv, trial: optuna.Trial, stop: Stop | None = None) -> Episode:
        space, units = env.space, env.table.units
        asked = {u: trial.suggest_float(param_name(units[u].name), space.low[u], space.high[u])
                 for u in space.leaders}  # units that share a sparsity take their leader's
        with env.aimed_by(trial.user_attrs.get("scale")):  # a rule played again at its own measured ratio
            episode = run_policy(env, [asked[space.leader[u]] for u in range(len(units))], stop=stop)
        rule = trial.user_attrs.get("rule")  # an enqueued rule of the portfolio
        room = getattr(self, "episodes", 0) - len(trial.study.trials)
        if rule is None:
            if "replay_of" not in trial.user_attrs:
                _replay_best_own(env, trial, episode, room)
            return episode
        if not trial.user_attrs.get("replay") and room > 0:
            _replay_best_rule(env, trial, episode, room)  # where the search has episodes left for them
        return dataclasses.replace(episode, rule=rule)


def _replay_best_rule(env: LayerSparsityEnv, trial: optuna.Trial, episode: Episode, room: int) -> None:
    """After the portfolio's last rule (``trial``, just played as ``episode``), enqueue the rules
    to play again, each with the wall aimed by its own measured ratio (``scale``)
    (:func:`~autoprune.agents.baselines.best_rule_replays`), at most ``room`` episodes."""
    from autoprune.agents.baselines import best_rule_replays

    study = trial.study
    if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return  # more rules to play
    if any(t.user_attrs.get("replay") for t in study.get_trials(deepcopy=False)):
        return  # played once already (another worker's, or a run before a resume)
    units = env.table.units
    for rule, fraction, policy, scale in best_rule_replays(env, study, trial.user_attrs["rule"], episode, room):
        study.enqueue_trial({param_name(units[u].name): float(policy[u]) for u in env.space.leaders},
                            user_attrs={"rule": rule, "replay": True, "aim": fraction, "scale": scale})


def _replay_best_own(env: LayerSparsityEnv, trial: optuna.Trial, episode: Episode, room: int) -> None:
    """Enqueue the sampler's own ``episode`` (``trial``'s) to play again, its parameters as they
    were, with the wall aimed by its own measured ratio, where it is the best of the sampler's own
    so far and that ratio would play it otherwise
    (:func:`~autoprune.agents.baselines.best_own_replay`)."""
    from autoprune.agents.baselines import best_own_replay

    scale = best_own_replay(env, trial.study, episode, room)
    if scale is not None:
        trial.study.enqueue_trial(dict(trial.params), user_attrs={"replay_of": trial.number, "scale": scale})


def _startup(env: LayerSparsityEnv) -> int:
    return min(10, max(4, env.n_units // 3))


@SEARCHERS.register("tpe", help="Optuna TPE, multivariate (the default searcher)")
class TPE(SamplerSearcher):
    name = "tpe"

    def make_sampler(self, env, seed):
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=_startup(env))


@SEARCHERS.register("cmaes", help="Optuna CMA-ES (the cmaes package)")
class CMAES(SamplerSearcher):
    name = "cmaes"

    def make_sampler(self, env, seed):
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=1,
                                            warn_independent_sampling=False)


@SEARCHERS.register("gp", help="Optuna Gaussian-process Bayesian optimisation")
class GP(SamplerSearcher):
    name = "gp"

    def make_sampler(self, env, seed):
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=_startup(env),
                                         deterministic_objective=True, warn_independent_sampling=False)


@SEARCHERS.register("qmc", help="Optuna quasi-Monte Carlo (scrambled Sobol)")
class QMC(SamplerSearcher):
    name = "qmc"

    def make_sampler(self, env, seed):
        return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=self.seed,
                                          warn_independent_sampling=False,
                                          warn_asynchronous_seeding=False)


@SEARCHERS.register("random", help="Optuna random search over per-unit sparsities")
class RandomSearch(SamplerSearcher):
    name = "random"

    def make_sampler(self, env, seed):
        return optuna.samplers.RandomSampler(seed=seed)


@SEARCHERS.register("nsga2", help="NSGA-II on two objectives (proxy accuracy up, cost down)")
class NSGA2(SamplerSearcher):
    name = "nsga2"
    directions = ("maximize", "minimize")

    def make_sampler(self, env, seed):
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, min(50, env.n_units)))

    def values(self, episode: Episode) -> list[float]:
        return [episode.outcome.accuracy, episode.outcome.cost]
