from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pytest

import autoprune.envs  # noqa: F401  (registers the env)
from autoprune.cost.budget import parse_budget
from autoprune.envs import ENV_ID, LayerSparsityEnv
from autoprune.envs.rewards import REWARDS, Outcome
from autoprune.errors import AutopruneError


def rollout(env, actions=None, seed=0):
    obs, info = env.reset(seed=seed)
    env.action_space.seed(seed)
    infos, t = [], 0
    while True:
        a = env.action_space.sample() if actions is None else actions[t]
        obs, reward, terminated, truncated, info = env.step(a)
        infos.append(info)
        t += 1
        if terminated or truncated:
            return reward, infos


def test_gymnasium_and_sb3_env_checkers_pass(tiny_task):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make(ENV_ID, task=tiny_task, budget="0.5flops")
    check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(LayerSparsityEnv(tiny_task, budget="0.5flops"), warn=True)


@pytest.mark.slow
def test_make_builds_the_task_from_kwargs():
    env = gym.make(ENV_ID, model="resnet20", dataset="digits", budget="2xflops",
                   search_val_size=50, calib_batches=1, progress=False)
    assert env.unwrapped.n_units == len(env.unwrapped.table.units) > 0
    assert env.unwrapped.budget.ratio == 0.5


@pytest.mark.parametrize("text,metric,ratio", [
    ("0.5flops", "flops", 0.5), ("0.3params", "params", 0.3), ("0.7latency", "latency", 0.7),
    ("2xflops", "flops", 0.5), ("50%flops", "flops", 0.5), ("4xparams", "params", 0.25),
    (" 0.25FLOPS ", "flops", 0.25), ("0.5macs", "flops", 0.5), (".5flops", "flops", 0.5),
])
def test_budget_strings(text, metric, ratio):
    b = parse_budget(text)
    assert (b.metric, b.ratio) == (metric, pytest.approx(ratio))


@pytest.mark.parametrize("text", ["flops", "0.5", "half flops", "1.5flops", "0flops", "0.5watts",
                                  "1xflops", "0.5xflops", "150%params", "-0.5flops", ""])
def test_bad_budget_strings_list_the_accepted_forms(text):
    with pytest.raises(AutopruneError, match="2xflops"):
        parse_budget(text)


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["0.5flops", "0.3params", "0.6flops"])
def test_action_wall_keeps_100_random_episodes_within_budget(tiny_task, budget):
    env = LayerSparsityEnv(tiny_task, budget=budget)
    b = parse_budget(budget)
    for ep in range(100 if budget == "0.5flops" else 30):
        _, infos = rollout(env, seed=ep)
        last = infos[-1]
        assert last["ratios"][b.metric] <= b.ratio + 1e-9
        assert last["within_budget"]
        # the state and info carry the achieved sparsity, consistent with the kept width
        for step in infos:
            u = tiny_task.table.units[step["step"]]
            assert step["sparsity"] == pytest.approx(1 - step["kept"] / u.size)
            assert step["sparsity"] >= step["requested"] - 1e-9 or not step["clipped"]
        counted = tiny_task.counted_costs(tiny_task.prune(last["widths"]))
        assert counted.flops / tiny_task.dense_costs.flops == pytest.approx(last["ratios"]["flops"], rel=1e-6)


def test_wall_clips_only_when_needed(tiny_task):
    env = LayerSparsityEnv(tiny_task, budget="0.5flops")
    # asking for no pruning at all: the wall must push later units to reach the budget
    _, infos = rollout(env, actions=[np.array([-1.0], np.float32)] * env.n_units)
    assert any(i["clipped"] for i in infos)
    assert infos[-1]["ratios"]["flops"] <= 0.5 + 1e-9
    # asking for maximum pruning everywhere is always allowed
    _, infos = rollout(env, actions=[np.array([1.0], np.float32)] * env.n_units)
    assert not any(i["clipped"] for i in infos)


def test_previous_action_in_state_is_the_achieved_sparsity(tiny_task):
    env = LayerSparsityEnv(tiny_task, budget="0.5flops")
    env.reset(seed=0)
    obs, _, _, _, info = env.step(np.array([0.3], np.float32))
    assert obs[-1] == pytest.approx(info["sparsity"], abs=1e-6)


