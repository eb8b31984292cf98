"""The knapsack rule: meets its budget by the budget's own cost model, and spends the budget
better than random allocations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from optuna.trial import TrialState

from autoprune.agents import SEARCHERS
from autoprune.agents.base import run_policy
from autoprune.agents.baselines import LATENCY_PORTFOLIO, knapsack_policy, portfolio
from autoprune.envs import LayerSparsityEnv


@pytest.mark.parametrize("budget", ["0.5flops", "0.3flops", "0.35params"])
def test_the_knapsack_meets_its_budget_and_beats_random_allocations(tiny_task, budget):
    env = LayerSparsityEnv(tiny_task, budget=budget)
    episode = SEARCHERS.get("knapsack")().episode(env, None)
    outcome = episode.outcome
    assert outcome.within_budget and outcome.cost <= env.budget.ratio + 1e-9
    assert outcome.cost >= env.budget.ratio - 0.1, "it cut far more than the budget asks"
    rng = np.random.default_rng(0)
    random = [run_policy(env, rng.uniform(0.0, 0.8, env.n_units)).outcome for _ in range(8)]
    assert all(o.within_budget for o in random)
    assert outcome.accuracy > np.mean([o.accuracy for o in random])


def test_a_latency_search_opens_with_the_knapsack_priced_by_the_latency_table(tiny_task, fake_latency):
    env = LayerSparsityEnv(tiny_task, budget="0.5latency", latency_runtime="eager")
    rules = portfolio(env)
    assert [name for name, _ in rules][0] == "knapsack" and LATENCY_PORTFOLIO[0] == "knapsack"
    sparsity = knapsack_policy(env)
    kept = env.table.kept_all(sparsity)
    assert env.cost.ratio(kept) <= 0.5 + 1e-9  # the table's prediction meets the budget
    flops_env = LayerSparsityEnv(tiny_task, budget="0.5flops")
    assert "knapsack" not in [name for name, _ in portfolio(flops_env)]


def test_a_search_over_masks_opens_with_the_knapsack(digits, trained_tiny):
    from autoprune.task import PruningTask, TaskConfig

    task = PruningTask(TaskConfig(model="tiny", dataset="digits", granularity="nm"), splits=digits, dense=trained_tiny)
    env = LayerSparsityEnv(task, budget="0.4flops", max_sparsity=0.9)
    rules = portfolio(env)
    assert rules[0][0] == "knapsack"
    outcome = run_policy(env, rules[0][1]).outcome
    assert outcome.within_budget and set(outcome.patterns.values()) <= {"dense", "6:8", "2:4", "1:4", "1:8"}


def test_under_a_latency_budget_every_rule_is_widened_into_the_slack_its_bisection_left(
        digits, trained_tiny, tiny_task, staircase_latency):
    from dataclasses import replace

    from autoprune.agents.baselines import filled, to_aim
    from autoprune.task import PruningTask

    auto = PruningTask(replace(tiny_task.config, round_to="auto"), splits=digits, dense=trained_tiny)
    # the aim stays put (no correction by measured episodes), so every rule is checked against one aim
    env = LayerSparsityEnv(auto, budget="0.7latency", max_sparsity=0.9, latency_runtime="onnxruntime",
                           latency_correct=False)
    table, widened = env.table, 0
    for name in LATENCY_PORTFOLIO:
        plain = env.feasible_policy(SEARCHERS.get(name)().policy(env, to_aim(env)))
        played = np.asarray(SEARCHERS.get(name)().episode(env, None).outcome.widths)
        assert env.wall.meets(played) and np.all(played >= plain)
        widened += int(np.any(played > plain))
        for u in range(env.n_units):  # no unit can take its next width and still meet the aim
            wider = [k for k, _ in table.levels[u] if k > played[u]]
            if wider:
                trial = played.copy()
                trial[u] = min(wider)
                assert not env.wall.meets(trial), (name, table.units[u].name)
    assert widened > 0  # the coarse widths left some rule short of its budget
    flops = LayerSparsityEnv(tiny_task, budget="0.5flops")
    request = np.full(flops.n_units, 0.4)
    assert filled(flops, request) is request  # a FLOPs budget's rules are met exactly: left alone


def test_under_a_latency_margin_every_rule_is_bisected_to_the_wall_s_aim_not_cut_to_it(
        digits, trained_tiny, tiny_task, staircase_latency):
    from dataclasses import replace

    from autoprune.agents.baselines import filled, to_aim
    from autoprune.task import PruningTask

    auto = PruningTask(replace(tiny_task.config, round_to="auto"), splits=digits, dense=trained_tiny)
    env = LayerSparsityEnv(auto, budget="0.7latency", max_sparsity=0.9, latency_runtime="onnxruntime",
                           latency_margin=0.1, latency_correct=False)
    assert to_aim(env) == pytest.approx(1 / 1.1) and to_aim(LayerSparsityEnv(tiny_task, budget="0.5flops")) == 1.0
    space = env.space

    def as_asked(request):  # the widths a request keeps with no unit cut by the wall
        return env.table.kept_all(np.clip(request, space.low, space.high)[space.leader])

    cut = 0
    for name, played in portfolio(env):
        rule = SEARCHERS.get(name)()
        at_aim = rule.policy(env, to_aim(env))
        assert np.array_equal(env.feasible_policy(at_aim), as_asked(at_aim))  # the wall lets it through
        assert np.array_equal(played, filled(env, at_aim, rule.space(env)))  # and the portfolio plays it filled
        assert env.wall.meets(env.feasible_policy(played))
        at_budget = rule.policy(env)
        cut += int(not np.array_equal(env.feasible_policy(at_budget), as_asked(at_budget)))
    assert cut > 0  # bisected to the budget, some rule lands over the aim and the wall cuts it


def test_a_rule_bisected_below_the_aim_is_filled_back_up_to_it_each_policy_once(
        digits, trained_tiny, tiny_task, staircase_latency):
    from dataclasses import replace

    from autoprune.agents.baselines import RULE_AIMS, at_aims, filled, to_aim
    from autoprune.task import PruningTask

    auto = PruningTask(replace(tiny_task.config, round_to="auto"), splits=digits, dense=trained_tiny)
    env = LayerSparsityEnv(auto, budget="0.7latency", max_sparsity=0.9, latency_runtime="onnxruntime",
                           latency_margin=0.1, latency_correct=False)
    table, space, more = env.table, env.space, 0
    for name in LATENCY_PORTFOLIO:
        rule = SEARCHERS.get(name)()
        at_aim = env.feasible_policy(filled(env, rule.policy(env, to_aim(env)), rule.space(env)))
        variants = at_aims(env, name, besides=[at_aim])
        fractions = [f for f, _ in variants]
        assert fractions == [f for f in RULE_AIMS if f in fractions] and 1.0 not in fractions  # 1.0: played
        widths = [at_aim] + [env.feasible_policy(p) for _, p in variants]
        assert len({tuple(k) for k in widths}) == len(widths)  # each policy once
        for fraction, kept in zip(fractions, widths[1:]):
            assert env.wall.meets(kept)  # filled up to the aim, not past it
            for lead, group in space.groups.items():  # and no group can take its next width
                wider = [k for k, _ in table.levels[lead] if k > kept[lead]]
                if wider:
                    trial = kept.copy()
                    trial[group] = [table.kept(u, table.achieved(lead, min(wider))) for u in group]
                    assert not env.wall.meets(trial), (name, fraction, table.units[lead].name)
        more += len(variants)
    assert more > 0  # for some rule the knob stopped lower ends on other widths
    assert at_aims(LayerSparsityEnv(tiny_task, budget="0.5flops"), "uniform") == []  # nothing to fill


def _priced(tiny_task, factors, margin=0.5, retry=False):
    """A latency env whose wall keeps its first aim (no median scale) and whose ``i``-th measured
    episode measures ``factors(i)`` times what the table predicts; an episode over the budget is
    played again only with ``retry`` (the rules' own replays are what these tests are about)."""
    env = LayerSparsityEnv(tiny_task, budget="0.7latency", max_sparsity=0.9, latency_margin=margin,
                           latency_correct=False, latency_retry=retry)
    calls = []

    def measure(model):
        calls.append(1)
        return factors(len(calls)) * env.cost.ratio(env._kept), {"pairs": 30, "margin": env.wall.margin}

    env.measure_latency = measure
    return env


def _dear(tiny_task):
    """A latency env whose table prices every policy 10 % dearer than it measures."""
    return _priced(tiny_task, lambda i: 0.9)


@pytest.mark.parametrize("searcher", ["tpe", "ddpg"])
def test_a_latency_search_plays_rules_again_aimed_by_their_own_measured_ratio(
        tiny_task, fake_latency, tmp_path, searcher):
    from autoprune.agents.base import param_name
    from autoprune.agents.baselines import RULE_AIMS, filled, to_aim
    from autoprune.studies.runner import SearchConfig, run_search

    env = _dear(tiny_task)
    n_rules = len(portfolio(env))
    study = run_search(env, SearchConfig(searcher=searcher, episodes=n_rules + len(RULE_AIMS) + 2, progress=False,
                                         storage=f"sqlite:///{tmp_path}/s.db")).study
    trials = study.trials
    rules = trials[:n_rules]
    assert all("rule" in t.user_attrs and not t.user_attrs.get("replay") for t in rules)
    first = {t.user_attrs["rule"]: t for t in rules}
    best = max(rules, key=lambda t: t.user_attrs["reward"])
    replays = [t for t in trials if t.user_attrs.get("replay")]
    assert replays and trials[n_rules:n_rules + len(replays)] == replays  # straight after the rules
    # the best rule first, at the aim and a little below it; then other rules, once each
    mine = [t for t in replays if t.user_attrs["rule"] == best.user_attrs["rule"]]
    assert replays[:len(mine)] == mine
    aims = [t.user_attrs["aim"] for t in mine]
    assert aims[0] == 1.0 and aims == [f for f in RULE_AIMS if f in aims]
    others = [t.user_attrs["rule"] for t in replays[len(mine):]]
    assert others and len(set(others)) == len(others)
    assert all(t.user_attrs["aim"] == 1.0 for t in replays[len(mine):])
    for t in replays:  # each aimed by its rule's first play: measured over predicted, 0.9 here
        own = first[t.user_attrs["rule"]].user_attrs["ratios"]
        assert t.user_attrs["scale"] == pytest.approx(own["latency"] / own["latency_predicted"])
        assert t.user_attrs["latency"]["scale"] == pytest.approx(0.9)
        assert 0.9 * t.user_attrs["ratios"]["latency_predicted"] <= 0.7 / 1.5 + 1e-9
    # the best rule bisected to its own aim and filled, wider than its first play
    with env.aimed_by(0.9):
        rule = SEARCHERS.get(best.user_attrs["rule"])()
        expected = filled(env, rule.policy(env, to_aim(env)), rule.space(env))
    names = [param_name(env.table.units[u].name) for u in env.space.leaders]
    assert [mine[0].params[n] for n in names] == pytest.approx([expected[u] for u in env.space.leaders], abs=1e-5)
    assert mine[0].user_attrs["ratios"]["latency_predicted"] > best.user_attrs["ratios"]["latency_predicted"]
    widths = [tuple(t.user_attrs["widths"]) for t in replays]
    assert len(set(widths)) == len(widths) and not set(widths) & {tuple(t.user_attrs["widths"]) for t in rules}
    assert all("rule" not in t.user_attrs for t in trials[n_rules + len(replays):])  # then the searcher's own
    # a table that prices every rule as it measures leaves nothing to play again
    exact = _priced(tiny_task, lambda i: 1.0)
    again = run_search(exact, SearchConfig(searcher=searcher, episodes=n_rules + 2, progress=False,
                                           storage=f"sqlite:///{tmp_path}/t.db")).study
    assert not [t for t in again.trials if t.user_attrs.get("replay")]


@pytest.mark.parametrize("searcher", ["tpe", "ddpg"])
def test_a_rule_priced_dear_is_filled_and_a_rule_over_the_budget_cut_each_by_its_own_ratio(
        tiny_task, fake_latency, tmp_path, searcher):
    from autoprune.studies.runner import SearchConfig, run_search

    # the second episode measures 0.8 of its price, the third 1.2 (over the budget), the rest as priced
    env = _priced(tiny_task, lambda i: {2: 0.8, 3: 1.2}.get(i, 1.0), margin=0.0)
    rules = portfolio(env)
    study = run_search(env, SearchConfig(searcher=searcher, episodes=len(rules) + 8, progress=False,
                                         storage=f"sqlite:///{tmp_path}/s.db")).study
    trials = study.trials
    dear, over = trials[1], trials[2]
    assert over.user_attrs["ratios"]["latency"] > 0.7 * 1.03 and not over.user_attrs["within_budget"]
    replays = [t for t in trials if t.user_attrs.get("replay")]
    assert {t.user_attrs["rule"] for t in replays} == {dear.user_attrs["rule"], over.user_attrs["rule"]}
    for first, scale in ((dear, 0.8), (over, 1.2)):
        again = [t for t in replays if t.user_attrs["rule"] == first.user_attrs["rule"]]
        assert again[0].user_attrs["aim"] == 1.0
        assert all(t.user_attrs["scale"] == pytest.approx(scale) for t in again)
        assert all(t.user_attrs["latency"]["scale"] == pytest.approx(scale) for t in again)  # how the wall aimed
        assert all(scale * t.user_attrs["ratios"]["latency_predicted"] <= 0.7 + 1e-9 for t in again)
    # filled into the room its own ratio left, or cut back under the budget (measured as priced now)
    dear_again = next(t for t in replays if t.user_attrs["rule"] == dear.user_attrs["rule"])
    over_again = next(t for t in replays if t.user_attrs["rule"] == over.user_attrs["rule"])
    assert dear_again.user_attrs["ratios"]["latency_predicted"] > dear.user_attrs["ratios"]["latency_predicted"]
    assert over_again.user_attrs["ratios"]["latency_predicted"] < over.user_attrs["ratios"]["latency_predicted"]
    assert over_again.user_attrs["within_budget"]
    # the episodes after them are aimed as before
    later = [t for t in trials if t.number > replays[-1].number]
    assert later and all(t.user_attrs["latency"]["scale"] == 1.0 for t in later)
    assert env.wall.scale == 1.0 and env.wall.aim == pytest.approx(0.7)


@pytest.mark.parametrize("searcher", ["tpe", "ddpg"])
def test_every_episode_of_a_search_priced_cheap_is_within_its_budget_and_a_resume_aims_by_both_plays(
        tiny_task, fake_latency, tmp_path, searcher):
    from autoprune.studies.runner import SearchConfig, run_search, timed

    env = _priced(tiny_task, lambda i: 1.25, margin=0.05, retry=True)  # every policy 25 % over its price
    config = SearchConfig(searcher=searcher, episodes=len(portfolio(env)) + 3, progress=False,
                          storage=f"sqlite:///{tmp_path}/s.db")
    trials = run_search(env, config).study.trials
    assert all(t.state == TrialState.COMPLETE and t.user_attrs["within_budget"] for t in trials)
    overs = [t.user_attrs["latency"]["over"] for t in trials if "over" in t.user_attrs["latency"]]
    assert overs and all(o["latency"] > 0.7 * 1.03 and o["scale"] == pytest.approx(1.25) for o in overs)
    # a resumed study aims by every timing its trials hold, a first play over the budget included
    attrs = [t.user_attrs for t in trials]
    assert len(list(timed(attrs))) == len(trials) + len(overs)
    errors = list(env._latency_errors)
    env.replay_latency(timed(attrs))
    assert env._latency_errors == pytest.approx(errors) and len(errors) == len(trials) + len(overs)


def test_the_best_rule_is_played_again_by_its_own_ratio_where_the_room_it_leaves_is_under_the_tolerance(
        tiny_task, fake_latency, tmp_path):
    from autoprune.agents.baselines import RULE_AIMS, own_scale
    from autoprune.studies.runner import SearchConfig, run_search

    # every episode measures 0.5 % under its price: within the tolerance, no rule ran over
    env = _priced(tiny_task, lambda i: 0.995, margin=0.0)
    n_rules = len(portfolio(env))
    study = run_search(env, SearchConfig(searcher="tpe", episodes=n_rules + len(RULE_AIMS) + 1, progress=False,
                                         storage=f"sqlite:///{tmp_path}/s.db")).study
    rules = study.trials[:n_rules]
    best = max(rules, key=lambda t: t.user_attrs["reward"])
    room = {t.user_attrs["rule"]: own_scale(env, t.user_attrs["widths"], t.user_attrs["ratios"]["latency"])
            for t in rules}  # where a rule other than the best is played again
    assert room[best.user_attrs["rule"]] is None, room  # the best leaves less room than the tolerance
    replays = [t for t in study.trials if t.user_attrs.get("replay")]
    assert replays and replays[0].user_attrs["rule"] == best.user_attrs["rule"]  # yet it is played again
    assert {t.user_attrs["rule"] for t in replays} <= {best.user_attrs["rule"]} | {r for r in room if room[r]}
    assert all(t.user_attrs["scale"] == pytest.approx(0.995) for t in replays)
    widths = {tuple(t.user_attrs["widths"]) for t in replays}
    assert len(widths) == len(replays) and tuple(best.user_attrs["widths"]) not in widths


def test_the_stage_knapsack_is_widened_a_stage_at_a_time_before_a_conv_at_a_time(digits, staircase_latency):
    from autoprune.agents.baselines import filled, rule_policy, stage_space, to_aim
    from autoprune.model.zoo import ModelSpec, build_model
    from autoprune.task import PruningTask, TaskConfig

    torch.manual_seed(0)  # where widths go does not need a trained model
    dense = build_model("resnet20", ModelSpec(10, 1, 8))
    task = PruningTask(TaskConfig(model="resnet20", dataset="digits", reconstruct="none", round_to="auto"),
                       splits=digits, dense=dense, progress=False)
    rule, spread = SEARCHERS.get("knapsack-stage")(), []

    def widths_per_stage(kept, stages):  # how many widths each stage's inner convs end at
        return sum(len({int(kept[u]) for u in group}) for group in stages.groups.values() if len(group) > 1)

    for budget in ("0.5latency", "0.6latency", "0.7latency"):
        env = LayerSparsityEnv(task, budget=budget, latency_runtime="onnxruntime", latency_margin=0.0,
                               latency_correct=False)
        stages = stage_space(env)
        assert rule.space(env).groups == stages.groups
        for fraction in (1.0, 0.94, 0.88):  # bisected below the aim, as a search plays the best rule again
            request = rule.policy(env, fraction * to_aim(env))
            by_stage = env.feasible_policy(filled(env, request, stages))
            by_conv = env.feasible_policy(filled(env, request))
            assert env.wall.meets(by_stage) and env.wall.meets(by_conv)
            assert np.array_equal(by_stage, env.feasible_policy(rule_policy(env, rule, fraction)))  # as played
            whole = env.wall.fill(env.feasible_policy(request), stages.groups)  # whole stages alone
            assert np.all(by_stage >= whole)
            spread.append((widths_per_stage(by_stage, stages), widths_per_stage(by_conv, stages),
                           not np.array_equal(whole, env.feasible_policy(request))))
    assert all(s <= c for s, c, _ in spread) and any(s < c and stepped for s, c, stepped in spread), spread


def test_a_wall_aimed_by_one_policy_s_ratio_aims_again_by_every_episode_after_it(tiny_task, fake_latency):
    env = LayerSparsityEnv(tiny_task, budget="0.7latency", max_sparsity=0.9)
    for measured in (0.6, 0.55, 0.65):
        env.observe_latency(0.5, measured)
    scale, margin, aim = env.wall.scale, env.wall.margin, env.wall.aim
    with env.aimed_by(0.8):
        assert env.wall.scale == 0.8 and env.wall.aim == pytest.approx(0.7 / 0.8 / (1 + env.wall.asked))
    assert (env.wall.scale, env.wall.margin, env.wall.aim) == (scale, margin, aim)
    with env.aimed_by(None):
        assert env.wall.aim == aim
    with env.aimed_by(0.8):
        env.observe_latency(0.5, 0.7)  # an episode played inside counts for the aim after it
    assert env.wall.scale == pytest.approx(float(np.median([1.2, 1.1, 1.3, 1.4])))


def test_an_rl_search_stopped_among_its_replays_plays_the_rest_of_them_when_resumed(
        tiny_task, fake_latency, tmp_path, monkeypatch):
    from autoprune.agents.baselines import RULE_AIMS
    from autoprune.errors import AutopruneError
    from autoprune.studies.runner import SearchConfig, run_search

    def search(env, **kw):
        return run_search(env, SearchConfig(searcher="ddpg", episodes=n_rules + len(RULE_AIMS) + 1, progress=False,
                                            storage=f"sqlite:///{tmp_path}/{kw.pop('db')}.db", **kw)).study

    env = _dear(tiny_task)
    n_rules = len(portfolio(env))
    whole = [(t.user_attrs["aim"], t.params) for t in search(env, db="whole").trials if t.user_attrs.get("replay")]
    assert len(whole) >= 2

    env = _dear(tiny_task)
    real_finish, calls = env.finish, []

    def finish(kept, stop=None):  # the second replay fails: the run stops there
        calls.append(1)
        if len(calls) == n_rules + 2:
            raise AutopruneError("stopped here")
        return real_finish(kept, stop)

    monkeypatch.setattr(env, "finish", finish)
    with pytest.raises(AutopruneError, match="stopped here"):
        search(env, db="cut")
    monkeypatch.setattr(env, "finish", real_finish)
    resumed = search(env, db="cut", resume=True).get_trials(states=(TrialState.COMPLETE,))
    played = [(t.user_attrs["aim"], t.params) for t in resumed if t.user_attrs.get("replay")]
    # the replays the agent saved, each once, none lost (as requested: the resumed wall's aim is
    # the measurements' own, without the test's move, so it may keep other widths)
    assert [a for a, _ in played] == [a for a, _ in whole]
    for (_, got), (_, want) in zip(played, whole):
        assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("searcher", ["tpe", "ddpg"])
def test_a_searcher_s_best_own_episode_is_played_again_aimed_by_its_own_measured_ratio(
        tiny_task, fake_latency, tmp_path, searcher):
    from autoprune.studies.runner import SearchConfig, run_search

    env = _priced(tiny_task, lambda i: 1.0)
    n_rules = len(portfolio(env))
    # the rules measure as priced, the searcher's own episodes at 0.8 of their price
    env = _priced(tiny_task, lambda i: 1.0 if i <= n_rules else 0.8)
    study = run_search(env, SearchConfig(searcher=searcher, episodes=n_rules + 8, progress=False,
                                         storage=f"sqlite:///{tmp_path}/s.db")).study
    trials = study.trials
    assert not [t for t in trials if t.user_attrs.get("replay")]  # no rule is played again
    again = [t for t in trials if "replay_of" in t.user_attrs]
    assert again
    for t in again:
        first = trials[t.user_attrs["replay_of"]]
        assert t.number == first.number + 1  # played next
        assert "rule" not in first.user_attrs and "replay_of" not in first.user_attrs  # the searcher's own
        own_before = [o.user_attrs["reward"] for o in trials[:first.number]
                      if "rule" not in o.user_attrs]
        assert all(first.user_attrs["reward"] > r for r in own_before)  # its best so far
        assert t.params == pytest.approx(first.params, abs=1e-6)  # what it asked for, as it was
        ratios = first.user_attrs["ratios"]
        assert t.user_attrs["scale"] == pytest.approx(ratios["latency"] / ratios["latency_predicted"])
        assert t.user_attrs["scale"] == pytest.approx(0.8)
        assert t.user_attrs["latency"]["scale"] == pytest.approx(0.8)  # how the wall aimed
        # filled into the room its own ratio left: wider, and still within the budget
        assert t.user_attrs["ratios"]["latency_predicted"] > ratios["latency_predicted"]
        assert t.user_attrs["widths"] != first.user_attrs["widths"]
        assert 0.8 * t.user_attrs["ratios"]["latency_predicted"] <= 0.7 + 1e-9 and t.user_attrs["within_budget"]
    # an episode measured as priced leaves nothing to play again
    exact = _priced(tiny_task, lambda i: 1.0)
    same = run_search(exact, SearchConfig(searcher=searcher, episodes=n_rules + 4, progress=False,
                                          storage=f"sqlite:///{tmp_path}/t.db")).study
    assert not [t for t in same.trials if "replay_of" in t.user_attrs]


def test_the_stage_knapsack_keeps_the_residual_stream_whole_and_each_stage_s_inner_convs_at_one_width(digits):
    from autoprune.agents.baselines import PORTFOLIO
    from autoprune.task import PruningTask, TaskConfig

    task = PruningTask(TaskConfig(model="resnet20", dataset="digits", reconstruct="none"), splits=digits,
                       progress=False)
    env = LayerSparsityEnv(task, budget="0.5flops")
    outcome = SEARCHERS.get("knapsack-stage")().episode(env, None).outcome
    widths, names = np.asarray(outcome.widths), env.table.names
    assert outcome.within_budget and outcome.cost >= 0.5 - 0.05
    coupled = env.table.coupled()
    assert np.array_equal(widths[coupled], env.table.sizes()[coupled])  # the residual stream whole
    inner = {}
    for name, width, c in zip(names, widths, coupled):
        if not c:
            inner.setdefault(name.split(".")[0], set()).add(int(width))
    assert sorted(inner) == ["layer1", "layer2", "layer3"] and all(len(w) == 1 for w in inner.values()), inner
    assert any(w < {"layer1": 16, "layer2": 32, "layer3": 64}[s] for s, (w,) in inner.items())
    # where the search is over the stage space already, it is the knapsack
    staged = LayerSparsityEnv(task, budget="0.5flops", ranges=("coupled=0",), share=("stage",))
    assert np.allclose(SEARCHERS.get("knapsack-stage")().policy(staged), knapsack_policy(staged))
    assert "knapsack-stage" in PORTFOLIO and "knapsack-stage" in [n for n, _ in portfolio(env)]
