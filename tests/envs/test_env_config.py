"""The env's settings are typed once (EnvConfig) and flow by name: API, CLI, study record, workers.

``latency_pairs`` is the setting added to show it: one field, its use in the env and its flag
are all it took; these tests follow it from each entry point into the study and back.
"""

from __future__ import annotations

import dataclasses

import pytest

from autoprune.envs import EnvConfig, LayerSparsityEnv
from autoprune.errors import AutopruneError
from autoprune.studies.records import SearchSpec, StudyRecord


def test_the_search_record_stores_the_env_settings_flat_under_search_and_reads_them_back():
    spec = SearchSpec(env=EnvConfig(budget="0.4flops", ranges=("conv1=0",), latency_pairs=12),
                      searcher="cmaes", episodes=7)
    attrs = spec.to_attrs()
    # the keys every study has used, unchanged: the env's fields sit beside the searcher's
    assert attrs["search.budget"] == "0.4flops" and attrs["search.searcher"] == "cmaes"
    assert attrs["search.ranges"] == ["conv1=0"] and attrs["search.latency_pairs"] == 12
    assert not any(key.startswith("search.env") for key in attrs)
    assert SearchSpec.from_attrs(attrs) == spec
    # a study made before the setting existed measured with 30 pairs
    legacy = {k: v for k, v in attrs.items() if k != "search.latency_pairs"}
    assert SearchSpec.from_attrs(legacy).env.latency_pairs == 30
    # an identity field of the env is checked like one of the search
    other = SearchSpec(env=EnvConfig(budget="0.5flops", ranges=("conv1=0",)), searcher="cmaes")
    assert other.mismatch(attrs) == ("budget", "0.4flops", "0.5flops")


def test_settings_given_by_name_become_the_envs_config(tiny_task):
    env = LayerSparsityEnv(tiny_task, budget="0.6flops", max_sparsity=0.7, latency_pairs=9)
    assert env.config == EnvConfig(budget="0.6flops", max_sparsity=0.7, latency_pairs=9, latency_margin=0.0)
    same = LayerSparsityEnv(tiny_task, EnvConfig(budget="0.6flops", max_sparsity=0.7, latency_pairs=9))
    assert same.config == env.config
    with pytest.raises(TypeError, match="either config or env settings"):
        LayerSparsityEnv(tiny_task, EnvConfig(), budget="0.6flops")


@pytest.mark.parametrize("bad, message", [
    ({"latency_pairs": 2}, "latency_pairs must be at least 3"),
    ({"min_sparsity": 0.5, "max_sparsity": 0.4}, "min_sparsity <= max_sparsity"),
    ({"ranges": ("conv1",)}, "expected PATTERN=LO:HI"),
    ({"budget": "half"}, "budget"),
])
def test_a_bad_setting_is_refused_before_any_model_is_touched(bad, message):
    with pytest.raises(AutopruneError, match=message):
        EnvConfig(**bad).check()


def test_one_setting_flows_from_the_api_into_the_study_and_back_into_a_workers_env(tiny_task, digits,
                                                                                    trained_tiny, tmp_path):
    import autoprune

    calib = [x for x, _ in digits.calib.batches(64)]
    result = autoprune.search(trained_tiny, digits.example_input(1), "0.6flops", score=lambda m: 0.5,
                              calib=calib, searcher="uniform", storage=f"sqlite:///{tmp_path}/c.db",
                              progress=False, latency_pairs=11, max_sparsity=0.7, reconstruct="none")
    record = StudyRecord.of(result.study)
    assert result.study.user_attrs["search.latency_pairs"] == 11
    assert record.search.env == EnvConfig(budget="0.6flops", max_sparsity=0.7, latency_pairs=11,
                                          latency_margin=0.0)
    rebuilt = LayerSparsityEnv(tiny_task, record.search.env)  # as a worker process rebuilds it
    assert rebuilt.config == record.search.env
    with pytest.raises(AutopruneError, match="unknown setting"):
        autoprune.search(trained_tiny, digits.example_input(1), score=lambda m: 0.5, calib=calib,
                         storage=f"sqlite:///{tmp_path}/d.db", progress=False, latency_pair=11)


def test_the_command_line_maps_its_flags_onto_the_config_by_name(capsys):
    from autoprune.cli import build_parser, env_settings, main

    args = build_parser().parse_args(["search", "--budget", "0.3flops", "--latency-pairs", "40",
                                      "--range", "conv1=0", "--no-latency-correct"])
    settings = env_settings(args)
    assert EnvConfig(**settings) == dataclasses.replace(
        EnvConfig(), budget="0.3flops", latency_pairs=40, ranges=("conv1=0",), latency_correct=False)
    # a library error names the setting; the command line names its flag
    assert main(["search", "--model", "resnet20", "--latency-pairs", "1"]) == 2
    said = capsys.readouterr().err.strip()
    assert said == "autoprune: error: --latency-pairs must be at least 3 (a median of pairs), got 1"