def test_infeasible_budget_is_refused_naming_the_lowest_reachable(tiny_task):
    with pytest.raises(AutopruneError, match=r"out of reach.*at least 0\.\d+flops"):
        LayerSparsityEnv(tiny_task, budget="0.01flops", max_sparsity=0.5)


def test_latency_budget_needs_channel_granularity(digits, trained_tiny):
    from autoprune.task import PruningTask, TaskConfig

    task = PruningTask(TaskConfig(model="tiny", granularity="unstructured"), splits=digits,
                       dense=trained_tiny)
    with pytest.raises(AutopruneError, match="channel granularity"):
        LayerSparsityEnv(task, budget="0.7latency")


def _auto_task(digits, trained_tiny):
    from autoprune.task import PruningTask, TaskConfig

    return PruningTask(TaskConfig(model="tiny", dataset="digits", round_to="auto"), splits=digits,
                       dense=trained_tiny)


def tiny_task_of(task, **settings):
    from autoprune.task import PruningTask

    return PruningTask(dataclasses.replace(task.config, **settings), splits=task.splits, dense=task.dense)


@pytest.mark.parametrize("budget", ["0.5flops", "0.6latency"])
def test_round_to_auto_plays_only_the_widths_the_runtime_rewards(digits, trained_tiny, staircase_latency, budget):
    from autoprune.agents.baselines import portfolio

    env = LayerSparsityEnv(_auto_task(digits, trained_tiny), budget=budget, max_sparsity=0.9,
                           latency_runtime="onnxruntime")
    # a FLOPs budget too reads its widths from the runtime's table (one table, measured once)
    assert staircase_latency["tables"] == ["onnxruntime"]
    assert env.config.width_grid.startswith("auto:") and env.task.table.levels is None
    levels = [{w for w, _ in lv} for lv in env.table.levels]
    assert levels[0] == {4, 8, 12, 16}
    rng = np.random.default_rng(0)
    requests = [rng.uniform(0.0, 0.9, env.n_units) for _ in range(6)]
    for request in requests + [policy for _, policy in portfolio(env)]:  # searched and every rule
        kept = env.feasible_policy(request)
        assert all(int(k) in lv for k, lv in zip(kept, levels)), (kept, levels)
        assert env.cost.ratio(kept) <= env.wall.aim + 1e-9
    # the same env settings give the same widths; an explicit multiple has none recorded
    again = LayerSparsityEnv(_auto_task(digits, trained_tiny), budget=budget, max_sparsity=0.9,
                             latency_runtime="onnxruntime")
    assert again.config.width_grid == env.config.width_grid
    plain = LayerSparsityEnv(tiny_task_of(env.task, round_to=1), budget=budget, max_sparsity=0.9,
                             latency_runtime="onnxruntime")
    assert plain.config.width_grid is None and plain.table.levels is None


def test_the_search_says_where_its_widths_meet_the_runtime_s_channel_block(digits, trained_tiny, tiny_task,
                                                                           staircase_latency, monkeypatch):
    from autoprune.cost.runtimes import OnnxRuntime

    def env(task, block):
        monkeypatch.setattr(OnnxRuntime, "channel_block", lambda self, device: block)
        return LayerSparsityEnv(task, budget="0.6latency", max_sparsity=0.9, latency_runtime="onnxruntime")

    auto = env(_auto_task(digits, trained_tiny), 8)
    assert all(w % 8 == 0 or w < 8 or w == unit.size
               for unit, lv in zip(auto.table.units, auto.table.levels) for w, _ in lv)
    assert "multiples of its channel block (8) or narrower than one block" in auto.width_note()
    assert "channel block" not in env(_auto_task(digits, trained_tiny), 1).width_note()
    # explicit multiples off the block are warned about, under a latency budget only
    note = env(tiny_task_of(tiny_task, round_to=4), 8).width_note()
    assert "multiples of 4" in note and "blocks of 8" in note and "--round-to auto" in note
    assert env(tiny_task_of(tiny_task, round_to=8), 8).width_note() is None
    assert env(tiny_task_of(tiny_task, round_to=4), 1).width_note() is None
    flops = LayerSparsityEnv(tiny_task_of(tiny_task, round_to=4), budget="0.6flops", max_sparsity=0.9,
                             latency_runtime="onnxruntime")
    assert flops.width_note() is None


