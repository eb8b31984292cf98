"""Memory over a long search, no untrusted pickle loaded anywhere in the project, a loopback-only dashboard."""

from __future__ import annotations

import ast
import gc

import optuna
import pytest

from autoprune.envs import LayerSparsityEnv
from autoprune.studies.runner import SearchConfig, run_search
from tests.conftest import REPO
from tests.helpers import answers, free_port, running_dashboard


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.slow
def test_200_episodes_keep_resident_memory_flat(tiny_task, tmp_path):
    env = LayerSparsityEnv(tiny_task, budget="0.5flops")
    storage = f"sqlite:///{tmp_path}/m.db"

    def search(episodes):
        return run_search(env, SearchConfig(searcher="random", episodes=episodes, storage=storage,
                                            study_name="m", resume=True, progress=False))

    search(20)  # warm-up: allocator pools, caches, lazy imports
    gc.collect()
    after_warmup = _rss_bytes()
    result = search(200)
    gc.collect()
    after = _rss_bytes()
    assert len(result.study.trials) == 200
    growth = after / after_warmup - 1
    assert growth < 0.10, f"resident memory grew {growth:.1%} over 180 episodes"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            yield node, owner, name


def test_no_untrusted_pickle_is_loaded():
    """Every torch.load passes weights_only=True; nothing calls pickle/cloudpickle/joblib loads."""
    offenders = []
    for folder in ("autoprune", "envs", "agents", "studies", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node, owner, name in _calls(tree):
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                if owner == "torch" and name == "load":
                    kw = {k.arg: k.value for k in node.keywords}
                    ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                    if not ok:
                        offenders.append(f"{where} torch.load without weights_only=True")
                if owner in ("pickle", "cloudpickle", "joblib", "dill") and name in ("load", "loads"):
                    offenders.append(f"{where} {owner}.{name}")
                if name in ("load_from_zip_file",) or (name == "load" and owner in ("DDPG", "TD3", "SAC")):
                    offenders.append(f"{where} stable-baselines3 zip loading unpickles")
    assert offenders == []


_SERVE_WITH_DEFAULTS = ("import sys; from autoprune.studies.report import serve_dashboard; "
                        "serve_dashboard(sys.argv[1], port=int(sys.argv[2]))")


@pytest.mark.parametrize("launch", ["cli", "api"])
def test_dashboard_without_host_listens_on_loopback_only(launch, tmp_path):
    """The dashboard has no authentication: with no host given, it must not be reachable from other
    machines. A server bound to 127.0.0.1 refuses connections to 127.0.0.2; one bound to every
    interface (0.0.0.0) would accept them."""
    db = f"sqlite:///{tmp_path}/d.db"
    optuna.create_study(study_name="d", storage=db)
    port = free_port()
    argv = (["-m", "autoprune.cli", "dashboard", "--storage", db, "--port", str(port)] if launch == "cli"
            else ["-c", _SERVE_WITH_DEFAULTS, db, str(port)])
    with running_dashboard(argv) as dash:
        assert answers(f"http://127.0.0.1:{port}/api/studies")
        assert not answers(f"http://127.0.0.2:{port}/api/studies"), "the dashboard listens beyond loopback"
    assert "no authentication" not in dash.stderr  # the warning is for hosts other machines can reach
