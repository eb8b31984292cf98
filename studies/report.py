"""Reports on studies: the table of studies, and a study's CSV, markdown summary and plots.

The plots put a study next to its *siblings*: studies in the same storage that searched the same
task and scored it the same way (the record fields marked ``sibling``: model, weights, data, split,
budget, granularity, importance, reconstruction, ...), so a searched policy is shown against the
one-shot baselines and other searchers evaluated the same way.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from autoprune.errors import AutopruneError
from autoprune.evaluate.metrics import proxy_label
from autoprune.studies.export import policy_document
from autoprune.studies.records import (
    SearchSpec,
    StudyRecord,
    best_rule_trial,
    best_trial,
    completed,
    is_finite,
    pareto_front,
)
from autoprune.studies.storage import open_storage

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from autoprune.cost.budget import Budget

log = logging.getLogger(__name__)

BASELINES = ("uniform", "global", "erk", "lamp")


def list_studies(storage_url: str) -> list[dict]:
    """One row per study: name, searcher, model, dataset, budget, trials and the best result."""
    storage = open_storage(storage_url)
    rows = []
    try:
        frozen = storage.get_all_studies()
    except Exception as err:
        raise AutopruneError(f"cannot read studies from {storage_url}: {str(err).splitlines()[0][:200]}") \
            from None
    for fs in frozen:
        study = optuna.load_study(study_name=fs.study_name, storage=storage)
        try:
            record = StudyRecord.of(study)
            searcher, model = record.search.searcher, record.task.model
            dataset, budget = record.task.dataset, record.search.budget
        except AutopruneError:  # a study some other tool made in the same storage
            searcher = model = dataset = budget = "-"
        done = completed(study)
        best = best_trial(study, done) if done and "policy" in done[0].user_attrs else None
        rows.append({
            "study": fs.study_name, "searcher": searcher, "model": model, "dataset": dataset, "budget": budget,
            "trials": len(done), "all_trials": len(study.trials),
            "best_reward": best.user_attrs.get("reward") if best else None,
            "best_accuracy": best.user_attrs.get("accuracy") if best else None,
            "best_trial": best.number if best else None,
        })
    return rows


def format_studies(rows: list[dict]) -> str:
    if not rows:
        return "no studies"
    df = pd.DataFrame(rows)
    df["trials"] = [f"{r['trials']}/{r['all_trials']}" for r in rows]
    df["best_reward"] = [f"{v:+.4f}" if v is not None else "-" for v in df["best_reward"]]
    df["best_accuracy"] = [f"{v:.2%}" if v is not None else "-" for v in df["best_accuracy"]]
    df["best_trial"] = [str(int(v)) if pd.notna(v) else "-" for v in df["best_trial"]]
    return df.drop(columns=["all_trials"]).to_string(index=False)


def siblings(study: optuna.Study, storage_url: str) -> list[optuna.Study]:
    """Studies in ``storage_url`` that searched the same task as ``study`` (itself included)."""
    storage = open_storage(storage_url)
    mine = StudyRecord.of(study)
    out = []
    for fs in storage.get_all_studies():
        if fs.study_name == study.study_name:
            out.append(study)
        elif mine.sibling_of(fs.user_attrs):
            out.append(optuna.load_study(study_name=fs.study_name, storage=storage))
    return out


def _searcher(study: optuna.Study) -> str:
    found, name = SearchSpec.lookup(study.user_attrs, "searcher")
    return name if found else study.study_name


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: outcome, costs and every unit's achieved sparsity."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        row = {"number": t.number, "state": t.state.name, "searcher": a.get("searcher"),
               "reward": a.get("reward"), "proxy_accuracy": a.get("accuracy"),
               "within_budget": a.get("within_budget"), "seconds": a.get("seconds"),
               "retry_of": a.get("retry_of")}
        row.update({f"{k}_ratio": v for k, v in (a.get("ratios") or {}).items()})
        row.update({f"agent_{k}": v for k, v in (a.get("agent") or {}).items()})
        row.update({f"s/{k}": v for k, v in (a.get("policy") or {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


AGENT_KEYS = ("critic_loss", "actor_loss", "sigma", "baseline")


def learning_windows(study: optuna.Study, window: int) -> list[dict]:
    """Does the search learn? Per window of ``window`` episodes, in trial order: how many completed,
    their mean and best proxy score, the best so far, and ``policy_step``, how far each episode's
    policy moved from the one before (mean absolute difference of the unit sparsities: how much
    the searcher still explores). Where an RL agent recorded its learning (``agent``), the window's
    mean critic and actor loss, exploration sigma and reward baseline too."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    scores, policies = [], []
    for t in trials:
        done = t.state == TrialState.COMPLETE and "policy" in t.user_attrs
        scores.append(t.user_attrs["accuracy"] if done else None)
        policies.append(np.array(list(t.user_attrs["policy"].values())) if done else None)
    rows, best = [], None
    for start in range(0, len(trials), window):
        idx = range(start, min(start + window, len(trials)))
        got = [scores[i] for i in idx if scores[i] is not None]
        if got:
            best = max(got) if best is None else max(best, *got)
        steps = [float(np.abs(policies[i] - policies[i - 1]).mean()) for i in idx
                 if i > 0 and policies[i] is not None and policies[i - 1] is not None]
        row = {"episodes": f"{start + 1}-{idx[-1] + 1}", "complete": len(got),
               "mean": float(np.mean(got)) if got else None, "best_in_window": max(got, default=None),
               "best_so_far": best, "policy_step": float(np.mean(steps)) if steps else None}
        agent = [trials[i].user_attrs["agent"] for i in idx if "agent" in trials[i].user_attrs]
        for key in AGENT_KEYS:
            values = [a[key] for a in agent if key in a]
            if values:
                row[key] = float(np.mean(values))
        rows.append(row)
    return rows


