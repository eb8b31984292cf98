"""--range and --share: per-unit bounds and shared sparsities, kept by every searcher and the wall."""

from __future__ import annotations

import numpy as np
import pytest

from autoprune.envs import LayerSparsityEnv
from autoprune.errors import AutopruneError
from autoprune.studies.records import StudyRecord
from autoprune.studies.runner import SearchConfig, run_search

# TinyNet's units: stem.0 (a residual group), block.0, branch_a.0, branch_b.0, head.0
RANGES = ("block.*=0.1:0.3", "stem.*=0")
SHARE = ("branch_*",)


def _search(env, tmp_path, searcher, episodes):
    options = {"warmup": 2} if searcher == "ddpg" else {}
    return run_search(env, SearchConfig(searcher=searcher, episodes=episodes, progress=False,
                                        storage=f"sqlite:///{tmp_path}/s.db", searcher_options=options))


@pytest.mark.parametrize("searcher", ["tpe", "ddpg"])
def test_ranges_and_shares_hold_in_every_episode(tiny_task, tmp_path, searcher):
    env = LayerSparsityEnv(tiny_task, budget="0.6flops", ranges=RANGES, share=SHARE)
    names = env.table.names
    study = _search(env, tmp_path, searcher, episodes=10).study
    assert StudyRecord.of(study).search.env.ranges == RANGES and StudyRecord.of(study).search.env.share == SHARE
    a, b = names.index("branch_a.0"), names.index("branch_b.0")
    for t in study.trials:
        achieved = t.user_attrs["policy"]
        assert t.user_attrs["ratios"]["flops"] <= 0.6 + 1e-9
        assert achieved["stem.0"] == 0.0  # fixed by --range: never pruned, the wall included
        # the wall may only raise a sparsity to its unit's top; widths round to the nearest channel
        assert 0.1 - 0.5 / 16 <= achieved["block.0"] <= 0.3 + 0.5 / 16
        asked = t.params
        if searcher == "tpe":  # one parameter for the shared pair: the follower has none
            assert f"s/{names[a]}" in asked and f"s/{names[b]}" not in asked
        else:  # the agent's request for the follower is its leader's
            assert asked[f"s/{names[a]}"] == pytest.approx(asked[f"s/{names[b]}"], abs=1e-6)
        # the follower achieves its leader's sparsity, or more where the wall had to raise it
        assert achieved["branch_b.0"] >= achieved["branch_a.0"] - 0.5 / 8 - 1e-9


def test_share_by_stage_and_bad_ranges(tiny_task):
    env = LayerSparsityEnv(tiny_task, budget="0.6flops", share=("stage",))
    assert env.space.leaders == list(range(env.n_units))  # TinyNet's names share no first component
    fixed = LayerSparsityEnv(tiny_task, budget="0.9flops", ranges=("*=0.2",))
    assert np.all(fixed.space.low == 0.2) and np.all(fixed.space.high == 0.2)
    for bad, match in (("block.*=0.5:0.2", "LO <= HI"), ("block.*", "PATTERN=LO:HI"),
                       ("nothing*=0.1", "matches no unit"), ("block.*=1.5", "LO <= HI")):
        with pytest.raises(AutopruneError, match=match):
            LayerSparsityEnv(tiny_task, budget="0.6flops", ranges=(bad,))
    with pytest.raises(AutopruneError, match="out of reach.*range"):
        LayerSparsityEnv(tiny_task, budget="0.3flops", ranges=("*=0:0.05",))


@pytest.mark.slow
def test_early_stop_prunes_trailing_policies_and_never_exports_them(digits, trained_tiny, tmp_path):
    from optuna.trial import TrialState

    from autoprune.studies.export import choose_trial
    from autoprune.task import PruningTask, TaskConfig

    task = PruningTask(TaskConfig(model="tiny", dataset="digits", eval_batch_size=30), splits=digits,
                       dense=trained_tiny)  # search-val in chunks of 30 images
    chunks = -(-len(digits.search_val) // 30)
    env = LayerSparsityEnv(task, budget="0.5flops")
    study = run_search(env, SearchConfig(searcher="random", episodes=20, early_stop="median", progress=False,
                                         storage=f"sqlite:///{tmp_path}/s.db")).study
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    stopped = study.get_trials(states=(TrialState.PRUNED,))
    assert len(complete) == 20 and stopped  # the study still holds its 20 full episodes
    assert StudyRecord.of(study).search.early_stop == "median"
    for t in stopped:
        assert 1 <= t.user_attrs["pruned_after_chunks"] < chunks
        assert t.user_attrs["ratios"]["flops"] <= 0.5 + 1e-9 and "reward" not in t.user_attrs
    for t in complete:  # scored in full: the last intermediate value is the recorded score
        assert t.intermediate_values[max(t.intermediate_values)] == pytest.approx(t.user_attrs["accuracy"])
    assert choose_trial(study).state == TrialState.COMPLETE
    with pytest.raises(AutopruneError, match="is PRUNED, not a complete episode"):
        choose_trial(study, stopped[0].number)


def test_the_stage_space_keeps_the_residual_stream_whole_and_gives_each_stage_one_decision():
    import torch

    from autoprune.envs.space import SearchSpace
    from autoprune.model.zoo import ModelSpec, build_model
    from autoprune.prune.granularity import build_unit_table

    table = build_unit_table(build_model("resnet20", ModelSpec(10, 3, 32)), torch.randn(1, 3, 32, 32), "channel")
    coupled = table.coupled()
    # the stem's stream, and each later stage's, which its downsampling block's second conv starts
    assert [n for n, c in zip(table.names, coupled) if c] == ["conv1", "layer2.0.conv2", "layer3.0.conv2"]
    space = SearchSpace.build(table, 0.0, 0.8, ranges=("coupled=0",), share=("stage",))
    assert np.all(space.low[coupled] == 0.0) and np.all(space.high[coupled] == 0.0)
    assert np.all(space.leader[coupled] == np.flatnonzero(coupled))  # fixed: in no group
    inner = np.flatnonzero(~coupled)
    assert sorted({table.names[space.leader[u]] for u in inner}) == ["layer1.0.conv1", "layer2.0.conv1",
                                                                     "layer3.0.conv1"]
    assert np.all(space.low[inner] == 0.0) and np.all(space.high[inner] == 0.8)
    # without the range, a stage's stream joins its inner convs, in one decision
    joined = SearchSpace.build(table, 0.0, 0.8, share=("stage",))
    assert joined.leader[table.index_of("layer2.0.conv2")] == table.index_of("layer2.0.conv1")
