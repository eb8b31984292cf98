"""Does a searcher learn? Learning curves of finished searches, read from their studies.

    python -m benchmarks.learning_curve --storage sqlite:///bench-state/r56-search.db \\
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

import optuna
from optuna.trial import TrialState

from autoprune.studies.report import learning_markdown, learning_windows
from benchmarks.common import write_results

MARKS = (100, 200, 300, 400)


def curve(study: optuna.Study, window: int) -> dict:
    """A study's learning curve (:func:`~autoprune.studies.report.learning_windows`) and the best
    score it had reached after each of :data:`MARKS` episodes (trial order, portfolio included)."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    scores = [t.user_attrs["accuracy"] if t.state == TrialState.COMPLETE and "policy" in t.user_attrs else None
              for t in trials]
    marks = {m: max(s for s in scores[:m] if s is not None) for m in MARKS
             if len(scores) >= m and any(s is not None for s in scores[:m])}
    return {"study": study.study_name, "episodes": len(trials), "windows": learning_windows(study, window),
            "best_at": marks}


def table(result: dict) -> str:
    marks = ", ".join(f"{m}: {v:.4f}" for m, v in result["best_at"].items())
    return "\n".join([f"**{result['study']}** ({result['episodes']} episodes)", "",
                      *learning_markdown(result["windows"]), "",
                      f"best score after {marks}" if marks else "fewer than 100 episodes"])


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
        write_results(args.out, {"args": vars(args), "studies": results})


if __name__ == "__main__":
    main()