def learning_markdown(rows: list[dict], label: str = "proxy score") -> list[str]:
    """:func:`learning_windows` as a markdown table."""
    def cell(x, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    agent = [k for k in AGENT_KEYS if any(k in r for r in rows)]
    head = (f"| episodes | complete | mean {label} | best in window | best so far | policy step |"
            + "".join(f" {k.replace('_', ' ')} |" for k in agent))
    lines = [head, "|" + "---|" * (6 + len(agent))]
    for r in rows:
        lines.append(f"| {r['episodes']} | {r['complete']} | {cell(r['mean'], '.2%')} | "
                     f"{cell(r['best_in_window'], '.2%')} | {cell(r['best_so_far'], '.2%')} | "
                     f"{cell(r['policy_step'], '.3f')} |" + "".join(f" {cell(r.get(k), '.4g')} |" for k in agent))
    return lines


def _scatter_points(study: optuna.Study, metric: str):
    trials = [t for t in completed(study) if is_finite(t) and "ratios" in t.user_attrs]
    return ([t.user_attrs["ratios"][metric] for t in trials],
            [t.user_attrs["accuracy"] for t in trials], trials)


def _labels(sibs: list[optuna.Study], study: optuna.Study) -> dict[str, str]:
    """Legend text per study: its searcher, and its name too where one searcher ran several studies."""
    searchers = [_searcher(s) for s in sibs]
    out = {}
    for sib, searcher in zip(sibs, searchers):
        label = searcher if searchers.count(searcher) == 1 else f"{searcher}: {sib.study_name}"
        out[sib.study_name] = label + (" (this study)" if sib.study_name == study.study_name else "")
    return out


def write_report(study: optuna.Study, out_dir: str | Path, storage_url: str) -> dict[str, Path]:
    """Write trials.csv, summary.md and the PNG plots for ``study`` (in ``storage_url``, where its
    siblings are looked for) into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no window, and no display needed

    from autoprune.export.artifacts import OutputDir

    if not completed(study) or "policy" not in completed(study)[0].user_attrs:
        raise AutopruneError(f"study {study.study_name!r} has no complete autoprune trial to report on")
    record = StudyRecord.of(study)
    budget = record.search.env.parsed_budget
    sibs = siblings(study, storage_url)
    labels = _labels(sibs, study)
    best = best_trial(study)
    with OutputDir(out_dir) as tmp:
        trials_frame(study).to_csv(tmp / "trials.csv", index=False)
        _save(_accuracy_vs_cost(study, record, budget, sibs, labels), tmp / "accuracy_vs_cost.png")
        _save(_policy_bars(study, best, sibs), tmp / "policy.png")
        _save(_rewards(record, sibs, labels), tmp / "reward.png")
        (tmp / "summary.md").write_text(summary_markdown(study, best, sibs))
    return {name: Path(out_dir) / name
            for name in ("trials.csv", "accuracy_vs_cost.png", "policy.png", "reward.png", "summary.md")}


def _save(fig: Figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _accuracy_vs_cost(study: optuna.Study, record: StudyRecord, budget: Budget, sibs: list[optuna.Study],
                      labels: dict[str, str]) -> Figure:
    """Proxy accuracy against cost for every sibling study, this study's Pareto front, the
    baselines marked and the budget drawn."""
    import matplotlib.pyplot as plt

    metric = budget.metric
    fig, ax = plt.subplots(figsize=(9, 5))
    for sib in sibs:
        name = _searcher(sib)
        xs, ys, _ = _scatter_points(sib, metric)
        if name in BASELINES:
            ax.scatter(xs, ys, marker="*", s=220, edgecolor="black", zorder=5, label=f"{name} (baseline)")
        else:
            ax.scatter(xs, ys, s=14, alpha=0.55, label=labels[sib.study_name])
    _, _, trials = _scatter_points(study, metric)
    front = pareto_front(trials, metric)
    ax.plot([t.user_attrs["ratios"][metric] for t in front], [t.user_attrs["accuracy"] for t in front],
            "k--", lw=1, label="Pareto front (this study)")
    if budget.ratio:
        ax.axvline(budget.ratio, color="red", lw=1, ls=":", label=f"budget {budget}")
    ax.set_xlabel(f"{metric} ratio (pruned / dense)")
    ax.set_ylabel("proxy accuracy (search-val, after BN recalibration)")
    ax.set_title(f"{record.task.model} on {record.task.dataset}: accuracy against cost")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    return fig


def _policy_bars(study: optuna.Study, best, sibs: list[optuna.Study]) -> Figure:
    """The best policy's per-unit sparsity (AMC's figure), the uniform baseline's beside it."""
    import matplotlib.pyplot as plt

    names = list(best.user_attrs["policy"])
    values = [best.user_attrs["policy"][n] for n in names]
    fig, ax = plt.subplots(figsize=(max(7, 0.28 * len(names)), 4.5))
    ax.bar(range(len(names)), values, color="tab:blue", label=f"trial {best.number}")
    uniform = _baseline_policy(sibs, "uniform")
    if uniform:
        ax.plot(range(len(names)), [uniform.get(n, float("nan")) for n in names], "r_", ms=12, mew=2,
                label="uniform baseline")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("sparsity (fraction removed)")
    ax.set_ylim(0, 1)
    ax.set_title(f"best policy: {study.study_name}, proxy acc {best.user_attrs['accuracy']:.2%}")
    ax.legend(fontsize=8)
    return fig


