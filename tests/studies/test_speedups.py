"""FLOPs studies say what they buy in time: the best policy's measured latency beside the rule's."""

from __future__ import annotations

from autoprune.cli import speedup_lines
from autoprune.envs import LayerSparsityEnv
from autoprune.studies.runner import SearchConfig, run_search


def test_a_flops_study_times_its_best_policy_beside_the_best_rule(tiny_task, tmp_path):
    env = LayerSparsityEnv(tiny_task, budget="0.5flops")
    result = run_search(env, SearchConfig(searcher="tpe", episodes=7, storage=f"sqlite:///{tmp_path}/s.db",
                                          progress=False))
    speed = result.speedups(pairs=5)
    assert speed["runtime"] == "eager" and speed["batch"] == 1 and speed["threads"] == 1
    assert speed["best"]["trial"] == result.best.number and speed["best"]["latency"] > 0
    assert speed["rule"]["rule"] in ("uncoupled", "uniform", "lamp", "erk", "global")
    assert speed["best"]["flops"] <= 0.5 + 1e-9 and isinstance(speed["slower_than_rule"], bool)
    lines = speedup_lines(speed)
    assert lines[0].startswith("measured (eager, batch 1, 1 thread(s)): best policy x")


def test_a_searched_policy_slower_than_the_rule_is_flagged():
    speed = {"runtime": "onnxruntime", "batch": 64, "threads": 1, "slower_than_rule": True,
             "best": {"trial": 9, "rule": None, "flops": 0.5, "latency": 0.962},
             "rule": {"trial": 0, "rule": "uncoupled", "flops": 0.5, "latency": 0.749}}
    lines = speedup_lines(speed)
    assert "best rule uncoupled x0.749" in lines[0]
    assert lines[1].startswith("warning: the searched policy runs 28% slower than the rule uncoupled on onnxruntime")
    assert speedup_lines(None) == []


def test_masks_have_nothing_to_time(digits, trained_tiny, tmp_path):
    from autoprune.task import PruningTask, TaskConfig

    task = PruningTask(TaskConfig(model="tiny", dataset="digits", granularity="unstructured"), splits=digits,
                       dense=trained_tiny)
    result = run_search(LayerSparsityEnv(task, budget="0.5flops"),
                        SearchConfig(searcher="random", episodes=2, storage=f"sqlite:///{tmp_path}/m.db",
                                     progress=False))
    assert result.speedups() is None
