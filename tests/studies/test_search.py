from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from optuna.trial import TrialState

from autoprune.agents import SEARCHERS
from autoprune.agents.baselines import portfolio, uncoupled_policy, uncoupled_units
from autoprune.envs import LayerSparsityEnv
from autoprune.errors import AutopruneError
from autoprune.studies.records import SearchSpec, StudyRecord, best_rule_trial
from autoprune.studies.runner import SearchConfig, run_search

FAST_RL = {"ddpg", "td3", "sac"}


def _run(env, tmp_path, searcher, episodes=6, **kw):
    options = {"warmup": 2} if searcher in FAST_RL else {}
    config = SearchConfig(searcher=searcher, episodes=episodes, storage=f"sqlite:///{tmp_path}/s.db",
                          progress=False, searcher_options=options, **kw)
    return run_search(env, config)


@pytest.mark.parametrize("searcher", SEARCHERS.names())
def test_every_searcher_records_episodes_that_meet_the_budget(tiny_task, tmp_path, searcher):
    env = LayerSparsityEnv(tiny_task, budget="0.5flops")
    result = _run(env, tmp_path, searcher)
    study = result.study
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    expected = 1 if SEARCHERS.get(searcher).one_shot else 6
    assert len(trials) == expected == result.new_trials
    for t in trials:
        a = t.user_attrs
        assert a["ratios"]["flops"] <= 0.5 + 1e-9 and a["within_budget"]
        assert set(a["policy"]) == set(tiny_task.table.names)
        assert set(t.params) == {f"s/{n}" for n in tiny_task.table.names}
        assert 0.0 <= a["accuracy"] <= 1.0 and a["searcher"] == searcher
    record = StudyRecord.of(study)  # the study's records read back, typed
    assert record.task == tiny_task.config and record.fingerprint == tiny_task.fingerprint()
    assert record.search.budget == "0.5flops" and record.search.searcher == searcher
    assert record.run.versions["torch"] and record.run.created
    assert study.user_attrs["task.model"] == "tiny" and study.user_attrs["search.searcher"] == searcher
    assert result.best is not None
    if searcher == "nsga2":
        assert len(study.directions) == 2
        assert trials[0].values[1] == trials[0].user_attrs["ratios"]["flops"]


@pytest.mark.parametrize("searcher", [n for n in SEARCHERS.names() if not SEARCHERS.get(n).one_shot])
def test_every_searcher_starts_from_the_portfolio_of_rules(tiny_task, tmp_path, searcher):
    env = LayerSparsityEnv(tiny_task, budget="0.5flops")
    rules = portfolio(env)
    assert [name for name, _ in rules][:2] == ["uncoupled", "uniform"] and len(rules) >= 4
    study = _run(env, tmp_path, searcher, episodes=len(rules) + 1).study
    trials = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    assert [t.user_attrs.get("rule") for t in trials] == [name for name, _ in rules] + [None]
    for t, (name, policy) in zip(trials, rules):  # each rule played as its baseline plays it
        (tmp_path / name).mkdir(exist_ok=True)
        one_shot = _run(env, tmp_path / name, name).study.trials[0]
        assert t.user_attrs["widths"] == one_shot.user_attrs["widths"], name
        assert t.user_attrs["ratios"]["flops"] <= 0.5 + 1e-9
        asked = [t.params[f"s/{u.name}"] for u in env.table.units]
        assert np.allclose(asked, np.clip(policy, env.config.min_sparsity, env.config.max_sparsity), atol=1e-5), name
    # the best rule is the rule trial with the highest reward (that a search beats it is checked on
    # an objective with a known optimum, in tests/agents/test_searchers.py)
    rule = best_rule_trial(study)
    assert rule.user_attrs["reward"] == max(t.user_attrs["reward"] for t in trials[:len(rules)])
    assert rule.user_attrs["rule"] in {name for name, _ in rules}


def test_uncoupled_rule_keeps_coupled_groups_whole_where_the_budget_allows(tiny_task):
    env = LayerSparsityEnv(tiny_task, budget="0.7flops")
    free = uncoupled_units(env)
    assert free.any() and not free.all()  # TinyNet: a residual group and single-conv units
    policy = uncoupled_policy(env)
    assert (policy[~free] == 0).all() and (policy[free] > 0).all()
    # a budget the single-conv units cannot meet alone, even at the most sparsity allowed
    reach = env.cost.ratio(env.table.kept_all(np.where(free, env.config.max_sparsity, 0.0)))
    tight = LayerSparsityEnv(tiny_task, budget=f"{0.9 * reach:.4f}flops")
    policy = uncoupled_policy(tight)
    at_most = tight.table.kept_all(np.full(tight.n_units, tight.config.max_sparsity))
    assert (policy[~free] > 0).all() and (tight.table.kept_all(policy)[free] == at_most[free]).all()


