"""The bad-input matrix: each case ends in one clear line and exit code 2, with nothing written
and no existing study changed."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import subprocess

import pytest
import torch

from autoprune.cli import main
from tests.conftest import REPO

TINY = f"{REPO / 'tests' / 'tinynets.py'}:tiny"


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.fixture(scope="module")
def world(tmp_path_factory, trained_tiny):
    """Weights (good and bad), policies, and a storage holding one finished study."""
    root = tmp_path_factory.mktemp("bad")
    good = root / "tiny.pt"
    torch.save(trained_tiny.state_dict(), good)
    files = {"good": good}
    torch.save(torch.nn.Linear(4, 2).state_dict(), root / "other.pt")
    data = good.read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 3])
    torch.save({"state_dict": trained_tiny.state_dict(), "hook": _Evil()}, root / "evil.pt")
    with open(root / "raw.pkl", "wb") as f:
        pickle.dump(_Evil(), f)
    torch.save({"epoch": 3}, root / "nostate.pt")
    nan = {k: (torch.full_like(v, float("nan")) if v.is_floating_point() else v)
           for k, v in trained_tiny.state_dict().items()}
    torch.save(nan, root / "nan.pt")
    (root / "unknown_unit.json").write_text(json.dumps({"nope.conv": 0.5}))
    (root / "out_of_range.json").write_text(json.dumps({"stem.0": 1.2}))
    (root / "nan_policy.json").write_text('{"stem.0": NaN}')
    (root / "broken.json").write_text('{"stem.0": 0.5')
    (root / "good_policy.json").write_text(json.dumps({"stem.0": 0.5}))
    (root / "junk.db").write_bytes(b"not a database" * 200)
    db = f"sqlite:///{root}/studies.db"
    assert main(["search", "--model", TINY, "--weights", str(good), "--dataset", "digits",
                 "--budget", "0.5flops", "--searcher", "random", "--episodes", "3", "--storage", db,
                 "--study-name", "kept", "-q"]) == 0
    files.update({n: root / n for n in ("other.pt", "truncated.pt", "evil.pt", "raw.pkl", "nostate.pt",
                                         "nan.pt", "unknown_unit.json", "out_of_range.json",
                                         "nan_policy.json", "broken.json", "good_policy.json", "junk.db")})
    return root, db, files


def _search(files, *extra):
    return ["search", "--model", TINY, "--weights", str(files["good"]), "--dataset", "digits",
            "--episodes", "2", "-q", *extra]


def _weights(files, name):
    return ["search", "--model", TINY, "--weights", str(files[name]), "--dataset", "digits", "-q"]


def _apply(files, policy, *extra):
    return ["apply", "--model", TINY, "--weights", str(files["good"]), "--dataset", "digits",
            "--policy", str(files[policy]), "-o", "out", "--no-test", "-q", *extra]


# case -> (argv, a distinctive part of the one error line the user must see)
CASES = {
    "budget-words": (lambda f, db: _search(f, "--budget", "half"), "cannot read budget 'half'"),
    "budget-above-one": (lambda f, db: _search(f, "--budget", "1.5flops"),
                         "budget '1.5flops' keeps 1.5 of the dense flops; it must be between 0 and 1"),
    "budget-zero": (lambda f, db: _search(f, "--budget", "0flops"),
                    "budget '0flops' keeps 0 of the dense flops; it must be between 0 and 1"),
    "budget-unit": (lambda f, db: _search(f, "--budget", "2xwatts"), "cannot read budget '2xwatts'"),
    "unknown-model": (lambda f, db: ["search", "--model", "resnet9", "-q"], "unknown model 'resnet9'"),
    "unknown-dataset": (lambda f, db: _search(f, "--dataset", "mnist"), "unknown dataset 'mnist'"),
    "unknown-searcher": (lambda f, db: _search(f, "--searcher", "bayes"), "unknown searcher 'bayes'"),
    "unknown-importance": (lambda f, db: _search(f, "--importance", "magic"), "unknown importance 'magic'"),
    "unknown-reward": (lambda f, db: _search(f, "--reward", "speed"), "unknown reward 'speed'"),
    "unknown-proxy": (lambda f, db: _search(f, "--proxy", "top5"), "unknown proxy 'top5'; choose one of: acc, ce, kl"),
    "unknown-granularity": (lambda f, db: _search(f, "--granularity", "blocks"), "unknown granularity 'blocks'"),
    "unknown-latency-runtime": (lambda f, db: _search(f, "--latency-runtime", "tensorrt"),
                                "unknown latency runtime 'tensorrt'; choose one of: eager, compile, onnxruntime"),
    "apply-unknown-latency-runtime": (lambda f, db: _apply(f, "good_policy.json", "--latency-runtime", "tvm"),
                                      "unknown latency runtime 'tvm'"),
    "export-unknown-latency-runtime": (lambda f, db: ["export", "kept", "--storage", db, "--latency-runtime", "tvm",
                                                      "-o", "p.json"], "unknown latency runtime 'tvm'"),
    "export-semi-structured-on-cpu": (lambda f, db: ["export", "kept", "--storage", db, "--latency-runtime",
                                                     "semi-structured", "-o", "p.json"],
                                      "2:4 semi-structured kernels need a CUDA GPU with sparse tensor cores"),
    "search-semi-structured-on-cpu": (lambda f, db: _search(f, "--budget", "0.7latency", "--latency-runtime",
                                                            "semi-structured"),
                                      "2:4 semi-structured kernels need a CUDA GPU with sparse tensor cores"),
    "checkpoint-other-arch": (lambda f, db: _weights(f, "other.pt"), "other.pt does not fit this model"),
    "checkpoint-truncated": (lambda f, db: _weights(f, "truncated.pt"),
                             "truncated.pt is not a readable PyTorch checkpoint"),
    "checkpoint-pickle-code": (lambda f, db: _weights(f, "evil.pt"),
                               "evil.pt holds objects that weights_only loading refuses"),
    "checkpoint-raw-pickle": (lambda f, db: _weights(f, "raw.pkl"),
                              "raw.pkl holds objects that weights_only loading refuses"),
    "checkpoint-no-state-dict": (lambda f, db: _weights(f, "nostate.pt"), "nostate.pt holds no state_dict"),
    "checkpoint-missing": (lambda f, db: ["search", "--model", TINY, "--weights", "nowhere.pt",
                                          "--dataset", "digits", "-q"], "weights file not found: nowhere.pt"),
    "policy-unknown-unit": (lambda f, db: _apply(f, "unknown_unit.json"),
                            "policy names 1 unit(s) this model does not have (first: 'nope.conv')"),
    "policy-out-of-range": (lambda f, db: _apply(f, "out_of_range.json"), "policy sparsity for 'stem.0' is 1.2"),
    "policy-nan": (lambda f, db: _apply(f, "nan_policy.json"), "policy sparsity for 'stem.0' is nan"),
    "policy-not-json": (lambda f, db: _apply(f, "broken.json"), "broken.json is not valid json"),
    "infeasible-budget": (lambda f, db: _search(f, "--budget", "0.001flops"), "budget 0.001flops is out of reach"),
    "latency-budget-unstructured": (lambda f, db: _search(f, "--budget", "0.7latency", "--granularity",
                                                          "unstructured"),
                                    "a latency budget needs channel granularity"),
    "latency-budget-nm": (lambda f, db: _search(f, "--budget", "0.7latency", "--granularity", "nm"),
                          "a latency budget needs channel granularity: nm masks run as fast as dense"),
    "nm-ladder-entry": (lambda f, db: _search(f, "--granularity", "nm", "--nm-ladder", "2:4,5:4"),
                        "N:M ladder entry '5:4': expected N:M with whole numbers 0 < N <= M"),
    "nm-ladder-only-dense": (lambda f, db: _search(f, "--granularity", "nm", "--nm-ladder", "4:4"),
                             "has no sparse rung"),
    "nm-ladder-without-nm": (lambda f, db: _search(f, "--nm-ladder", "2:4"),
                             "--nm-ladder goes with --granularity nm, not 'channel'"),
    "block-shape": (lambda f, db: _search(f, "--granularity", "block:4by4"), "block shape '4by4': expected RxC"),
    "block-without-shape": (lambda f, db: _search(f, "--granularity", "block"), "block needs a tile shape"),
    "block-fits-no-layer": (lambda f, db: _search(f, "--granularity", "block:7x7"),
                            "the model has no prunable units"),
    "argument-to-channel": (lambda f, db: _search(f, "--granularity", "channel:2"),
                            "granularity 'channel' takes no argument"),
    # the password is masked in the message
    "unreachable-storage": (lambda f, db: _search(f, "--storage", "postgresql://u:p@127.0.0.1:9/none"),
                            "cannot open storage postgresql://u:***@127.0.0.1:9/none"),
    "unknown-storage-scheme": (lambda f, db: _search(f, "--storage", "mongodb://x"),
                               "cannot open storage mongodb://x"),
    "corrupt-sqlite": (lambda f, db: _search(f, "--storage", f"sqlite:///{f['junk.db']}"),
                       "junk.db is not a readable SQLite database"),
    "existing-study-without-resume": (lambda f, db: _search(f, "--searcher", "random", "--storage", db,
                                                            "--study-name", "kept"),
                                      "study 'kept' already exists"),
    "resume-with-other-budget": (lambda f, db: _search(f, "--searcher", "random", "--storage", db, "--study-name",
                                                       "kept", "--budget", "0.4flops", "--resume"),
                                 "study 'kept' was made with budget='0.5flops', this run has budget='0.4flops'"),
    "unknown-search-val": (lambda f, db: _search(f, "--search-val", "test"),
                           "unknown --search-val 'test'; choose one of: train, heldout"),
    "resume-with-other-search-val": (lambda f, db: _search(f, "--searcher", "random", "--storage", db, "--study-name",
                                                           "kept", "--search-val", "heldout", "--resume"),
                                     "study 'kept' was made with --search-val='train', this run has "
                                     "--search-val='heldout'"),
    "export-unknown-study": (lambda f, db: ["export", "nope", "--storage", db, "-o", "p.json"], "no study 'nope'"),
    "export-unknown-trial": (lambda f, db: ["export", "kept", "--storage", db, "--trial", "42", "-o", "p.json"],
                             "study 'kept' has no trial 42"),
    "export-other-weights": (lambda f, db: ["export", "kept", "--storage", db, "--weights", str(f["nan.pt"]),
                                            "-o", "p.json"],
                             "nan.pt is not the weights study 'kept' searched"),
    "nan-during-evaluation": (lambda f, db: _weights(f, "nan.pt"), "produced NaN/inf outputs during evaluation"),
    "nan-loss-in-finetuning": (lambda f, db: _apply(f, "good_policy.json", "--finetune-epochs", "1",
                                                    "--finetune-lr", "1e30"),
                               "fine-tuning loss became nan"),
    "negative-finetune-epochs": (lambda f, db: _apply(f, "good_policy.json", "--finetune-epochs", "-2"),
                                 "--finetune-epochs is -2; give 0 (no fine-tune) or more"),
    "export-negative-finetune-epochs": (lambda f, db: ["export", "kept", "--storage", db, "--finetune-epochs", "-1",
                                                       "-o", "p.json"], "--finetune-epochs is -1"),
    "episode-finetune-without-steps": (lambda f, db: _search(f, "--episode-finetune", "sgd"),
                                       "--episode-finetune says how --episode-finetune-steps train"),
    "negative-episode-finetune-steps": (lambda f, db: _search(f, "--episode-finetune-steps", "-3"),
                                        "episode fine-tune steps is -3; give 0 (none) or more"),
    "workers-on-sqlite": (lambda f, db: _search(f, "--workers", "2"), "SQLite serves one writer"),
    "zero-episodes": (lambda f, db: _search(f, "--episodes", "0"), "episodes must be at least 1"),
    "two-budgets-on-one-metric": (lambda f, db: _search(f, "--budget", "0.5flops", "--budget", "0.4flops"),
                                  "two budgets on flops: 0.5flops and 0.4flops; give one per metric"),
    "resume-with-a-budget-added": (lambda f, db: _search(f, "--budget", "0.5flops", "--budget", "0.6params",
                                                         "--storage", db, "--study-name", "kept", "--resume"),
                                   "was made with budget='0.5flops', this run has budget='0.5flops,0.6params'"),
    "round-to-auto-flops-budget-without-runtime": (lambda f, db: _search(f, "--round-to", "auto"),
                                                   "reads widths from a latency table, and a flops budget has none"),
    "round-to-auto-over-masks": (lambda f, db: _search(f, "--granularity", "unstructured", "--round-to", "auto",
                                                       "--latency-runtime", "eager"), "units are not channels"),
    "round-to-neither-number-nor-auto": (lambda f, db: _search(f, "--round-to", "eight"),
                                         "'eight' is neither a whole number nor 'auto'"),
    "imagefolder-without-dir": (lambda f, db: ["search", "--model", "resnet20", "--dataset", "imagefolder", "-q"],
                                "imagefolder needs --data-dir"),
}


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(folder) -> dict:
    """Every path under ``folder`` with its content digest: any file written, changed or removed shows."""
    return {str(p.relative_to(folder)): (_digest(p) if p.is_file() else "dir") for p in folder.rglob("*")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, world, tmp_path, monkeypatch, capsys):
    root, db, files = world
    argv, message = CASES[case]
    monkeypatch.chdir(tmp_path)
    before = _snapshot(root)
    code = main(argv(files, db))
    out, err = capsys.readouterr()
    assert code == 2, (case, err)
    assert err.endswith("\n") and err.count("\n") == 1, f"not exactly one line on stderr: {err!r}"
    assert err.startswith("autoprune: error: ") and message in err, err
    assert "\x1b" not in err, "terminal escape codes in the error line"
    assert out == "", "a failed command printed on stdout (or ran code from a pickle)"
    assert list(tmp_path.iterdir()) == [], "something was written in the working folder"
    assert _snapshot(root) == before, "a weights, policy or study file was written, changed or removed"


def test_read_only_database_folder(world, tmp_path, monkeypatch, capsys):
    _, _, files = world
    ro = tmp_path / "ro"
    ro.mkdir()
    locked = shutil.which("chattr") and subprocess.run(["chattr", "+i", str(ro)]).returncode == 0
    if not locked:
        ro.chmod(0o555)
    monkeypatch.chdir(tmp_path)
    try:
        code = main(_search(files, "--storage", f"sqlite:///{ro}/x.db"))
        out, err = capsys.readouterr()
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith(f"autoprune: error: cannot write database {ro}/x.db: "), err
        assert f"{ro} is read-only" in err and "use a storage in a writable location" in err
        assert list(ro.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["ro"]
    finally:
        if locked:
            subprocess.run(["chattr", "-i", str(ro)])
        ro.chmod(0o755)
