from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from autoprune.cli import main
from tests.conftest import REPO

TINY = f"{REPO / 'tests' / 'tinynets.py'}:tiny"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_resnet56_cifar_sized(capsys):
    code, out, _ = run(capsys, "inspect", "--model", "resnet56", "--dataset", "cifar10")
    assert code == 0
    assert "30 units" in out and "125.75 M MACs" in out
    assert "layer2.0.conv2" in out


def test_inspect_json(capsys):
    code, out, _ = run(capsys, "inspect", "--model", "resnet18", "--dataset", "cifar10", "--json")
    data = json.loads(out)
    assert code == 0 and data["dense_params"] == 11_173_962
    assert len(data["units"]) == 12 and data["round_to"] == 8
    assert data["units"][0]["unit"] == "conv1" and data["units"][0]["width"] == 64


def test_apply_writes_model_policy_and_metrics(capsys, tmp_path, tiny_weights):
    (tmp_path / "p.json").write_text(json.dumps({"stem.0": 0.5, "branch_a.0": 0.25}))
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "apply", "--model", TINY, "--weights", str(tiny_weights),
                         "--dataset", "digits", "--policy", str(tmp_path / "p.json"),
                         "-o", str(out_dir), "--finetune-epochs", "1", "--distill", "0.5")
    assert code == 0, err
    assert {p.name for p in out_dir.iterdir()} == {"pruned.pt", "model.pt2", "policy.json", "metrics.json",
                                                  "finetune.csv"}
    m = json.loads((out_dir / "metrics.json").read_text())
    assert 0 < m["ratios"]["flops"] < 1 and m["ratios"]["flops"] == pytest.approx(
        m["closed_form_ratios"]["flops"], rel=0.01)
    assert 0 <= m["pruned"]["proxy_acc"] <= 1 and m["dense"]["test_acc"] > 0.5
    assert "test_acc_finetuned" in m["pruned"]
    assert m["latency"]["batch1"]["runs"] >= 30 and m["latency"]["batch1"]["runtime"] == "eager"
    pol = json.loads((out_dir / "policy.json").read_text())
    assert {u["name"]: u["kept"] for u in pol["units"]}["stem.0"] == 8
    from autoprune.export.artifacts import load_pruned

    model, _ = load_pruned(out_dir / "pruned.pt", allow_import=True)  # our own file, a user model
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_apply_measures_latency_with_the_runtime_asked_for(capsys, tmp_path, tiny_weights):
    (tmp_path / "p.json").write_text(json.dumps({"stem.0": 0.5}))
    code, _, err = run(capsys, "apply", "--model", TINY, "--weights", str(tiny_weights), "--dataset", "digits",
                       "--policy", str(tmp_path / "p.json"), "-o", str(tmp_path / "out"), "--no-test",
                       "--latency-runtime", "onnxruntime", "--latency-batch", "1,4")
    assert code == 0, err
    latency = json.loads((tmp_path / "out" / "metrics.json").read_text())["latency"]
    assert set(latency) == {"batch1", "batch4"}
    assert all(e["runtime"] == "onnxruntime" and e["runs"] >= 30 and e["ratio"] > 0 for e in latency.values())
    assert "latency (onnxruntime on cpu, batch 4, 1 thread(s)" in err


@pytest.mark.parametrize("argv,match", [
    (["inspect", "--model", "resnet5"], "unknown model 'resnet5'"),
    (["inspect", "--model", "resnet20", "--dataset", "mnist"], "unknown dataset"),
    (["inspect", "--model", "resnet20", "--importance", "magic"], "unknown importance"),
    (["inspect", "--model", "resnet20", "--granularity", "blocks"], "unknown granularity"),
])
def test_bad_names_end_in_one_line_and_exit_2(capsys, argv, match):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and match in err


def test_checkpoint_for_another_architecture(capsys, tmp_path):
    torch.save(torch.nn.Linear(3, 3).state_dict(), tmp_path / "w.pt")
    code, _, err = run(capsys, "inspect", "--model", "resnet20", "--dataset", "cifar10",
                       "--weights", str(tmp_path / "w.pt"))
    assert code == 2 and "does not fit this model" in err and len(err.strip().splitlines()) == 1


def test_malformed_policy_writes_nothing(capsys, tmp_path, tiny_weights):
    (tmp_path / "p.json").write_text('{"stem.0": 2}')
    code, _, err = run(capsys, "apply", "--model", TINY, "--weights", str(tiny_weights),
                       "--dataset", "digits", "--policy", str(tmp_path / "p.json"),
                       "-o", str(tmp_path / "out"))
    assert code == 2 and "sparsities are numbers in [0, 1)" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_console_script_entry_point():
    exe = [sys.executable, "-m", "autoprune.cli"]
    out = subprocess.run(exe + ["inspect", "--model", "nope"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == ("autoprune: error: unknown model 'nope'; choose one of: "
                                  + out.stderr.split("choose one of: ")[1].strip())
    assert "Traceback" not in out.stderr