def _rewards(record: StudyRecord, sibs: list[optuna.Study], labels: dict[str, str]) -> Figure:
    """Reward over episodes per sibling study: every episode, and the best so far."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for sib in sibs:
        done = [t for t in completed(sib) if is_finite(t) and "reward" in t.user_attrs]
        if len(done) < 2:
            continue
        rewards = [t.user_attrs["reward"] for t in done]
        running = pd.Series(rewards).cummax()
        line = ax.plot(range(len(rewards)), running, lw=2, label=f"{labels[sib.study_name]} (best so far)")[0]
        ax.scatter(range(len(rewards)), rewards, s=8, alpha=0.35, color=line.get_color())
    ax.set_xlabel("episode")
    ax.set_ylabel(f"reward ({record.search.env.reward})")
    ax.set_title("reward over episodes")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    return fig


def _baseline_policy(sibs, name: str) -> dict | None:
    for sib in sibs:
        if _searcher(sib) == name and completed(sib):
            return completed(sib)[0].user_attrs.get("policy")
    return None


def _rule_line(study: optuna.Study, best, label: str) -> list[str]:
    """How far past the best one-shot rule of its portfolio the search got."""
    rule = best_rule_trial(study)
    if rule is None:
        return []
    gain = 100 * (best.user_attrs["accuracy"] - rule.user_attrs["accuracy"])
    return [f"- best one-shot rule: {rule.user_attrs['rule']} (trial {rule.number}), {label} "
            f"{rule.user_attrs['accuracy']:.2%}; the best trial is {gain:+.2f} points past it", ""]


def summary_markdown(study: optuna.Study, best, sibs) -> str:
    r = StudyRecord.of(study)
    task, fp, search = r.task, r.fingerprint, r.search
    doc = policy_document(study, best)
    dense = f"{fp.dense_score:.2%}" if fp.dense_score is not None else "-"
    label = proxy_label(task.proxy)
    lines = [f"# {study.study_name}", "",
             f"- model `{task.model}`, weights `{fp.weights}`",
             f"- data `{task.dataset}` ({fp.data}), split seed {task.seed}, "
             f"search-val {fp.search_val_images} images",
             f"- budget **{search.budget}**, granularity {task.granularity}, importance "
             f"{task.importance}, reconstruction {task.reconstruct}, proxy {task.proxy}, reward {search.env.reward}, "
             f"searcher {search.searcher}",
             f"- dense {label} {dense}",
             f"- trials: {len(completed(study))} complete of {len(study.trials)} "
             f"({sum(t.state == TrialState.FAIL for t in study.trials)} failed)", "",
             *_rule_line(study, best, label),
             "## Best trial", "",
             f"trial {best.number}: {label} **{best.user_attrs['accuracy']:.2%}**, reward "
             f"{best.user_attrs['reward']:+.4f}, cost ratios "
             + ", ".join(f"{k} {v:.3f}" for k, v in best.user_attrs["ratios"].items()), "",
             "| unit | sparsity | kept |", "|---|---|---|"]
    lines += [f"| {u['name']} | {u['sparsity']:.3f} | {u['kept']} |" for u in doc["units"]]
    if any("agent" in t.user_attrs for t in study.trials):  # an RL agent: is it learning?
        window = max(5, -(-len(study.trials) // 10))
        lines += ["", "## Learning", "",
                  f"Per {window} episodes: scores, how far each policy moved from the last, and the agent's "
                  "losses, exploration sigma and reward baseline.", "",
                  *learning_markdown(learning_windows(study, window), label)]
    lines += ["", "## Same task, other searchers (this storage)", "",
              f"| study | searcher | trials | best {label} | best reward |", "|---|---|---|---|---|"]
    for sib in sibs:
        b = best_trial(sib)
        if b is None:
            continue
        lines.append(f"| {sib.study_name} | {_searcher(sib)} | {len(completed(sib))} | "
                     f"{b.user_attrs['accuracy']:.2%} | {b.user_attrs['reward']:+.4f} |")
    lines += ["", "Plots: `accuracy_vs_cost.png`, `policy.png`, `reward.png`; every trial: `trials.csv`.",
              "", "```", json.dumps({"command": r.run.command, "versions": r.run.versions}, indent=1),
              "```", ""]
    return "\n".join(lines)


def serve_dashboard(storage_url: str, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve optuna-dashboard on ``storage_url`` until interrupted (loopback unless told otherwise)."""
    from optuna_dashboard import run_server

    storage = open_storage(storage_url)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("warning: the dashboard has no authentication and listens on %s; anyone who can "
                    "reach this port can read and annotate the studies", host)
    log.warning("optuna-dashboard on %s: http://%s:%s/ (Ctrl-C to stop)", storage_url, host, port)
    try:
        run_server(storage, host=host, port=port)
    except OSError as err:
        raise AutopruneError(f"cannot serve the dashboard on {host}:{port}: {err.strerror}") from None
