"""export, studies, report and the dashboard on a small real study."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request

import numpy as np
import optuna
import pytest
import torch
import yaml

from autoprune.cli import main
from tests.conftest import REPO
from tests.helpers import assert_png_drawn, free_port, running_dashboard

TINY = f"{REPO / 'tests' / 'tinynets.py'}:tiny"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def searched(tmp_path_factory, trained_tiny):
    """A storage holding a tpe study, an nsga2 study and the uniform baseline of one task."""
    root = tmp_path_factory.mktemp("studies")
    weights = root / "tiny.pt"
    torch.save(trained_tiny.state_dict(), weights)
    db = f"sqlite:///{root}/a.db"
    for searcher, episodes in (("tpe", 8), ("nsga2", 10), ("uniform", 1)):
        code = main(["search", "--model", TINY, "--weights", str(weights), "--dataset", "digits",
                     "--budget", "0.5flops", "--searcher", searcher, "--episodes", str(episodes),
                     "--storage", db, "-q"])
        assert code == 0
    return root, db, weights


def test_studies_lists_every_study(capsys, searched):
    _, db, _ = searched
    code, out, _ = run(capsys, "studies", "--storage", db, "--json")
    rows = {r["study"]: r for r in json.loads(out)}
    assert code == 0 and set(rows) == {f"tinynets.tiny-digits-0.5flops-{s}" for s in ("tpe", "nsga2", "uniform")}
    assert rows["tinynets.tiny-digits-0.5flops-tpe"]["trials"] == 8
    code, out, _ = run(capsys, "studies", "--storage", db)
    assert "tinynets.tiny-digits-0.5flops-nsga2" in out and "10/10" in out


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_export_best_policy_is_self_describing(capsys, searched, tmp_path, suffix):
    _, db, _ = searched
    out = tmp_path / f"policy{suffix}"
    code, _, err = run(capsys, "export", "tinynets.tiny-digits-0.5flops-tpe", "--storage", db, "-o", str(out))
    assert code == 0, err
    doc = (yaml.safe_load if suffix == ".yaml" else json.loads)(out.read_text())
    study = optuna.load_study(study_name="tinynets.tiny-digits-0.5flops-tpe", storage=db)
    best = max(study.trials, key=lambda t: (t.user_attrs["reward"], -t.number))
    assert doc["format"] == "autoprune.units.policy" and doc["version"] == 1
    assert doc["trial"] == best.number and doc["proxy_accuracy"] == best.user_attrs["accuracy"]
    assert doc["budget"] == "0.5flops" and doc["achieved"]["flops"] <= 0.5
    assert doc["weights"].startswith("sha256:") and doc["model"] == TINY
    assert [u["name"] for u in doc["units"]] == study.user_attrs["fingerprint.unit_names"]
    assert all({"sparsity", "kept"} <= set(u) for u in doc["units"])
    # the file is a valid policy for `autoprune apply`
    from autoprune.units.policy import Policy

    assert Policy.load(out).sparsity == {u["name"]: u["sparsity"] for u in doc["units"]}


def test_export_formats_for_torch_pruning_and_nni(capsys, searched, tmp_path):
    _, db, _ = searched
    run(capsys, "export", "tinynets.tiny-digits-0.5flops-tpe", "--storage", db, "--trial", "3",
        "--format", "torch-pruning", "-o", str(tmp_path / "tp.json"))
    run(capsys, "export", "tinynets.tiny-digits-0.5flops-tpe", "--storage", db, "--trial", "3",
        "--format", "nni", "-o", str(tmp_path / "nni.json"))
    trial = optuna.load_study(study_name="tinynets.tiny-digits-0.5flops-tpe", storage=db).trials[3]
    tp = json.loads((tmp_path / "tp.json").read_text())
    assert tp["pruning_ratio_dict"] == trial.user_attrs["policy"]
    nni = json.loads((tmp_path / "nni.json").read_text())
    assert {e["op_names"][0]: e["sparse_ratio"] for e in nni} == trial.user_attrs["policy"]


def test_export_pareto_picks(capsys, searched, tmp_path):
    _, db, _ = searched
    picks = {}
    for pick in ("accuracy", "cost", "knee"):
        code, _, err = run(capsys, "export", "tinynets.tiny-digits-0.5flops-nsga2", "--storage", db,
                           "--pick", pick, "-o", str(tmp_path / f"{pick}.json"))
        assert code == 0, err
        picks[pick] = json.loads((tmp_path / f"{pick}.json").read_text())
    assert picks["accuracy"]["proxy_accuracy"] >= picks["knee"]["proxy_accuracy"] >= \
        picks["cost"]["proxy_accuracy"]
    assert picks["cost"]["achieved"]["flops"] <= picks["knee"]["achieved"]["flops"] <= \
        picks["accuracy"]["achieved"]["flops"]


@pytest.mark.parametrize("argv,match", [
    (["export", "no-such-study", "-o", "p.json"], "no study 'no-such-study'"),
    (["export", "tinynets.tiny-digits-0.5flops-tpe", "--trial", "99", "-o", "p.json"], "no trial 99"),
    (["export", "tinynets.tiny-digits-0.5flops-tpe", "--format", "keras", "-o", "p.json"], "unknown --format"),
    (["export", "tinynets.tiny-digits-0.5flops-nsga2", "--pick", "best", "-o", "p.json"], "unknown pick"),
    (["report", "no-such-study", "-o", "rep"], "no study"),
])
def test_export_and_report_errors(capsys, searched, tmp_path, monkeypatch, argv, match):
    _, db, _ = searched
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv[:2], "--storage", db, *argv[2:])
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "rep").exists()


@pytest.mark.slow
def test_export_with_weights_writes_a_model_plain_torch_can_run(capsys, searched, tmp_path):
    root, db, weights = searched
    out = tmp_path / "policy.json"
    code, _, err = run(capsys, "export", "tinynets.tiny-digits-0.5flops-tpe", "--storage", db, "-o", str(out),
                       "--weights", str(weights), "--finetune-epochs", "1", "--distill", "0.5", "--onnx", "-q")
    assert code == 0, err
    model_dir = tmp_path / "policy_model"
    assert {p.name for p in model_dir.iterdir()} == {"pruned.pt", "model.pt2", "model.onnx", "policy.json",
                                                     "metrics.json", "finetune.csv"}
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["ratios"]["flops"] <= 0.5 and metrics["onnx"]["max_abs_diff"] < 1e-3
    recorded = metrics["pruned"]["test_acc_finetuned"]
    # the digits test split, saved as plain tensors for a process that has no autoprune
    from autoprune.data.datasets import make_splits

    test = make_splits("digits").test
    torch.save({"x": test.tensors[0], "y": test.tensors[1]}, tmp_path / "test.pt")
    code = (
        "import sys\n"
        "sys.modules['autoprune'] = None  # importing autoprune now fails: plain torch only\n"
        "import torch\n"
        "m = torch.export.load(sys.argv[1] + '/model.pt2').module()\n"
        "d = torch.load(sys.argv[2], weights_only=True)\n"
        "with torch.no_grad():\n"
        "    acc = (m(d['x']).argmax(1) == d['y']).float().mean().item()\n"
        "print(acc)\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(model_dir), str(tmp_path / "test.pt")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert float(res.stdout) == pytest.approx(recorded, abs=1e-6)
    # onnxruntime gives the same predictions
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": test.tensors[0].numpy()})[0]
    assert float((np.argmax(logits, 1) == test.tensors[1].numpy()).mean()) == pytest.approx(recorded, abs=1e-6)
    doc = json.loads(out.read_text())
    assert doc["exported_model"]["test_accuracy"] == recorded


def test_export_measures_latency_with_the_study_runtime_unless_told(capsys, tmp_path, tiny_weights):
    db, name = f"sqlite:///{tmp_path}/rt.db", "tinynets.tiny-digits-0.5flops-uniform"
    code, _, err = run(capsys, "search", "--model", TINY, "--weights", str(tiny_weights), "--dataset", "digits",
                       "--budget", "0.5flops", "--searcher", "uniform", "--storage", db,
                       "--latency-runtime", "onnxruntime", "-q")
    assert code == 0, err
    assert optuna.load_study(study_name=name, storage=db).user_attrs["search.latency_runtime"] == "onnxruntime"
    for flags, runtime in (((), "onnxruntime"), (("--latency-runtime", "eager"), "eager")):
        code, _, err = run(capsys, "export", name, "--storage", db, "-o", str(tmp_path / f"{runtime}.json"),
                           "--weights", str(tiny_weights), "-q", *flags)
        assert code == 0, err
        metrics = json.loads((tmp_path / f"{runtime}_model" / "metrics.json").read_text())
        assert metrics["latency"]["batch1"]["runtime"] == runtime and metrics["latency"]["batch1"]["ratio"] > 0


def test_export_refuses_other_weights(capsys, searched, tmp_path):
    _, db, weights = searched
    other = tmp_path / "other.pt"
    sd = torch.load(weights, weights_only=True)
    sd["fc.bias"] = sd["fc.bias"] + 1
    torch.save(sd, other)
    code, _, err = run(capsys, "export", "tinynets.tiny-digits-0.5flops-tpe", "--storage", db,
                       "-o", str(tmp_path / "p.json"), "--weights", str(other))
    assert code == 2 and "is not the weights study" in err
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "p_model").exists()


def test_report_writes_csv_summary_and_plots(capsys, searched, tmp_path):
    _, db, _ = searched
    code, out, err = run(capsys, "report", "tinynets.tiny-digits-0.5flops-tpe", "--storage", db,
                         "-o", str(tmp_path / "rep"))
    assert code == 0, err
    rep = tmp_path / "rep"
    import pandas as pd

    df = pd.read_csv(rep / "trials.csv")
    assert len(df) == 8 and {"reward", "proxy_accuracy", "flops_ratio"} <= set(df.columns)
    assert df["flops_ratio"].max() <= 0.5 + 1e-9
    summary = (rep / "summary.md").read_text()
    assert "## Best trial" in summary and "uniform" in summary and "nsga2" in summary
    for png in ("accuracy_vs_cost.png", "policy.png", "reward.png"):
        assert_png_drawn(rep / png, min_size=(600, 400), min_coloured=500)


@pytest.fixture
def dashboard(searched):
    """``autoprune dashboard`` on the study storage, ready on the URL it printed."""
    _, db, _ = searched
    port = free_port()
    with running_dashboard(["-m", "autoprune.cli", "dashboard", "--storage", db, "--port", str(port)]) as dash:
        dash.port = port
        yield dash


def test_dashboard_serves_the_studies_on_loopback(dashboard, searched):
    _, db, _ = searched
    # what it tells the user: the storage it serves, and a loopback URL on the port asked for
    assert db in dashboard.url_line
    printed = urllib.parse.urlsplit(dashboard.url)
    assert (printed.hostname, printed.port) == ("127.0.0.1", dashboard.port)
    # and that URL serves the studies in that storage
    with urllib.request.urlopen(f"{dashboard.url}/api/studies", timeout=5) as r:
        studies = json.loads(r.read())["study_summaries"]
    names = {s["study_name"]: s["study_id"] for s in studies}
    assert set(names) == {f"tinynets.tiny-digits-0.5flops-{s}" for s in ("tpe", "nsga2", "uniform")}
    with urllib.request.urlopen(f"{dashboard.url}/api/studies/{names['tinynets.tiny-digits-0.5flops-tpe']}",
                                timeout=10) as r:
        detail = json.loads(r.read())
    assert len(detail["trials"]) == 8


def test_dashboard_in_headless_chromium(dashboard, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    with urllib.request.urlopen(f"{dashboard.url}/api/studies", timeout=5) as r:
        sid = json.loads(r.read())["study_summaries"][0]["study_id"]
    shot = tmp_path / "dashboard.png"
    res = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000",
         "--virtual-time-budget=15000", f"--screenshot={shot}", f"{dashboard.url}/dashboard/studies/{sid}"],
        capture_output=True, text=True, timeout=120)
    assert shot.is_file(), res.stderr[-2000:]
    # a rendered page (the blue app bar, plots), not a blank or grey error page
    assert_png_drawn(shot, min_size=(1000, 700), min_coloured=1400 * 1000 // 100)
    keep = os.environ.get("AUTOPRUNE_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, keep)


def test_report_legend_tells_studies_of_one_searcher_apart():
    import optuna

    from autoprune.studies.report import _labels

    def study(name, searcher):
        s = optuna.create_study(study_name=name, storage="sqlite:///:memory:")
        s.set_user_attr("searcher", searcher)
        return s

    sibs = [study("a-tpe-s0", "tpe"), study("a-tpe-s1", "tpe"), study("a-uniform", "uniform")]
    assert _labels(sibs, sibs[1]) == {"a-tpe-s0": "tpe: a-tpe-s0", "a-tpe-s1": "tpe: a-tpe-s1 (this study)",
                                      "a-uniform": "uniform"}