def test_baselines_differ_from_uniform_and_meet_budget(tiny_task, tmp_path):
    env = LayerSparsityEnv(tiny_task, budget="0.5flops")
    policies = {}
    for name in ("uniform", "uncoupled", "global", "erk", "lamp"):
        t = _run(env, tmp_path, name).study.trials[0]
        policies[name] = t.user_attrs["policy"]
        # the knob is tight: not far under the budget either
        assert 0.45 <= t.user_attrs["ratios"]["flops"] <= 0.5
    assert len({tuple(p.values()) for p in policies.values()}) == 5


def test_existing_study_needs_resume_and_the_same_task(tiny_task, tmp_path):
    env = LayerSparsityEnv(tiny_task, budget="0.5flops")
    _run(env, tmp_path, "random", episodes=3)
    with pytest.raises(AutopruneError, match="already exists.*resume=True"):
        _run(env, tmp_path, "random", episodes=5)
    result = _run(env, tmp_path, "random", episodes=5, resume=True)
    assert result.new_trials == 2 and len(result.study.trials) == 5
    other = LayerSparsityEnv(tiny_task, budget="0.4flops")
    with pytest.raises(AutopruneError, match="budget"):
        _run(other, tmp_path, "random", episodes=5, resume=True,
             study_name="tiny-digits-0.5flops-random")


def test_a_latency_study_records_its_runtime_and_resumes_only_with_it(tiny_task, tmp_path, fake_latency):
    env = LayerSparsityEnv(tiny_task, budget="0.9latency", max_sparsity=0.9, latency_runtime="onnxruntime")
    result = _run(env, tmp_path, "random", episodes=2)
    assert result.study.user_attrs["search.latency_runtime"] == "onnxruntime"
    assert StudyRecord.of(result.study).search.env.latency_runtime == "onnxruntime"
    assert all("latency" in t.user_attrs["ratios"] for t in result.study.trials)
    # the table and every episode's measured latency ran on onnxruntime
    assert set(fake_latency["tables"]) == set(fake_latency["ratios"]) == {"onnxruntime"}
    eager = LayerSparsityEnv(tiny_task, budget="0.9latency", max_sparsity=0.9)
    with pytest.raises(AutopruneError, match="made with latency_runtime='onnxruntime', this run has "
                                             "latency_runtime='eager'"):
        _run(eager, tmp_path, "random", episodes=3, resume=True, study_name=result.study.study_name)
    assert len(result.study.trials) == 2  # refused before any episode
    # a study made before the field existed measured eager latency, and reads so
    legacy = {k: v for k, v in result.study.user_attrs.items() if k != "search.latency_runtime"}
    assert SearchSpec.from_attrs(legacy).env.latency_runtime == "eager"


def test_an_auto_width_study_records_its_widths_and_resumes_only_with_them(digits, trained_tiny, tiny_task,
                                                                            tmp_path, staircase_latency):
    from autoprune.task import PruningTask

    auto = PruningTask(replace(tiny_task.config, round_to="auto"), splits=digits, dense=trained_tiny)
    env = LayerSparsityEnv(auto, budget="0.5flops", max_sparsity=0.9, latency_runtime="onnxruntime")
    result = _run(env, tmp_path, "tpe", episodes=8)
    grid = result.study.user_attrs["search.width_grid"]
    assert grid == env.config.width_grid and grid.startswith("auto:")
    assert StudyRecord.of(result.study).task.round_to == "auto"
    levels = [{w for w, _ in lv} for lv in env.table.levels]
    for t in result.study.get_trials(states=(TrialState.COMPLETE,)):  # the rules' episodes and TPE's
        assert all(w in lv for w, lv in zip(t.user_attrs["widths"], levels))
        assert t.user_attrs["ratios"]["flops"] <= 0.5 + 1e-9
        assert "patterns" not in t.user_attrs or not t.user_attrs["patterns"]
    # the same task resumes it; one with explicit multiples is refused before any episode
    again = LayerSparsityEnv(PruningTask(replace(tiny_task.config, round_to="auto"), splits=digits,
                                         dense=trained_tiny),
                             budget="0.5flops", max_sparsity=0.9, latency_runtime="onnxruntime")
    assert _run(again, tmp_path, "tpe", episodes=9, resume=True, study_name=result.study.study_name).new_trials == 1
    plain = LayerSparsityEnv(tiny_task, budget="0.5flops", max_sparsity=0.9, latency_runtime="onnxruntime")
    with pytest.raises(AutopruneError, match=f"made with width_grid='{grid}', this run has width_grid=None"):
        _run(plain, tmp_path, "tpe", episodes=10, resume=True, study_name=result.study.study_name)
    assert len(result.study.trials) == 9