def test_a_latency_budget_the_auto_widths_cannot_reach_is_refused(digits, trained_tiny, tiny_task,
                                                                  staircase_latency):
    plain = LayerSparsityEnv(tiny_task, budget="0.9latency", max_sparsity=0.9, latency_margin=0)
    auto = LayerSparsityEnv(_auto_task(digits, trained_tiny), budget="0.9latency", max_sparsity=0.9,
                            latency_margin=0)
    assert auto.wall.lowest > plain.wall.lowest  # a quarter of each unit at least, not one channel
    between = (auto.wall.lowest + plain.wall.lowest) / 2
    LayerSparsityEnv(tiny_task, budget=f"{between:.4f}latency", max_sparsity=0.9, latency_margin=0)
    with pytest.raises(AutopruneError, match="out of reach.*narrowest level"):
        LayerSparsityEnv(_auto_task(digits, trained_tiny), budget=f"{between:.4f}latency", max_sparsity=0.9,
                         latency_margin=0)


def test_several_budgets_are_all_met_by_every_policy_and_rule(tiny_task):
    from autoprune.agents.baselines import portfolio
    from autoprune.cost.budget import parse_budgets

    env = LayerSparsityEnv(tiny_task, budget="0.6flops,0.25params", max_sparsity=0.9)
    assert [str(b) for b in env.budgets] == ["0.6flops", "0.25params"] and str(env.budget) == "0.6flops"
    flops_only = LayerSparsityEnv(tiny_task, budget="0.6flops", max_sparsity=0.9)
    rng = np.random.default_rng(0)
    binding = set()
    for request in [rng.uniform(0.0, 0.9, env.n_units) for _ in range(10)] + [p for _, p in portfolio(env)]:
        ratios = tiny_task.cost_ratios(env.feasible_policy(request))
        assert ratios["flops"] <= 0.6 + 1e-9 and ratios["params"] <= 0.25 + 1e-9
        binding.add(tiny_task.cost_ratios(flops_only.feasible_policy(request))["params"] > 0.25)
    assert True in binding  # the params budget changed policies the FLOPs budget alone allowed
    ratios = env.finish(env.feasible_policy(np.full(env.n_units, 0.3)))
    assert ratios.within_budget and ratios.budget == "0.6flops,0.25params"
    # each budget is checked for reach; the one out of reach is named
    with pytest.raises(AutopruneError, match=r"budget 0.01params is out of reach"):
        LayerSparsityEnv(tiny_task, budget="0.6flops,0.01params", max_sparsity=0.5)
    with pytest.raises(AutopruneError, match="two budgets on params: 0.4params and 0.3params"):
        parse_budgets("0.4params,0.3params")
    with pytest.raises(AutopruneError, match="an empty entry"):
        parse_budgets("0.4params,")


def test_unknown_latency_runtime_is_refused_whatever_the_budget(tiny_task):
    with pytest.raises(AutopruneError, match="unknown latency runtime 'tvm'"):
        LayerSparsityEnv(tiny_task, budget="0.5flops", latency_runtime="tvm")


def test_episodes_are_deterministic_for_a_seed(tiny_task):
    env_a = LayerSparsityEnv(tiny_task, budget="0.5flops")
    env_b = gym.make(ENV_ID, task=tiny_task, budget="0.5flops")
    for seed in (0, 1):
        ra, ia = rollout(env_a, seed=seed)
        rb, ib = rollout(env_b, seed=seed)
        assert ra == rb and ia[-1]["policy"] == ib[-1]["policy"]
        oa, _ = env_a.reset(seed=seed)
        ob, _ = env_b.reset(seed=seed)
        assert np.array_equal(oa, ob)


