"""Memory over a long search, and no untrusted pickle loaded anywhere in the project."""

from __future__ import annotations

import ast
import gc

from autoprune.envs import LayerSparsityEnv
from autoprune.studies.runner import SearchConfig, run_search
from tests.conftest import REPO


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


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


def test_dashboard_defaults_to_loopback():
    from autoprune.cli import build_parser

    args = build_parser().parse_args(["dashboard"])
    assert args.host == "127.0.0.1"
    import inspect

    from autoprune.studies.report import serve_dashboard

    assert inspect.signature(serve_dashboard).parameters["host"].default == "127.0.0.1"