def test_a_two_budget_study_meets_both_and_resumes_only_with_both(tiny_task, tmp_path, fake_latency):
    env = LayerSparsityEnv(tiny_task, budget="0.5flops,0.9latency", max_sparsity=0.9)
    assert str(env.budget) == "0.9latency"  # the wall aims by the predicted one, with its margin
    result = _run(env, tmp_path, "tpe", episodes=8)
    assert result.study.study_name.endswith("0.5flops+0.9latency-tpe")
    assert StudyRecord.of(result.study).search.budget == "0.5flops,0.9latency"
    trials = result.study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 8
    for t in trials:  # the rules' episodes and TPE's: FLOPs exactly, latency as measured
        ratios = t.user_attrs["ratios"]
        assert ratios["flops"] <= 0.5 + 1e-9 and ratios["latency"] <= 0.9 * 1.03
        assert t.user_attrs["within_budget"]
    for budget in ("0.5flops", "0.9latency", "0.5flops,0.8latency", "0.9latency,0.5flops"):
        other = LayerSparsityEnv(tiny_task, budget=budget, max_sparsity=0.9)
        with pytest.raises(AutopruneError, match=f"made with budget='0.5flops,0.9latency', this run has "
                                                 f"budget='{budget}'"):
            _run(other, tmp_path, "tpe", episodes=9, resume=True, study_name=result.study.study_name)
    assert len(result.study.trials) == 8  # refused before any episode


@pytest.mark.parametrize("refit", [True, False])
def test_a_resumed_latency_study_aims_by_its_episodes_measurements(tiny_task, tmp_path, fake_latency, refit):
    def made(trials) -> tuple[list, list, list]:
        """Each trial's widths, measured latency ratio, and measured over predicted."""
        ratios = [t.user_attrs["ratios"] for t in trials]
        return ([t.user_attrs["widths"] for t in trials], [r["latency"] for r in ratios],
                [r["latency"] / r["latency_predicted"] for r in ratios])

    def aimed(trial) -> float | list[float]:
        """How the wall priced and aimed ``trial``: the refit coefficients, or the scale."""
        return trial.user_attrs["latency"]["coef" if refit else "scale"]

    env = LayerSparsityEnv(tiny_task, budget="0.9latency", max_sparsity=0.9, latency_refit=refit)
    table = env.table_cost

    def expected(trials):  # what the episodes so far say: the table refit on them, or their median
        widths, measured, errors = made(trials)
        return pytest.approx(list(table.refit(widths, measured).coef) if refit else float(np.median(errors)))

    first = _run(env, tmp_path, "random", episodes=3)
    if refit:
        assert aimed(first.study.trials[0]) == pytest.approx(list(table.coef))
        assert aimed(first.study.trials[2]) == expected(first.study.trials[:2])
    else:
        assert [aimed(t) for t in first.study.trials] == [1.0, 1.0, 1.0]
    fresh = LayerSparsityEnv(tiny_task, budget="0.9latency", max_sparsity=0.9, latency_refit=refit)
    again = _run(fresh, tmp_path, "random", episodes=4, resume=True, study_name=first.study.study_name)
    # the fourth episode, in a new process, aimed as the first three measured
    assert aimed(again.study.trials[3]) == expected(again.study.trials[:3])
    # run again on the env that saw the first three: each episode counts once, not twice
    last = _run(env, tmp_path, "random", episodes=5, resume=True, study_name=first.study.study_name)
    assert aimed(last.study.trials[4]) == expected(last.study.trials[:4])


