"""Searchers against random search on a synthetic objective whose optimum is known.

Optuna tests its samplers this way: on a cheap function with a known optimum, a sampler must beat
random search at equal trials. Here the function is of the allocation alone: ``score`` reads the
widths of the physically slimmed model it is handed and returns ``1 - sum_u (kept_u - target_u)^2``
(``kept_u``: unit u's kept fraction of its channels), so the score is 1 exactly at
:data:`TARGET`, a per-unit allocation that meets the budget and prunes early layers hard and late
layers little. The one-shot rules allocate by layer shape or weight magnitude, so they land far
from it. The search sees only the score: units, budget, action wall and records are the real
ones, the weights do not matter, and an episode costs milliseconds (no reconstruction, no
BatchNorm recalibration, an 8x8 input).

The rules are every search's first trials, so "best >= best rule" holds by construction; what is
checked here is that the search finds a policy the rules miss, by a margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from optuna.trial import FrozenTrial, TrialState
from torch import nn

import autoprune
from autoprune.studies.records import EpisodeRecord

WIDTH = 16  # channels of every conv of the dense chain
TARGET = (4, 5, 6, 8, 10, 12, 14, 16)  # the optimum's kept channels, unit by unit: 38% of the FLOPs
BUDGET = 0.5
SEEDS = (0, 1, 2)
EPISODES = 50
LATE = 20  # the last episodes, where a searcher that learned plays near the optimum
SEARCHERS = ("random", "tpe", "ddpg")
# AMC's DDPG as a user gets it for 50 episodes (warm-up min(100, 50 // 4)), written out so that a
# change of the defaults shows here as a change of the setting, not as a different test.
OPTIONS = {"ddpg": {"warmup": 12, "sigma": 0.5, "sigma_decay": 0.95}}


class Chain(nn.Module):
    """Convolutions in a row, no residual: each conv's outputs are one unit of their own."""

    def __init__(self, widths: tuple[int, ...] = (WIDTH,) * len(TARGET)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for w in widths:
            layers += [nn.Conv2d(channels, w, 3, padding=1, bias=False), nn.ReLU()]
            channels = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def conv_widths(model: nn.Module) -> np.ndarray:
    return np.array([m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)])


def score(model: nn.Module) -> float:
    """1 at :data:`TARGET`, lower the further the pruned model's widths are from it."""
    return float(1.0 - (((conv_widths(model) - np.array(TARGET)) / WIDTH) ** 2).sum())


def distance(widths) -> float:
    """Euclidean distance of kept fractions to the optimum's."""
    return float(np.linalg.norm((np.asarray(widths) - np.array(TARGET)) / WIDTH))


def macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass, counted by hooks (independent of the library)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output[0].numel() * k
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return total


def record(trial: FrozenTrial) -> EpisodeRecord:
    return EpisodeRecord.from_attrs(trial.user_attrs)


@dataclass(frozen=True)
class Search:
    """What one search left, read once: its best trial and every episode, in order."""

    best: EpisodeRecord
    episodes: list[EpisodeRecord]

    @property
    def rules(self) -> dict[str, EpisodeRecord]:
        return {ep.rule: ep for ep in self.episodes if ep.rule}


@pytest.fixture(scope="module")
def searches(tmp_path_factory) -> dict[str, list[Search]]:
    """Each searcher's search at each seed, on the same model: ``{searcher: [Search per seed]}``."""
    tmp = tmp_path_factory.mktemp("synthetic")
    threads = torch.get_num_threads()
    out: dict[str, list[Search]] = {}
    # One thread: on a busy 2-core machine, intra-op threads on DDPG's 300-unit layers cost ten
    # times the CPU they save. In-memory studies: a file storage syncs ~20 writes per trial to
    # disk, most of the run's time; what is searched does not depend on the storage.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Chain().eval()
        example, calib = torch.randn(1, 1, 8, 8), [torch.randn(8, 1, 8, 8)]
        torch.set_num_threads(1)
        try:
            for searcher in SEARCHERS:
                out[searcher] = []
                for seed in SEEDS:
                    result = autoprune.search(
                        model, example, f"{BUDGET}flops", score=score, calib=calib, searcher=searcher,
                        episodes=EPISODES, seed=seed, storage="sqlite:///:memory:", study_name=f"{searcher}-{seed}",
                        state_dir=str(tmp / f"{searcher}-{seed}"), searcher_options=OPTIONS.get(searcher),
                        progress=False, reconstruct="none", bn_recalibration=False, round_to=1, calib_batches=1,
                        calib_batch_size=8)
                    trials = sorted(result.study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.number)
                    out[searcher].append(Search(record(result.best), [record(t) for t in trials]))
        finally:
            torch.set_num_threads(threads)
    return out


def test_the_optimum_meets_the_budget_and_every_rule_is_far_from_it(searches):
    x = torch.randn(1, 1, 8, 8)
    optimum, dense = Chain(TARGET), Chain()
    assert score(optimum) == 1.0 and score(dense) < 1.0
    assert macs(optimum, x) <= BUDGET * macs(dense, x)  # the optimum is a policy the search may play
    for runs in searches.values():
        for run in runs:
            assert len(run.episodes) == EPISODES
            assert len(run.rules) >= 3  # uniform and uncoupled ask for one policy on a chain: played once
            for ep in run.episodes:  # each score is the recorded widths' (the slimmed model is what is scored)
                assert ep.accuracy == pytest.approx(1.0 - distance(ep.widths) ** 2, abs=1e-9)
                assert ep.ratios["flops"] <= BUDGET + 1e-9
            # every rule lands far from the optimum (measured: the best rule, lamp, scores 0.42 at
            # distance 0.76 from it)
            assert max(ep.accuracy for ep in run.rules.values()) < 0.6


