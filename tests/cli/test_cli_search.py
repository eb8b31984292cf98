from __future__ import annotations

import optuna
import pytest

from autoprune.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_search_end_to_end_on_the_offline_default(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "search", "--model", "resnet20", "--budget", "0.5flops",
                         "--episodes", "4", "-q")
    assert code == 0, err
    assert "no --dataset given: using the bundled offline 'digits' set" in err
    assert "training a dense resnet20 baseline" in err
    assert "study 'resnet20-digits-0.5flops-tpe' in sqlite:///autoprune.db: 4 trials" in out
    assert "autoprune export resnet20-digits-0.5flops-tpe" in out and "autoprune dashboard" in out
    study = optuna.load_study(study_name="resnet20-digits-0.5flops-tpe",
                              storage=f"sqlite:///{tmp_path}/autoprune.db")
    assert len(study.trials) == 4
    assert all(t.user_attrs["ratios"]["flops"] <= 0.5 + 1e-9 for t in study.trials)
    assert study.user_attrs["fingerprint.weights"].startswith("baseline-sha256:")
    # the cached baseline is reused: no second training
    code, out, err = run(capsys, "search", "--model", "resnet20", "--budget", "2xflops",
                         "--episodes", "2", "--searcher", "uniform", "-q")
    assert code == 0 and "training a dense" not in err


@pytest.mark.parametrize("argv,match", [
    (["--budget", "half"], "accepted forms: 0.5flops"),
    (["--searcher", "bayes"], "unknown searcher 'bayes'"),
    (["--reward", "acc2"], "unknown reward 'acc2'"),
    (["--latency-runtime", "tensorrt"], "unknown latency runtime 'tensorrt'"),
    (["--model", "resnet7"], "unknown model 'resnet7'"),
    (["--storage", "mongodb"], "cannot read storage"),
    (["--episodes", "0"], "episodes must be at least 1"),
    # refused from the architecture alone, before a dense baseline would be trained
    (["--budget", "0.001flops", "--model", "resnet20"], "out of reach"),
    (["--budget", "0.5flops", "--model", "resnet20", "--range", "*=0:0.1"], "out of reach"),
])
def test_search_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "search", "--episodes", "2", "-q", *argv)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if not line.startswith("note:")]
    assert len(lines) == 1 and match in lines[0], err
    assert "training a dense" not in err  # nothing expensive ran before the refusal
    assert not (tmp_path / "autoprune.db").exists()


@pytest.mark.parametrize("given,expect", [(["--latency-margin", "0", "--no-latency-correct", "--latency-adapt",
                                            "--no-latency-fill", "--latency-refit"], 0.0), ([], None)])
def test_latency_margin_option_reaches_the_study(capsys, tmp_path, tiny_weights, fake_latency, given, expect):
    from tests.conftest import REPO

    db = f"sqlite:///{tmp_path}/s.db"
    code, _, err = run(capsys, "search", "--model", f"{REPO / 'tests' / 'tinynets.py'}:tiny", "--weights",
                       str(tiny_weights), "--dataset", "digits", "--budget", "0.9latency", "--max-sparsity", "0.9",
                       "--episodes", "2", "--searcher", "random", "--storage", db, *given)
    assert code == 0, err
    study = optuna.load_study(study_name="tinynets.tiny-digits-0.9latency-random", storage=db)
    margin = study.user_attrs["search.latency_margin"]
    assert margin == expect if expect is not None else margin > 0  # default: the table's fit error
    assert all(t.user_attrs["latency"]["margin"] == pytest.approx(margin) for t in study.trials)
    for key in ("correct", "fill"):  # on unless told
        assert study.user_attrs[f"search.latency_{key}"] is (expect is None)
    for key in ("adapt", "refit"):  # off unless asked
        assert study.user_attrs[f"search.latency_{key}"] is (expect is not None)
