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


def _apply(files, policy, *extra):
    return ["apply", "--model", TINY, "--weights", str(files["good"]), "--dataset", "digits",
            "--policy", str(files[policy]), "-o", "out", "--no-test", "-q", *extra]


CASES = {
    "budget-words": lambda f, db: _search(f, "--budget", "half"),
    "budget-above-one": lambda f, db: _search(f, "--budget", "1.5flops"),
    "budget-zero": lambda f, db: _search(f, "--budget", "0flops"),
    "budget-unit": lambda f, db: _search(f, "--budget", "2xwatts"),
    "unknown-model": lambda f, db: ["search", "--model", "resnet9", "-q"],
    "unknown-dataset": lambda f, db: _search(f, "--dataset", "mnist"),
    "unknown-searcher": lambda f, db: _search(f, "--searcher", "bayes"),
    "unknown-importance": lambda f, db: _search(f, "--importance", "magic"),
    "unknown-reward": lambda f, db: _search(f, "--reward", "speed"),
    "unknown-granularity": lambda f, db: _search(f, "--granularity", "blocks"),
    "checkpoint-other-arch": lambda f, db: ["search", "--model", TINY, "--weights", str(f["other.pt"]),
                                            "--dataset", "digits", "-q"],
    "checkpoint-truncated": lambda f, db: ["search", "--model", TINY, "--weights", str(f["truncated.pt"]),
                                           "--dataset", "digits", "-q"],
    "checkpoint-pickle-code": lambda f, db: ["search", "--model", TINY, "--weights", str(f["evil.pt"]),
                                             "--dataset", "digits", "-q"],
    "checkpoint-raw-pickle": lambda f, db: ["search", "--model", TINY, "--weights", str(f["raw.pkl"]),
                                            "--dataset", "digits", "-q"],
    "checkpoint-no-state-dict": lambda f, db: ["search", "--model", TINY, "--weights", str(f["nostate.pt"]),
                                               "--dataset", "digits", "-q"],
    "checkpoint-missing": lambda f, db: ["search", "--model", TINY, "--weights", "nowhere.pt",
                                         "--dataset", "digits", "-q"],
    "policy-unknown-unit": lambda f, db: _apply(f, "unknown_unit.json"),
    "policy-out-of-range": lambda f, db: _apply(f, "out_of_range.json"),
    "policy-nan": lambda f, db: _apply(f, "nan_policy.json"),
    "policy-not-json": lambda f, db: _apply(f, "broken.json"),
    "infeasible-budget": lambda f, db: _search(f, "--budget", "0.001flops"),
    "latency-budget-unstructured": lambda f, db: _search(f, "--budget", "0.7latency", "--granularity",
                                                         "unstructured"),
    "unreachable-storage": lambda f, db: _search(f, "--storage", "postgresql://u:p@127.0.0.1:9/none"),
    "unknown-storage-scheme": lambda f, db: _search(f, "--storage", "mongodb://x"),
    "corrupt-sqlite": lambda f, db: _search(f, "--storage", f"sqlite:///{f['junk.db']}"),
    "existing-study-without-resume": lambda f, db: _search(f, "--searcher", "random", "--storage", db,
                                                           "--study-name", "kept"),
    "resume-with-other-budget": lambda f, db: _search(f, "--searcher", "random", "--storage", db,
                                                      "--study-name", "kept", "--budget", "0.4flops", "--resume"),
    "export-unknown-study": lambda f, db: ["export", "nope", "--storage", db, "-o", "p.json"],
    "export-unknown-trial": lambda f, db: ["export", "kept", "--storage", db, "--trial", "42", "-o", "p.json"],
    "export-other-weights": lambda f, db: ["export", "kept", "--storage", db, "--weights", str(f["nan.pt"]),
                                           "-o", "p.json"],
    "nan-during-evaluation": lambda f, db: ["search", "--model", TINY, "--weights", str(f["nan.pt"]),
                                            "--dataset", "digits", "-q"],
    "nan-loss-in-finetuning": lambda f, db: _apply(f, "good_policy.json", "--finetune-epochs", "1",
                                                   "--finetune-lr", "1e30"),
    "workers-on-sqlite": lambda f, db: _search(f, "--workers", "2"),
    "zero-episodes": lambda f, db: _search(f, "--episodes", "0"),
    "imagefolder-without-dir": lambda f, db: ["search", "--model", "resnet20", "--dataset", "imagefolder", "-q"],
}


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, world, tmp_path, monkeypatch, capsys):
    root, db, files = world
    monkeypatch.chdir(tmp_path)
    study_file = root / "studies.db"
    before = _digest(study_file)
    code = main(CASES[case](files, db))
    out, err = capsys.readouterr()
    lines = [line for line in err.strip().splitlines() if not line.startswith("note:")]
    assert code == 2, (case, err)
    assert len(lines) == 1 and lines[0].startswith("autoprune: error: "), err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "something was written"
    assert _digest(study_file) == before, "the existing study changed"


def test_the_matrix_is_wide(world):
    assert len(CASES) >= 25


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
        err = capsys.readouterr().err
        assert code == 2 and "is read-only" in err
        assert list(ro.iterdir()) == []
    finally:
        if locked:
            subprocess.run(["chattr", "-i", str(ro)])
        ro.chmod(0o755)