# Mean over SEEDS of the best score after EPISODES episodes (1 is the optimum). Measured on this
# setup for seeds 0-19 (the margins are over all 1,140 triples of them):
#   random: mean 0.69 (per seed 0.52-0.82); tpe: 0.95 (0.81-1.00); ddpg: 0.94 (0.88-0.98);
#   tpe - random over 3 seeds: at least 0.129 (mean 0.267, sd 0.057);
#   ddpg - random: at least 0.126 (mean 0.256, sd 0.053).
# Seeds 0-2: random 0.824, 0.797, 0.629 (mean 0.750); tpe 0.977, 0.977, 0.938 (0.964);
#   ddpg 0.973, 0.906, 0.977 (0.952).
# Random search's best of 50 varies a lot, so this test alone is weak: random search posing as a
# searcher passes it against 16% of other seed triples. The next test is the sharp one.
@pytest.mark.parametrize("searcher", ["tpe", "ddpg"])
def test_searcher_beats_random_search_at_equal_episodes(searches, searcher):
    found = np.array([run.best.accuracy for run in searches[searcher]])
    random = np.array([run.best.accuracy for run in searches["random"]])
    assert found.mean() >= random.mean() + 0.08, (searcher, found, random)


# Mean score of the last LATE episodes: a searcher that learned plays near the optimum, random
# search keeps sampling everywhere. Measured, seeds 0-19: random -0.02 mean (per seed -0.19 to
# 0.13); tpe 0.88 (0.69-0.95); ddpg 0.82 (0.72-0.90). Searcher minus random over any 3 seeds at
# least 0.73 (tpe) and 0.68 (ddpg); random minus random over disjoint triples at most 0.28.
# Seeds 0-2: random -0.06, tpe 0.87, ddpg 0.84.
@pytest.mark.parametrize("searcher", ["tpe", "ddpg"])
def test_searcher_plays_near_the_optimum_once_it_has_learned(searches, searcher):
    def late(runs):
        return np.array([np.mean([ep.accuracy for ep in run.episodes[-LATE:]]) for run in runs])

    found, random = late(searches[searcher]), late(searches["random"])
    assert found.mean() >= random.mean() + 0.5, (searcher, found, random)
    assert found.min() >= 0.5, (searcher, found)


# Distances of the best policy's recorded widths to the optimum's, in kept fractions. Measured,
# seeds 0-19: random 0.56 mean, tpe 0.20, ddpg 0.24; random's minus the searcher's over any 3
# seeds at least 0.165 (tpe) and 0.173 (ddpg). The shape, sum of the last three units' widths
# minus the first three's: 27 at the optimum, at most 8 for a rule, at least 18 (tpe) and 20
# (ddpg) for the searched best at every seed (as little as 9 for random search).
@pytest.mark.parametrize("searcher", ["tpe", "ddpg"])
def test_searcher_ends_closer_to_the_optimum_than_random_search(searches, searcher):
    found = np.array([distance(run.best.widths) for run in searches[searcher]])
    random = np.array([distance(run.best.widths) for run in searches["random"]])
    assert found.mean() <= random.mean() - 0.1, (searcher, found, random)
    for run in searches[searcher]:  # the optimum's shape: the first units pruned harder than the last
        widths = np.array(run.best.widths)
        assert widths[-3:].sum() - widths[:3].sum() >= 12, widths


# The best trial's score above the best rule's. Measured, seeds 0-19: at least 0.39 (tpe), 0.46
# (ddpg) and 0.10 (random search); the best trial was a rule in none of the 60 searches.
@pytest.mark.parametrize("searcher, margin", [("tpe", 0.25), ("ddpg", 0.25), ("random", 0.05)])
def test_best_trial_is_a_searched_policy_above_the_best_rule(searches, searcher, margin):
    for run in searches[searcher]:
        best_rule = max(ep.accuracy for ep in run.rules.values())
        assert run.best.rule is None, f"{searcher}: the best trial is the {run.best.rule} rule"
        assert run.best.accuracy >= best_rule + margin, (searcher, run.best.accuracy, best_rule)
        assert run.best.within_budget and run.best.ratios["flops"] <= BUDGET + 1e-9


def test_every_rule_is_played_at_the_widths_it_computed():
    """A rule's bisection ends just past a rounding step; played through the env's float32 action
    it must keep the widths it computed, not round a unit up and have the wall cut the last ones
    (uniform on the chain once played [12, 12, 12, 12, 12, 12, 11, 3] for 11 everywhere)."""
    from autoprune.agents import SEARCHERS
    from autoprune.agents.base import run_policy
    from autoprune.agents.baselines import PORTFOLIO
    from autoprune.api import make_task
    from autoprune.envs import LayerSparsityEnv

    model = Chain().eval()
    task = make_task(model, torch.randn(1, 1, 8, 8), score, [torch.randn(8, 1, 8, 8)], progress=False,
                     reconstruct="none", bn_recalibration=False, round_to=1, calib_batches=1, calib_batch_size=8)
    for budget in ("0.5flops", "0.3flops", "0.6params"):
        env = LayerSparsityEnv(task, budget=budget)
        for name in PORTFOLIO:
            policy = SEARCHERS.get(name)().policy(env)
            computed = env.table.kept_all(np.clip(policy, env.space.low, env.space.high)[env.space.leader])
            played = run_policy(env, policy).outcome
            assert list(played.widths) == computed.tolist(), (budget, name)
            assert played.within_budget, (budget, name)
        uniform = run_policy(env, SEARCHERS.get("uniform")().policy(env)).outcome.widths
        assert len(set(uniform)) == 1, (budget, uniform)  # the same width everywhere, as the rule says