def test_a_latency_study_records_its_margin_and_one_made_before_margins_still_resumes(tiny_task, tmp_path,
                                                                                      fake_latency, caplog):
    import optuna

    env = LayerSparsityEnv(tiny_task, budget="0.9latency", max_sparsity=0.9)
    storage = f"sqlite:///{tmp_path}/s.db"
    new = run_search(env, SearchConfig(searcher="random", episodes=2, storage=storage, study_name="new"))
    said = caplog.text  # the library's notes go through logging
    assert said.count("note: latency budget 0.9latency: the action wall aims at") == 1  # once, at the start
    assert f"a margin of {env.config.latency_margin:.1%}" in said and env.config.latency_margin > 0
    spec = StudyRecord.of(new.study).search.env
    assert (spec.latency_margin, spec.latency_remeasure, spec.latency_correct, spec.latency_adapt,
            spec.latency_fill, spec.latency_refit, spec.latency_retry) == (
        pytest.approx(env.config.latency_margin), True, True, False, True, False, True)
    for t in new.study.trials:  # each episode: how its latency was measured, and aimed at
        assert t.user_attrs["latency"]["pairs"] in (30, 90)
        assert t.user_attrs["latency"]["margin"] == pytest.approx(env.config.latency_margin)
    # the same study as written before margins: no search.latency_margin/remeasure, no episode latency
    old = optuna.create_study(storage=storage, study_name="old", directions=new.study.directions)
    for key, value in new.study.user_attrs.items():
        if key not in ("search.latency_margin", "search.latency_remeasure", "search.latency_correct",
                       "search.latency_adapt", "search.latency_fill", "search.latency_refit",
                       "search.latency_retry"):
            old.set_user_attr(key, value)
    for t in new.study.trials:
        old.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions, values=t.values,
                                                user_attrs={k: v for k, v in t.user_attrs.items() if k != "latency"}))
    spec = StudyRecord.of(old).search.env  # it aimed at the budget, by the table, measured once, did not fill
    assert (spec.latency_margin, spec.latency_remeasure, spec.latency_correct, spec.latency_adapt,
            spec.latency_fill, spec.latency_refit, spec.latency_retry) == (0.0, False, False, False, False, False,
                                                                          False)
    resumed = _run(env, tmp_path, "random", episodes=4, study_name="old", resume=True)
    assert resumed.new_trials == 2 and len(resumed.study.trials) == 4 and resumed.best is not None
    assert ["latency" in t.user_attrs for t in resumed.study.trials] == [False, False, True, True]
    assert resumed.study.user_attrs["search.latency_margin"] == pytest.approx(env.config.latency_margin)


def test_rl_agent_checkpoint_restores_state(tiny_task, tmp_path):
    from autoprune.agents.rl import DDPGSearcher

    env = LayerSparsityEnv(tiny_task, budget="0.5flops")
    result = _run(env, tmp_path, "ddpg", episodes=5)
    saved = DDPGSearcher(seed=0, warmup=2)
    saved.setup(env, result.study, 5)
    fresh_actor = [p.detach().clone() for p in saved.model.actor.parameters()]
    pending = saved.load(result.state_dir)
    assert saved.episode_index == 5
    # the trained networks came back, and act as they did when saved
    import torch

    on_disk = torch.load(result.state_dir / "agent.pt", weights_only=True)["torch"]["policy"]
    for name, value in saved.model.policy.state_dict().items():
        assert torch.equal(value, on_disk[name])
    assert any(not torch.equal(a, b) for a, b in zip(fresh_actor, saved.model.actor.parameters()))
    # the last episode's trial, as the agent saved how to finish it (told since)
    assert (pending["trial"], pending["uid"]) == (result.study.trials[-1].number,
                                                  result.study.trials[-1].user_attrs["uid"])
    assert saved.model.replay_buffer.size() == 5 * env.n_units
    assert saved.model._n_updates > 0
    # each learning episode records what the agent learned from it; warm-up episodes do not
    agent = [t.user_attrs.get("agent") for t in result.study.trials]
    assert agent[:2] == [None, None]
    for a in agent[2:]:
        assert np.isfinite(a["critic_loss"]) and a["critic_loss"] >= 0 and np.isfinite(a["actor_loss"])
        assert a["sigma"] > 0 and np.isfinite(a["baseline"])
    assert agent[3]["sigma"] == pytest.approx(agent[2]["sigma"] * 0.95)  # AMC's decay per episode
    # and a report shows it: per-trial columns, and the learning curve in windows of episodes
    from autoprune.studies.report import learning_windows, summary_markdown, trials_frame

    frame = trials_frame(result.study)
    assert frame["agent_critic_loss"].isna().tolist() == [True, True, False, False, False]
    windows = learning_windows(result.study, 2)
    assert [w["episodes"] for w in windows] == ["1-2", "3-4", "5-5"]
    assert "critic_loss" not in windows[0] and windows[1]["critic_loss"] == pytest.approx(
        (agent[2]["critic_loss"] + agent[3]["critic_loss"]) / 2)
    scores = [t.user_attrs["accuracy"] for t in result.study.trials]
    assert [w["best_so_far"] for w in windows] == [max(scores[:2]), max(scores[:4]), max(scores)]
    assert windows[1]["policy_step"] > 0
    md = summary_markdown(result.study, result.best, [])
    assert "## Learning" in md and "| critic loss | actor loss | sigma | baseline |" in md