def test_last_step_info_holds_policy_accuracy_costs_and_reward_parts(tiny_task):
    env = LayerSparsityEnv(tiny_task, budget="0.5flops", reward="acc-penalty")
    reward, infos = rollout(env)
    last = infos[-1]
    assert set(last["policy"]) == set(tiny_task.table.names)
    assert 0 <= last["accuracy"] <= 1
    assert set(last["ratios"]) >= {"flops", "params"}
    assert reward == pytest.approx(last["reward_parts"]["accuracy"] - last["reward_parts"]["penalty"]
                                   - last["reward_parts"]["thrift"])
    assert all(i.get("reward") is None for i in infos[:-1])


def test_reward_functions_on_known_cases():
    o = Outcome(accuracy=0.9, cost_ratio=0.6, budget=0.5, flops=np.e ** 10)
    assert REWARDS.get("acc")(o, 1.0)[0] == pytest.approx(-0.1)
    assert REWARDS.get("acc-log-flops")(o, 1.0)[0] == pytest.approx(-0.1 * 10)
    value, parts = REWARDS.get("acc-penalty")(o, 2.0)
    assert parts["penalty"] == pytest.approx(2.0 * 0.2)
    assert value == pytest.approx(0.9 - 0.4 - 0.006)
    within = Outcome(accuracy=0.9, cost_ratio=0.4, budget=0.5, flops=1.0)
    assert REWARDS.get("acc-penalty")(within, 2.0)[1]["penalty"] == 0.0


def test_latency_budget_wall_uses_the_measured_table(tiny_task, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path))
    env = LayerSparsityEnv(tiny_task, budget="0.9latency", max_sparsity=0.9, latency_batch=32)
    cached = list((tmp_path / "latency").glob("*.json"))  # measured once, cached on disk
    assert len(cached) == 1 and '"runtime": "eager"' in cached[0].read_text()  # the default runtime
    assert env.config.latency_runtime == env.cost.runtime == "eager"
    reward, infos = rollout(env, seed=3)
    last = infos[-1]
    assert last["ratios"]["latency_predicted"] <= 0.9 + 1e-9
    assert last["ratios"]["latency"] > 0  # measured, reported (not asserted: tests never time)
    again = LayerSparsityEnv(tiny_task, budget="0.9latency", max_sparsity=0.9, latency_batch=32)
    assert again.cost.coef == env.table_cost.coef  # reloaded from the cache, not re-measured


def test_a_latency_wall_aims_below_the_budget_by_the_tables_stated_error(tiny_task, fake_latency, monkeypatch):
    from autoprune.cost import latency

    # one stage, so one table coefficient: the fake table (MACs) fits the fake ratios (params)
    # loosely then (a coefficient per stage fits them to 0.5 %)
    monkeypatch.setattr(latency, "stages", lambda table, cells, least=0.05: np.zeros(len(table.layers), int))
    env = LayerSparsityEnv(tiny_task, budget="0.7latency", max_sparsity=0.9)
    plain = LayerSparsityEnv(tiny_task, budget="0.7latency", max_sparsity=0.9, latency_margin=0)
    error = env.cost.fit_error[1]
    assert error > 0.05 and env.cost.margin() == error
    assert env.config.latency_margin == pytest.approx(error) and env.wall.aim == pytest.approx(0.7 / (1 + error))
    assert plain.config.latency_margin == 0 and plain.wall.aim == 0.7
    # asking for no pruning: each wall cuts as little as its aim allows
    aimed, at_budget = (e.cost.ratio(e.feasible_policy(np.zeros(e.n_units))) for e in (env, plain))
    assert aimed <= env.wall.aim < at_budget <= 0.7 + 1e-9
    _, infos = rollout(env, actions=[np.array([-1.0], np.float32)] * env.n_units)
    last = infos[-1]
    assert last["ratios"]["latency_predicted"] == pytest.approx(aimed)
    assert last["latency"]["margin"] == env.config.latency_margin and last["latency"]["pairs"] >= 30
    # FLOPs are exact: no margin, whatever is asked
    assert LayerSparsityEnv(tiny_task, budget="0.5flops", latency_margin=0.2).wall.aim == 0.5


