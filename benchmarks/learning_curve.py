"""Does a searcher learn? Learning curves of finished searches, read from their studies.

    python -m benchmarks.learning_curve --storage sqlite:////path/r56-search.db \\
        --studies resnet56-0.5flops-l1-lsq-ddpg-s0,resnet56-0.5flops-l1-lsq-random-s0 --window 50 \\
        --out benchmarks/results/learning-curve-resnet56.json

For each study, per window of ``--window`` episodes (in trial order): the mean and best proxy score
of the window's complete episodes, the best so far, and how far each episode's policy lies from the
previous one (mean absolute difference of per-unit sparsities: how much the searcher still
explores). Where episodes record an RL agent's learning (``agent`` since the diagnostics were
added: critic and actor loss, exploration sigma, reward baseline), the window's means too. Then
the best score each study had reached after 100, 200, 300 and 400 episodes, so searchers can be
compared at equal episodes whatever length each ran.

Nothing is re-scored: it reads the studies only, so it runs in seconds, beside the searches.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

MARKS = (100, 200, 300, 400)
AGENT_KEYS = ("critic_loss", "actor_loss", "sigma", "baseline")


def curve(study: optuna.Study, window: int) -> dict:
    """A study's learning curve: per-window rows, and the best score at each of :data:`MARKS`."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    scores, policies = [], []
    for t in trials:
        done = t.state == TrialState.COMPLETE and "accuracy" in t.user_attrs
        scores.append(t.user_attrs["accuracy"] if done else None)
        policies.append(np.array(list(t.user_attrs["policy"].values())) if done else None)
    rows, best = [], -np.inf
    for start in range(0, len(trials), window):
        idx = range(start, min(start + window, len(trials)))
        got = [scores[i] for i in idx if scores[i] is not None]
        best = max([best, *got])
        steps = [float(np.mean(np.abs(policies[i] - policies[i - 1]))) for i in idx
                 if i > 0 and policies[i] is not None and policies[i - 1] is not None]
        row = {"episodes": f"{start + 1}-{idx[-1] + 1}", "complete": len(got),
               "mean": statistics.mean(got) if got else None, "best_in_window": max(got) if got else None,
               "best_so_far": best if np.isfinite(best) else None,
               "policy_step": statistics.mean(steps) if steps else None}
        agent = [trials[i].user_attrs["agent"] for i in idx if "agent" in trials[i].user_attrs]
        for key in AGENT_KEYS:
            vals = [a[key] for a in agent if key in a]
            if vals:
                row[key] = statistics.mean(vals)
        rows.append(row)
    marks = {}
    for m in MARKS:
        got = [s for s in scores[:m] if s is not None]
        if len(scores) >= m and got:
            marks[m] = max(got)
    return {"study": study.study_name, "episodes": len(trials), "windows": rows, "best_at": marks}


def fmt(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def table(result: dict) -> str:
    has_agent = any(k in r for r in result["windows"] for k in AGENT_KEYS)
    head = "| episodes | complete | mean score | best in window | best so far | policy step |"
    head += " critic loss | actor loss | sigma | baseline |" if has_agent else ""
    lines = [f"**{result['study']}** ({result['episodes']} episodes)", "", head,
             "|" + "---|" * head.count(" | ") + "---|"]
    for r in result["windows"]:
        line = (f"| {r['episodes']} | {r['complete']} | {fmt(r['mean'])} | {fmt(r['best_in_window'])} | "
                f"{fmt(r['best_so_far'])} | {fmt(r['policy_step'], '.3f')} |")
        if has_agent:
            line += "".join(f" {fmt(r.get(k), '.4g')} |" for k in AGENT_KEYS)
        lines.append(line)
    marks = ", ".join(f"{m}: {v:.4f}" for m, v in result["best_at"].items())
    lines += ["", f"best score after {marks}" if marks else "fewer than 100 episodes"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", required=True)
    ap.add_argument("--studies", required=True, help="comma-separated study names")
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--out", default=None, help="JSON file of every figure")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results = []
    for name in args.studies.split(","):
        try:
            study = optuna.load_study(study_name=name, storage=args.storage)
        except KeyError:
            raise SystemExit(f"no study {name!r} in {args.storage}") from None
        results.append(curve(study, args.window))
        print(table(results[-1]), end="\n\n", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "studies": results}, indent=1))


if __name__ == "__main__":
    main()