def _same(a, b) -> bool:
    """Equal nested state (state_dicts, optimiser states): tensors exactly, the rest by value."""
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("searcher", sorted(FAST_RL))
def test_rl_checkpoint_brings_back_every_network_optimiser_and_coefficient(tiny_task, tmp_path, searcher):
    """What get_parameters() returns (networks, optimiser states), SAC's entropy coefficient and
    the update count come back exactly into a fresh agent seeded differently."""
    import optuna

    env = LayerSparsityEnv(tiny_task, budget="0.5flops")
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("study_uid", "uid-1")
    agent = SEARCHERS.get(searcher)(seed=0, warmup=1)
    agent.setup(env, study, 3)
    for _ in range(3):
        agent.episode(env, None)
    agent.save(tmp_path)
    again = SEARCHERS.get(searcher)(seed=1, warmup=1)
    again.setup(env, study, 3)
    assert not _same(again.model.get_parameters()["policy"], agent.model.get_parameters()["policy"])
    assert again.load(tmp_path) is None
    assert _same(again.model.get_parameters(), agent.model.get_parameters())
    # Every bare tensor stable-baselines3's own save() keeps (read through its private list, here
    # only: if it moves, this test says so) is one the agent saves too.
    _, variables = agent.model._get_torch_save_params()
    assert set(variables) <= set(agent.tensors), f"{searcher}: add {variables} to its searcher's tensors"
    for name in variables:
        assert _same(getattr(again.model, name), getattr(agent.model, name)), name
    assert again.model._n_updates == agent.model._n_updates > 0
    assert again.episode_index == 3


def test_unreachable_and_bad_storage(tiny_task, tmp_path):
    from autoprune.studies.storage import open_storage

    with pytest.raises(AutopruneError, match="cannot open storage postgresql://u:\\*\\*\\*@"):
        open_storage("postgresql://u:secret@127.0.0.1:9/nodb")
    with pytest.raises(AutopruneError, match="cannot read storage"):
        open_storage("autoprune.db")
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(AutopruneError, match="not a readable SQLite database"):
        open_storage(f"sqlite:///{tmp_path}/junk.db")
    with pytest.raises(AutopruneError, match="does not exist"):
        open_storage(f"sqlite:///{tmp_path}/no/such/dir/x.db")


def test_a_study_made_again_under_an_old_name_starts_a_fresh_agent(tiny_task, tmp_path):
    env = LayerSparsityEnv(tiny_task, budget="0.5flops")
    first = _run(env, tmp_path, "ddpg", episodes=3)
    (tmp_path / "s.db").unlink()  # the study is gone; its agent's folder is not
    again = _run(env, tmp_path, "ddpg", episodes=2)
    assert again.state_dir != first.state_dir
    assert [t.user_attrs["episode"] for t in again.study.trials] == [0, 1]


def test_rl_search_resumed_with_more_episodes(tiny_task, tmp_path):
    env = LayerSparsityEnv(tiny_task, budget="0.5flops")
    _run(env, tmp_path, "ddpg", episodes=3)
    more = _run(env, tmp_path, "ddpg", episodes=6, resume=True)
    assert more.new_trials == 3 and len(more.study.trials) == 6