def test_a_margin_that_would_leave_the_budget_out_of_reach_shrinks(tiny_task, fake_latency):
    from autoprune.envs.wall import aim

    assert aim(0.5, 0.25, 0.1) == 0.4 and aim(0.5, 0.25, 0.45) == 0.45 and aim(0.5, 0.25, 0.6) == 0.5
    lowest = LayerSparsityEnv(tiny_task, budget="0.7latency", max_sparsity=0.9).wall.lowest
    env = LayerSparsityEnv(tiny_task, budget=f"{1.2 * lowest:.6f}latency", max_sparsity=0.9, latency_margin=0.5)
    assert env.wall.aim == pytest.approx(lowest)
    assert env.config.latency_margin == pytest.approx(env.budget.ratio / lowest - 1) and env.config.latency_margin < 0.5
    with pytest.raises(AutopruneError, match="non-negative"):
        LayerSparsityEnv(tiny_task, budget="0.7latency", max_sparsity=0.9, latency_margin=-0.01)


@pytest.mark.parametrize("first,then,remeasure,pairs,ratio,within", [
    (1.05, (0.98, 1.01), True, 90, 1.01, True),  # borderline: 60 more pairs, pooled with the first 30
    (0.99, None, True, 30, 0.99, True),  # under the budget: nothing could flip the verdict
    (1.10, (1.10, 1.12), True, 90, 1.10, False),  # far over, and so it stays
    (1.10, (0.99, 1.00), True, 90, 1.00, True),  # far over under a burst of load that has passed
    (1.05, None, False, 30, 1.05, False),  # re-measuring turned off
])
def test_a_latency_over_the_budget_is_measured_again_and_pooled(tiny_task, fake_latency, monkeypatch, first, then,
                                                               remeasure, pairs, ratio, within):
    from autoprune.cost import latency

    env = LayerSparsityEnv(tiny_task, budget="0.7latency", max_sparsity=0.9, latency_remeasure=remeasure,
                           latency_retry=False)
    sessions = []

    def time_pairs(run_base, run_other, device, n, warmup):  # per-pair ratios we choose, x the budget
        sessions.append(n)
        ratios = [first] * n if len(sessions) == 1 else [then[0]] * (n // 2) + [then[1]] * (n - n // 2)
        return [1.0] * n, [0.7 * r for r in ratios]

    monkeypatch.setattr(latency, "_time_pairs", time_pairs)
    _, infos = rollout(env, seed=0)
    last = infos[-1]
    assert sessions == ([30, 60] if pairs == 90 else [30])
    assert last["latency"]["pairs"] == pairs and last["ratios"]["latency"] == pytest.approx(0.7 * ratio)
    assert last["latency"].get("first") == (pytest.approx(0.7 * first) if pairs == 90 else None)
    assert last["within_budget"] is within


def _measured_as(env, factor):
    """Every policy ``env`` plays measures ``factor`` times what its table predicts; returns the
    measured ratios, in order."""
    measured = []

    def measure(model):
        measured.append(factor * env.cost.ratio(env._kept))
        return measured[-1], {"pairs": 30, "margin": env.wall.margin}

    env.measure_latency = measure
    return measured


@pytest.mark.parametrize("retry", [True, False])
def test_an_episode_that_measures_over_its_latency_budget_is_played_again_narrower(tiny_task, fake_latency, retry):
    env = LayerSparsityEnv(tiny_task, budget="0.7latency", max_sparsity=0.9, latency_margin=0.05,
                           latency_correct=False, latency_retry=retry)
    measured = _measured_as(env, 1.25)  # the table prices what this search plays 25 % cheap
    aim = env.wall.aim
    _, infos = rollout(env, actions=[np.array([-1.0])] * env.n_units)  # as little pruning as the wall allows
    last = infos[-1]
    if not retry:
        assert len(measured) == 1 and last["ratios"]["latency"] == measured[0] > 0.7 * 1.03
        assert not last["within_budget"] and "over" not in last["latency"]
        return
    over = last["latency"]["over"]
    assert len(measured) == 2 and over["latency"] == measured[0] > 0.7 * 1.03 and over["scale"] == pytest.approx(1.25)
    # played again aimed by its own ratio: narrower, under the aim as measured, within the budget
    assert last["ratios"]["latency"] == measured[1] <= 0.7 / 1.05 + 1e-9 and last["within_budget"]
    first, again = np.array(over["widths"]), np.array(last["widths"])
    assert (again <= first).all() and (again < first).any()
    assert over["latency_predicted"] == pytest.approx(env.cost.ratio(first))
    assert [i["requested"] for i in infos] == [0.0] * env.n_units  # what was asked is what was asked
    assert env.wall.aim == aim and env._latency_errors == pytest.approx([1.25, 1.25])  # both timings count


def test_the_dense_model_is_prepared_once_for_all_episodes(tiny_task, fake_latency):
    env = LayerSparsityEnv(tiny_task, budget="0.7latency", max_sparsity=0.9, latency_runtime="onnxruntime")
    fake_latency["prepared"].clear()  # the table's calibration prepared its own
    for seed in range(3):
        rollout(env, seed=seed)
    prepared = fake_latency["prepared"]
    assert sum(model is tiny_task.dense for _, model in prepared) == 1 and len(prepared) == 1 + 3
    assert {runtime for runtime, _ in prepared} == {"onnxruntime"}


def test_the_wall_aims_by_measured_over_predicted_latency_from_the_third_episode(tiny_task, fake_latency):
    from autoprune.envs.budget_check import within_budget
    from autoprune.envs.layer_sparsity import ADAPT_AFTER, scatter
    from autoprune.envs.wall import aim

    env = LayerSparsityEnv(tiny_task, budget="0.7latency", max_sparsity=0.9)
    fixed = LayerSparsityEnv(tiny_task, budget="0.7latency", max_sparsity=0.9, latency_correct=False)
    margin, start = env.cost.margin(), env.wall.aim
    for e in (env, fixed):
        e.observe_latency(0.5, 0.6)
        e.observe_latency(0.5, 0.55)
    assert env.wall.scale == 1.0 and env.wall.aim == start  # two episodes are not enough to go on
    for e in (env, fixed):
        e.observe_latency(0.5, 0.65)
    assert env.wall.scale == pytest.approx(1.2)  # the median of 1.2, 1.1 and 1.3
    # until the tenth episode the margin covers how far over the median they ran, too: 1.3 / 1.2
    # is 8 % over, and the 90th percentile of three is most of that
    early = scatter(np.array([1.2, 1.1, 1.3]))
    assert early == pytest.approx(0.8 * (1.3 / 1.2 - 1)) and early > margin
    assert env.wall.aim == pytest.approx(aim(0.7 / 1.2, early, env.wall.lowest)) and env.wall.aim < start
    assert fixed.wall.scale == 1.0 and fixed.wall.aim == start
    # what the wall lets through is within the budget's margin once scaled as measured, and an
    # episode as far over the median as the worst so far is within budget (3 % over at most)
    kept = env.feasible_policy(np.zeros(env.n_units))
    assert env.cost.ratio(kept) * 1.2 <= 0.7 / (1 + early) + 1e-9
    assert within_budget(env.cost.ratio(kept) * 1.3, env.budget)
    _, infos = rollout(env, seed=0)
    assert infos[-1]["latency"]["scale"] == pytest.approx(1.2)  # recorded with the episode
    # episodes that agree bring the margin back down to the one asked for, which it is from the
    # tenth on (latency_adapt off: the scatter then never moves it)
    for _ in range(ADAPT_AFTER - 1 - len(env._latency_errors)):  # the rollout's episode was one
        env.observe_latency(0.5, 0.6)
    assert len(env._latency_errors) == ADAPT_AFTER - 1 and env.wall.margin > margin
    env.observe_latency(0.5, 0.6)
    assert env.wall.scale == pytest.approx(1.2) and env.wall.margin == pytest.approx(margin)
    assert env.wall.aim == pytest.approx(aim(0.7 / 1.2, margin, env.wall.lowest))


def test_with_latency_adapt_the_margin_is_how_far_over_the_median_measured_latency_ran(tiny_task, fake_latency):
    from autoprune.envs.layer_sparsity import ADAPT_AFTER, MARGIN_FLOOR, scatter
    from autoprune.envs.wall import aim

    settings = dict(budget="0.7latency", max_sparsity=0.9, latency_margin=0.2)
    env = LayerSparsityEnv(tiny_task, latency_adapt=True, **settings)
    kept = LayerSparsityEnv(tiny_task, **settings)  # off by default
    errors = [1.10, 1.05, 1.12, 1.08, 1.06] * 2
    assert len(errors) == ADAPT_AFTER
    for i, e in enumerate(errors, start=1):
        for x in (env, kept):
            x.observe_latency(0.5, 0.5 * e)
        if i < ADAPT_AFTER:  # the margin asked for until there are enough episodes to size it
            assert env.wall.aim == pytest.approx(aim(0.7 / env.wall.scale, 0.2, env.wall.lowest))
    spread = scatter(np.array(errors))
    assert spread == pytest.approx(np.quantile(np.array(errors) / 1.08, 0.9) - 1)  # 9 in 10 ran within it
    assert MARGIN_FLOOR < spread < 0.2
    assert env.wall.scale == pytest.approx(1.08) and env.wall.margin == pytest.approx(spread)
    assert env.wall.aim == pytest.approx(0.7 / 1.08 / (1 + spread)) and env.wall.aim > kept.wall.aim
    assert kept.wall.margin == pytest.approx(0.2)
    # measurements that scatter more than the margin asked for never widen it; none narrow it below the floor
    env.replay_latency((0.5, 0.5 * e) for e in [0.5, 2.0] * 5)
    assert env.wall.margin == pytest.approx(0.2)
    env.replay_latency((0.5, 0.55) for _ in range(ADAPT_AFTER))
    assert env.wall.margin == pytest.approx(MARGIN_FLOOR) and env.wall.scale == pytest.approx(1.1)
    # a replay starts from the margin asked for, as a new run would
    env.replay_latency([])
    assert env.wall.margin == pytest.approx(0.2) and env.wall.scale == 1.0


def test_with_latency_refit_the_wall_prices_by_the_table_fitted_again_on_every_episode(tiny_task, fake_latency):
    from autoprune.envs.wall import aim

    # (an episode over the budget is not played again here: the rollout's coefficients are the point)
    env = LayerSparsityEnv(tiny_task, budget="0.7latency", max_sparsity=0.9, latency_refit=True, latency_retry=False)
    table = env.cost
    assert len(table.calibration["measured"]) >= len(table.coef)
    cut = env.feasible_policy(np.full(env.n_units, 0.5))
    table_says = table.ratio(cut)
    # this kind of policy measures 20 % under the table, over and over: a median scale would
    # move every price by that; the refit moves this policy's price towards what it measured
    episodes, prices = [], [table_says]
    for _ in range(24):
        episodes.append((env.cost.ratio(cut), 0.8 * table_says, cut))
        env.observe_latency(*episodes[-1])
        assert env.wall.cost is env.cost and env.wall.lowest == env.cost.ratio(env.wall.floor)
        prices.append(env.cost.ratio(cut))
    assert env.wall.scale == 1.0  # the coefficients carry the correction
    # each episode moves the price on, the more of them the nearer what they measured (the
    # calibration's 16 policies weigh as much as 16 episodes)
    assert all(a > b for a, b in zip(prices, prices[1:])) and prices[-1] > 0.8 * table_says
    assert prices[-1] - 0.8 * table_says < 0.5 * (table_says - 0.8 * table_says)
    refit = table.refit([cut] * 24, [0.8 * table_says] * 24)
    assert env.cost.coef == pytest.approx(refit.coef)
    assert env.cost.coef != table.coef and env.cost.luts is table.luts  # the cells are the table's
    assert env.wall.aim == pytest.approx(aim(0.7, env.wall.margin, env.wall.lowest))
    # the episode records the coefficients it was priced with
    _, infos = rollout(env, seed=0)
    assert infos[-1]["latency"]["coef"] == pytest.approx(list(refit.coef))
    episodes.append((infos[-1]["ratios"]["latency_predicted"], infos[-1]["ratios"]["latency"], infos[-1]["widths"]))
    # a resumed search refits once on what its study recorded, and prices as the first run did
    again = LayerSparsityEnv(tiny_task, budget="0.7latency", max_sparsity=0.9, latency_refit=True)
    again.replay_latency(episodes)
    assert again.cost.coef == pytest.approx(env.cost.coef) and again.wall.aim == pytest.approx(env.wall.aim)
    again.replay_latency([])  # and starts from the table where there is nothing to replay
    assert again.cost.coef == table.coef and again.wall.cost is again.cost
    with pytest.raises(ValueError, match="widths"):
        again.observe_latency(0.5, 0.6)
    # without it (the default), the median of measured over predicted scales the table
    scaled = LayerSparsityEnv(tiny_task, budget="0.7latency", max_sparsity=0.9)
    scaled.replay_latency([(table_says, 0.8 * table_says, cut)] * 4)
    assert scaled.cost.coef == table.coef and scaled.wall.scale == pytest.approx(0.8)


@pytest.mark.parametrize("share", [(), ("stage",)])
def test_under_a_latency_budget_every_episode_is_widened_into_the_slack_the_wall_left(
        digits, trained_tiny, tiny_task, staircase_latency, share):
    from autoprune.task import PruningTask

    auto = PruningTask(dataclasses.replace(tiny_task.config, round_to="auto"), splits=digits, dense=trained_tiny)
    settings = dict(budget="0.7latency", max_sparsity=0.9, latency_correct=False, share=share)
    env, plain = LayerSparsityEnv(auto, **settings), LayerSparsityEnv(auto, latency_fill=False, **settings)
    table, leader, widened = env.table, env.space.leader, 0
    for seed in range(4):
        # asking for the most sparsity everywhere leaves most of the budget unspent
        actions = [np.array([1.0 if seed == 0 else -1.0 + 0.6 * seed], np.float32)] * env.n_units
        _, infos = rollout(env, actions=actions)
        _, bare = rollout(plain, actions=actions)
        played, left = np.array(infos[-1]["widths"]), np.array(bare[-1]["widths"])
        assert env.wall.meets(played) and np.all(played >= left)  # as predicted: the fake's timings are not the table's
        widened += int(np.any(played > left))
        for u in set(leader.tolist()):  # no unit (with those that share it) can take its next width
            wider = [k for k, _ in table.levels[u] if k > played[u]]
            if wider:
                trial = played.copy()
                group = leader == u
                trial[group] = [table.kept(v, table.achieved(u, min(wider))) for v in np.flatnonzero(group)]
                assert not env.wall.meets(trial), table.units[u].name
    assert widened > 0


def test_widths_scored_before_are_not_scored_or_timed_again_until_the_env_forgets(tiny_task, fake_latency,
                                                                                   monkeypatch):
    env = LayerSparsityEnv(tiny_task, budget="0.7latency", max_sparsity=0.9)
    scored = []
    evaluate = env.task.evaluate
    monkeypatch.setattr(env.task, "evaluate", lambda kept, stop=None: scored.append(1) or evaluate(kept, stop))
    actions = [np.array([0.3], np.float32)] * env.n_units
    _, first = rollout(env, actions=actions)
    timings = len(fake_latency["ratios"])
    _, again = rollout(env, actions=actions)
    a, b = first[-1]["outcome"], again[-1]["outcome"]
    assert b.repeat and not a.repeat and len(scored) == 1 and len(fake_latency["ratios"]) == timings
    assert (b.widths, b.accuracy, b.reward, b.ratios, b.within_budget) == (a.widths, a.accuracy, a.reward,
                                                                           a.ratios, a.within_budget)
    # the trial says so; a first play says nothing
    from autoprune.agents.base import Episode
    from autoprune.studies.records import EpisodeRecord

    attrs = [EpisodeRecord.of(Episode(np.zeros(env.n_units), o), "tpe", 1, "uid", 0.0).to_attrs() for o in (a, b)]
    assert "repeat" not in attrs[0] and attrs[1]["repeat"] is True
    assert EpisodeRecord.from_attrs(attrs[1]).repeat
    _, other = rollout(env, actions=[np.array([0.9], np.float32)] * env.n_units)  # other widths: scored
    assert not other[-1]["outcome"].repeat and len(scored) == 2
    env.forget_scores()
    _, fresh = rollout(env, actions=actions)
    assert not fresh[-1]["outcome"].repeat and len(scored) == 3 and len(fake_latency["ratios"]) > timings