def test_an_episode_that_fails_is_recorded_failed_and_not_replayed(tiny_task, tmp_path, monkeypatch):
    env = LayerSparsityEnv(tiny_task, budget="0.5flops")
    real_finish, calls = env.finish, []

    def finish(kept, stop=None):
        calls.append(1)
        if len(calls) == 3:
            raise AutopruneError("the model produced NaN/inf outputs during evaluation")
        return real_finish(kept, stop)

    monkeypatch.setattr(env, "finish", finish)
    with pytest.raises(AutopruneError, match="NaN"):
        _run(env, tmp_path, "random", episodes=5)
    result = _run(env, tmp_path, "random", episodes=5, resume=True)
    states = [t.state for t in result.study.trials]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 5
    failed = next(t for t in result.study.trials if t.state == TrialState.FAIL)
    assert "NaN" in failed.user_attrs["error"]
    assert not any(t.user_attrs.get("retry_of") == failed.number for t in result.study.trials)


def test_each_proxy_scores_search_val_as_its_formula_says(digits, trained_tiny, tiny_task):
    import math

    import torch
    from torch.nn import functional as F

    from autoprune.task import PruningTask, TaskConfig

    def task(proxy):
        return PruningTask(TaskConfig(model="tiny", dataset="digits", proxy=proxy), splits=digits, dense=trained_tiny)

    ce, kl = task("ce"), task("kl")
    val = digits.search_val
    from autoprune.units.policy import Policy

    kept = tiny_task.kept(Policy.uniform(tiny_task.table, 0.5))
    pruned, _ = tiny_task.pruned(kept)
    with torch.no_grad():
        logits, dense = pruned.eval()(val.x).double(), trained_tiny.eval()(val.x).double()
    want_ce = math.exp(-float(F.cross_entropy(logits, val.y)))
    p_dense = F.softmax(dense, 1)
    want_kl = math.exp(-float((p_dense * (F.log_softmax(dense, 1) - F.log_softmax(logits, 1))).sum(1).mean()))
    assert ce.proxy_accuracy(pruned) == pytest.approx(want_ce, rel=1e-9)
    assert kl.proxy_accuracy(pruned) == pytest.approx(want_kl, rel=1e-9)
    assert tiny_task.proxy_accuracy(pruned) == pytest.approx(float((logits.argmax(1) == val.y).double().mean()))
    assert kl.dense_accuracy() == pytest.approx(1.0) and 0 < kl.proxy_accuracy(pruned) < 1
    # a fine-tune keeps its best epoch by top-1 whatever the search's proxy
    assert ce.val_accuracy(pruned) == kl.val_accuracy(pruned) == tiny_task.proxy_accuracy(pruned)
    assert 0 < want_ce < ce.dense_accuracy() < 1
    # scored in chunks (for --early-stop), the last chunk's score is the whole split's
    seen = []
    _, evaluation = ce.evaluate(kept, stop=lambda score, chunk: seen.append(score) and False)
    assert len(seen) == math.ceil(len(val) / ce.config.eval_batch_size)
    assert seen[-1] == pytest.approx(evaluation.accuracy) == pytest.approx(ce.evaluate(kept)[1].accuracy)


def test_a_study_records_its_proxy_and_resumes_only_with_it(digits, trained_tiny, tmp_path):
    from autoprune.task import PruningTask, TaskConfig

    def env(proxy):
        task = PruningTask(TaskConfig(model="tiny", dataset="digits", proxy=proxy), splits=digits, dense=trained_tiny)
        return LayerSparsityEnv(task, budget="0.5flops")

    result = _run(env("ce"), tmp_path, "random", episodes=3)
    assert StudyRecord.of(result.study).task.proxy == "ce"
    scores = [t.user_attrs["accuracy"] for t in result.study.trials]
    assert all(0 < s < 1 for s in scores) and len(set(scores)) == 3  # exp(-CE): no two policies tie
    with pytest.raises(AutopruneError, match="proxy='ce', this run has proxy='kl'"):
        _run(env("kl"), tmp_path, "random", episodes=5, resume=True, study_name=result.study.study_name)
    assert len(_run(env("ce"), tmp_path, "random", episodes=5, resume=True,
                    study_name=result.study.study_name).study.trials) == 5


def test_a_score_function_is_its_own_proxy(trained_tiny, digits):
    from autoprune.task import PruningTask, TaskConfig

    with pytest.raises(AutopruneError, match="with a score function, the function is the proxy"):
        PruningTask.from_model(trained_tiny, digits.example_input(1), lambda m: 1.0, [digits.calib.x],
                               TaskConfig(model="tiny", dataset="digits", proxy="ce"))
