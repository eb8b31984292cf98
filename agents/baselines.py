"""One-shot baselines: classic per-layer allocations, evaluated through the same env.

Each picks every unit's sparsity from one global knob, found by bisection so the policy meets the
budget, then plays it as a single episode (through the action wall and the same evaluation as any
search), so comparisons are like for like.

* ``uniform``: the same sparsity everywhere (the hand-tuned ratio users would otherwise use).
* ``uncoupled``: the same sparsity for every unit that prunes one conv's outputs only (no add
  ties them to another layer's), coupled groups kept whole; where that cannot meet the budget,
  coupled groups are pruned too, uniformly, by what is left. On residual networks this is the
  expert's rule (prune block-inner convs, keep the residual stream).
* ``global``: one magnitude threshold across the network, on each channel's mean |w| over the
  coupled layers (each weight's |w| for unstructured units).
* ``erk``: Erdos-Renyi-Kernel densities (Evci et al. 2020), density ~ (sum of dims) / (product).
* ``lamp``: one threshold on LAMP scores (Lee et al. 2021), w^2 over the sum of w^2 of every
  element at least as large in the same unit.
* ``knapsack``: HALP's idea (Shen et al. 2022) as a greedy knapsack: starting whole, repeatedly
  take one width step off the unit whose next elements cost the least importance (their LAMP
  scores, so units compare) per unit of the budget's cost they save, as the budget's own cost
  model prices them: the latency table for latency budgets, so it spends channels where the
  runtime's latency steps down, the closed-form FLOPs for FLOPs budgets. Under several budgets
  a step saves the sum, over the budgets not yet met, of its cost cut in units of each budget.
* ``knapsack-stage``: the knapsack over the stage space (:mod:`autoprune.envs.space`): the
  residual stream whole, each step one width off every block-inner conv of one stage.

Every rule meets every budget of a search with several (``0.5flops,0.75latency``): a rule's knob
is bisected until the policy meets them all, and the wall plays it. Under a latency budget each
rule's policy is then widened into the slack the bisection left (:func:`filled`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import optuna

from autoprune.agents.base import SEARCHERS, Episode, Searcher, run_policy
from autoprune.envs import LayerSparsityEnv, Stop
from autoprune.envs.budget_check import LATENCY_TOLERANCE
from autoprune.envs.space import COUPLED, SearchSpace


def _targets(env: LayerSparsityEnv, aim: float) -> np.ndarray:
    """What each budget's cost over the budget (:meth:`LayerSparsityEnv.over`) may reach: ``aim``
    for the primary budget, 1 for the extra ones."""
    targets = np.ones(1 + len(env.extra))
    targets[0] = aim
    return targets + 1e-9


def _meets(env: LayerSparsityEnv, sparsity: np.ndarray, aim: float = 1.0) -> bool:
    # as the env will play it: each unit in its range, units that share a sparsity at their leader's
    kept = env.table.kept_all(np.clip(sparsity, env.space.low, env.space.high)[env.space.leader])
    return bool(np.all(np.asarray(env.over(kept)) <= _targets(env, aim)))


def _bisect(env: LayerSparsityEnv, policy_of: Callable[[float], np.ndarray], lo: float, hi: float,
            aim: float = 1.0, iters: int = 60) -> np.ndarray:
    """Smallest knob in [lo, hi] whose policy meets ``aim`` of the budget and every extra budget
    (policies grow sparser with it)."""
    if _meets(env, policy_of(lo), aim):
        return _playable(env, policy_of(lo))
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if _meets(env, policy_of(mid), aim):
            hi = mid
        else:
            lo = mid
    return _playable(env, policy_of(hi))


def _playable(env: LayerSparsityEnv, sparsity: np.ndarray, space: SearchSpace | None = None) -> np.ndarray:
    """The policy as the env will play it: each unit's request moved to the middle of the width it
    keeps. Bisection ends just past a rounding step, where the float32 action the env takes can
    round the other way, to a width over budget that the wall then cuts from the last units."""
    space = space or env.space
    low, high = space.low, space.high
    asked = np.clip(sparsity, low, high)
    kept = env.table.kept_all(asked[space.leader])
    centre = np.array([env.table.achieved(u, int(k)) for u, k in enumerate(kept)])
    inside = (centre >= low) & (centre <= high) & (asked > 0)  # a unit left whole stays at 0
    return np.where(inside, centre, asked)


def uniform_policy(env: LayerSparsityEnv, aim: float = 1.0) -> np.ndarray:
    """The least uniform sparsity that meets ``aim`` of the budget (max_sparsity if none below
    does), each unit held to its range."""
    n = env.n_units
    return _bisect(env, lambda s: np.full(n, s), env.config.min_sparsity, env.config.max_sparsity, aim)


def _element_scores(env: LayerSparsityEnv, squared: bool) -> list[np.ndarray]:
    """Per unit, each element's magnitude: mean |w| (or sum of w^2) over the weights it owns, a
    channel's across its coupled layers, a single weight's its own."""
    stats = env.table.strategy.weight_stats(env.table, env.task.dense)
    return [sums[1] if squared else sums[0] / counts for sums, counts in stats]


def _threshold_policy(env: LayerSparsityEnv, scores: list[np.ndarray], aim: float = 1.0) -> np.ndarray:
    """Bisect one global threshold over per-unit element scores (lower scores are removed)."""
    sorted_scores = [np.sort(s) for s in scores]
    sizes = np.array([len(s) for s in scores], dtype=np.float64)

    def policy(log_tau: float) -> np.ndarray:
        tau = np.exp(log_tau)
        return np.array([np.searchsorted(s, tau) for s in sorted_scores]) / sizes

    everything = np.concatenate(scores)
    positive = everything[everything > 0]
    lo = np.log(positive.min()) - 1 if positive.size else -30.0
    hi = np.log(everything.max()) + 1 if everything.max() > 0 else 0.0
    return _bisect(env, policy, lo, hi, aim)


def lamp_scores(scores: list[np.ndarray]) -> list[np.ndarray]:
    """LAMP: each squared magnitude over the sum of those at least as large in its unit."""
    out = []
    for s in scores:
        order = np.argsort(s, kind="stable")
        sorted_s = s[order]
        tail = np.cumsum(sorted_s[::-1])[::-1]  # sum of elements >= each, in sorted order
        lamp = np.empty_like(s)
        lamp[order] = sorted_s / np.maximum(tail, 1e-30)
        out.append(lamp)
    return out


class Baseline(Searcher):
    """A deterministic one-shot policy (see module docstring)."""

    uses_trial = False
    one_shot = True

    def policy(self, env: LayerSparsityEnv, aim: float = 1.0) -> np.ndarray:
        """The rule's requested per-unit sparsities for ``env``, its knob bisected until the
        policy meets ``aim`` of the budget (the primary one; extra budgets in full): below 1 to
        aim where the wall aims (:func:`to_aim`)."""
        raise NotImplementedError

    def space(self, env: LayerSparsityEnv) -> SearchSpace | None:
        """The space the rule takes its steps in where it is not the search's (``env.space``):
        the rule's policy is filled in it first (:func:`filled`). None: the search's."""
        return None

    def episode(self, env: LayerSparsityEnv, trial: optuna.Trial, stop: Stop | None = None) -> Episode:
        return run_policy(env, rule_policy(env, self))


def to_aim(env: LayerSparsityEnv) -> float:
    """Where the wall aims, as a fraction of the budget: below 1 by a latency budget's margin (and
    as the measured episodes scale the table's predictions), 1 for budgets it meets exactly.

    A rule's knob is bisected to this aim, not to the budget: a policy bisected to the budget
    lands over the aim, and the wall cuts what is over from the last units it decides, a cut no
    rule makes. ResNet-56's ``uncoupled`` rule at 0.6latency on ONNX Runtime (batch 64), its
    request of the budget cut to the wall's aim then filled: 67.33 % on test (predicted 0.586);
    bisected to the aim and filled: 73.92 % (predicted 0.585; BENCHMARKS.md).
    """
    return env.wall.aim / env.budget.ratio if env.budget.metric == "latency" else 1.0


def rule_policy(env: LayerSparsityEnv, rule: str | Baseline, fraction: float = 1.0) -> np.ndarray:
    """A one-shot rule's requested per-unit sparsities as a search plays it: its knob bisected to
    ``fraction`` of the wall's aim (:func:`to_aim`), the policy then filled into the slack left
    below the aim (:func:`filled`). ``rule`` is a registered rule's name or an instance."""
    searcher = SEARCHERS.get(rule)() if isinstance(rule, str) else rule
    policy = searcher.policy(env, fraction * to_aim(env))
    return np.asarray(filled(env, policy, searcher.space(env)), dtype=np.float64)


def filled(env: LayerSparsityEnv, sparsity: np.ndarray, space: SearchSpace | None = None) -> np.ndarray:
    """Under a latency budget, ``sparsity`` with units widened into what it leaves of the wall's
    aim (:meth:`~autoprune.envs.wall.ActionWall.fill`). A rule's one knob, bisected over coarse
    widths (the latency table's under ``round_to auto``), can stop well short of its budget:
    ResNet-56's ``uncoupled`` rule at 0.75latency on ONNX Runtime (batch 64) predicted 0.647
    against an aim of 0.688. Other budgets are met exactly by the bisection: their policies are
    returned as they are.

    A rule whose steps are taken in another ``space`` (``knapsack-stage``: a stage's inner convs
    at a time) is widened in that space first, whole groups, then unit by unit in the search's.
    ResNet-56 at 0.7 of dense latency (ONNX Runtime, batch 1), the stage knapsack played again at
    its own measured ratio: its stage inner convs at (4, 16, 32), widened a stage at a time to
    (4, 16, 48), tested 87.18 % at 0.679 of dense; widened a conv at a time it had stopped at
    stage 3's inner convs at 32 and 48, 84.71-85.03 % at 0.66-0.69 (BENCHMARKS.md)."""
    if env.budget.metric != "latency":
        return sparsity
    kept = env.feasible_policy(sparsity)
    if space is not None:
        kept = env.wall.fill(kept, space.groups)
    kept = env.wall.fill(kept, env.space.groups)
    return _playable(env, np.array([env.table.achieved(u, int(k)) for u, k in enumerate(kept)]))


@SEARCHERS.register("uniform", help="the same sparsity for every unit, the least that meets the budget")
class Uniform(Baseline):
    name = "uniform"

    def policy(self, env, aim=1.0):
        return uniform_policy(env, aim)


def uncoupled_units(env: LayerSparsityEnv) -> np.ndarray:
    """Mask of units whose elements belong to one conv/linear layer only (no add or concat couples
    them to another)."""
    return ~env.table.coupled()


def uncoupled_policy(env: LayerSparsityEnv, aim: float = 1.0) -> np.ndarray:
    """The ``uncoupled`` rule's sparsities (see module docstring)."""
    free = uncoupled_units(env)
    top = env.config.max_sparsity

    def policy(knob: float) -> np.ndarray:  # [0, top]: uncoupled units; (top, 2 top]: coupled ones too
        return np.where(free, min(knob, top), max(0.0, knob - top))

    return _bisect(env, policy, env.config.min_sparsity, 2 * top, aim)


@SEARCHERS.register("uncoupled", help="uniform over units no add or concat couples; coupled groups kept whole")
class Uncoupled(Baseline):
    name = "uncoupled"

    def policy(self, env, aim=1.0):
        return uncoupled_policy(env, aim)


@SEARCHERS.register("global", help="one global magnitude threshold across all units")
class GlobalMagnitude(Baseline):
    name = "global"

    def policy(self, env, aim=1.0):
        return _threshold_policy(env, _element_scores(env, squared=False), aim)


@SEARCHERS.register("lamp", help="one global threshold on LAMP scores (layer-adaptive magnitude)")
class LAMP(Baseline):
    name = "lamp"

    def policy(self, env, aim=1.0):
        return _threshold_policy(env, lamp_scores(_element_scores(env, squared=True)), aim)


@SEARCHERS.register("erk", help="Erdos-Renyi-Kernel densities scaled to meet the budget")
class ERK(Baseline):
    name = "erk"

    def policy(self, env, aim=1.0):
        raw = []
        for u in env.table.units:
            lay = u.layer
            k = lay.kernel if lay.kind != "linear" else 1
            dims = [lay.in_channels, lay.out_channels] + ([k, k] if lay.kind != "linear" else [])
            raw.append(sum(dims) / float(np.prod(dims)))
        raw = np.asarray(raw) / max(raw)

        def policy(log_eps: float) -> np.ndarray:
            return 1.0 - np.minimum(1.0, np.exp(-log_eps) * raw / raw.min())

        return _bisect(env, policy, -1e-9, 20.0, aim)


def _width_steps(env: LayerSparsityEnv, space: SearchSpace, u: int, kept: int) -> int | None:
    """Unit ``u``'s next narrower width from ``kept`` (its next level, else one width step of
    ``round_to``, or 2 % of a unit of single weights), or ``None`` at its floor."""
    table = env.table
    floor = table.kept(u, space.high[u])
    if table.levels is not None:
        lower = [k for k, _ in table.levels[u] if floor <= k < kept]
        return max(lower) if lower else None
    step = table.multiple if table.strategy.rounded else max(1, int(np.ceil(0.02 * table.units[u].size)))
    nxt = table.kept(u, table.achieved(u, max(kept - step, 0)))
    if nxt >= kept:
        nxt = kept - step
    return nxt if nxt >= floor else None


def knapsack_policy(env: LayerSparsityEnv, aim: float = 1.0, space: SearchSpace | None = None) -> np.ndarray:
    """The ``knapsack`` rule's sparsities (see module docstring), its steps taken in ``space``
    (default: ``env``'s; the per-unit policy it returns can be played in any space)."""
    table, space, n = env.table, space or env.space, env.n_units
    lamp = lamp_scores(_element_scores(env, squared=True))
    ranks = env.task.ranks
    # the importance of removing the first k elements of each unit's removal order, for every k
    spent = [np.concatenate([[0.0], np.cumsum(lamp[u][ranks[u]])]) for u in range(n)]
    members = space.groups
    kept = table.kept_all(space.low[space.leader])
    over = env.over(kept)  # each budget's cost over the budget (several budgets: all are met)
    targets = _targets(env, aim)
    while any(o > t for o, t in zip(over, targets)):
        best, best_price, best_over = None, np.inf, over
        for lead, group in members.items():
            nxt = _width_steps(env, space, lead, int(kept[lead]))
            if nxt is None:
                continue
            trial = kept.copy()
            trial[group] = [table.kept(u, table.achieved(lead, nxt)) for u in group]
            after = env.over(trial)
            # what the step saves of the budgets not yet met, each in units of its budget
            saved = sum(a - b for a, b, t in zip(over, after, targets) if a > t)
            lost = sum(spent[u][table.units[u].size - trial[u]] - spent[u][table.units[u].size - kept[u]]
                       for u in group)
            price = lost / saved if saved > 0 else np.inf
            if price < best_price or best is None:
                best, best_price, best_over = trial, price, after
        if best is None:  # every unit at its floor: the wall takes it from here
            break
        kept, over = best, best_over
    return _playable(env, np.array([table.achieved(u, int(k)) for u, k in enumerate(kept)]), space)


@SEARCHERS.register("knapsack", help="greedy knapsack: the least LAMP importance per unit of budget cost saved")
class Knapsack(Baseline):
    name = "knapsack"

    def policy(self, env, aim=1.0):
        return knapsack_policy(env, aim)


def stage_space(env: LayerSparsityEnv) -> SearchSpace:
    """The stage space of ``env``'s model and ranges (:mod:`autoprune.envs.space`): units an add
    ties across layers kept whole, each stage's other units at one sparsity. The user's ranges
    and shares come first where they say otherwise."""
    c = env.config
    return SearchSpace.build(env.table, c.min_sparsity, c.max_sparsity, (f"{COUPLED}=0", *c.ranges),
                             (*c.share, "stage"))


@SEARCHERS.register("knapsack-stage",
                    help="the knapsack over the stage space: residual stream whole, one width per stage's inner convs")
class StageKnapsack(Baseline):
    """The ``knapsack`` rule over the stage space (:func:`stage_space`): each step takes one width
    off every block-inner conv of one stage, so the rule trades stages, not single convs, and
    leaves the residual stream whole. Played in a search of any space: where it searches the stage
    space already, this is ``knapsack`` and the portfolio plays it once.

    On the free space the knapsack prices one conv at a time, and the latency table's fit error
    is larger than what one conv's step saves; priced a stage at a time the steps are large
    enough to be priced right. ResNet-56 at 0.7 of dense latency (ONNX Runtime, batch 1, channel
    block 16): TPE over the stage space ended on this rule's policy, stage 1's inner convs at 4
    of 16, stage 2's at 16 of 32, stage 3's at 48 of 64: 87.18 % on test at 0.680 of dense,
    where the best free-space rule at or under that latency tested 84.71 % (BENCHMARKS.md)."""

    name = "knapsack-stage"

    def policy(self, env, aim=1.0):
        return knapsack_policy(env, aim, self.space(env))

    def space(self, env):
        return stage_space(env)


# The one-shot rules every search starts from, in the order they are played. A latency search
# opens with the knapsack, the one rule that prices widths by the latency table; so does a search
# over masks, where LAMP scores compare layers as LAMP was made to (ResNet-56 at 1:4's FLOPs, N:M:
# 83.70 % on test against 82.70 % for the next rule, BENCHMARKS.md). Over coupled channels the
# knapsack cuts the residual stream first (ResNet-56 at 0.5flops: 54.64 % against the uncoupled
# rule's 84.01 %), so channel FLOPs searches leave it out; the knapsack over the stage space keeps
# the stream whole and plays in every search (ResNet-56 at 0.5flops: 85.07 %, each stage's inner
# convs at 7, 16 and 35 where ``uncoupled`` keeps 8, 16 and 31).
PORTFOLIO = ("uncoupled", "uniform", "knapsack-stage", "lamp", "erk", "global")
LATENCY_PORTFOLIO = ("knapsack", *PORTFOLIO)


# The fractions of the wall's aim the best rule is bisected to again once the portfolio has
# played (:func:`at_aims`). The first is the rule at the aim the search searches at (where the
# measured rules moved it); below it the fill has room to reshape the rule. ResNet-56's
# ``uncoupled`` rule on ONNX Runtime (batch 64), aimed at 0.599 of dense: bisected to the aim,
# every inner conv sits at its floor and the residual stream stays whole, nothing is left to
# fill, 58.10 % on test; bisected to 0.97 of it, it cuts the stream a little and the fill widens
# the inner convs with what that saves, 75.25 % (0.94: 72.47 %; the proxy orders all three as
# test does; BENCHMARKS.md).
RULE_AIMS = (1.0, 0.97, 0.94)


def at_aims(env: LayerSparsityEnv, rule: str, besides: list[np.ndarray] | None = None,
            aims: tuple[float, ...] = RULE_AIMS) -> list[tuple[float, np.ndarray]]:
    """``rule``'s policy with its knob bisected to each fraction of ``aims`` of the wall's aim and
    filled back up to the aim (:func:`filled`), as ``(fraction, requested sparsities)``, in the
    order of ``aims``: those that play widths other than each other's and the kept widths of
    ``besides`` (policies played already). Empty for budgets that are met exactly (not latency):
    they leave nothing to fill."""
    if env.budget.metric != "latency":
        return []
    seen = [np.asarray(k, dtype=np.int64) for k in besides or []]
    out: list[tuple[float, np.ndarray]] = []
    for fraction in aims:
        policy = rule_policy(env, rule, fraction)
        kept = env.feasible_policy(policy)
        if not any(np.array_equal(kept, k) for k in seen):
            seen.append(kept)
            out.append((fraction, policy))
    return out


def best_rule_replays(env: LayerSparsityEnv, study: optuna.Study, rule: str, episode: Episode, room: int
                      ) -> list[tuple[str, float, np.ndarray, float]]:
    """What a search plays after the portfolio's last rule (``rule``, just played as ``episode``,
    not yet told to ``study``): rules played again, each aimed by its own first play's measured
    over predicted latency (``scale``, :meth:`LayerSparsityEnv.aimed_by`), as ``(rule, fraction,
    requested sparsities, scale)``, at most ``room``. Only latency budgets that fill get any;
    widths a rule has played already are not played again.

    The best rule by reward is played again at the aim and a little below it (:func:`at_aims`)
    wherever its own ratio is not the table's; each other rule, best reward first, once at the
    aim, where its first play ran over the budget (beyond :data:`LATENCY_TOLERANCE`) or its own
    ratio would fill it by more than that (:func:`own_scale`). The best rule's knob moves it in
    steps that room under the tolerance can still hold: ResNet-56's ``knapsack-stage`` at 0.7 of
    dense (ONNX Runtime, batch 1) once measured 0.664 for 0.690 predicted, 2.9 % under the aim,
    and was not played again; aimed by that ratio (0.962), bisected to 0.97 of the aim and
    widened a stage at a time it keeps stage 3's inner convs at 48, not 32 (the policy that
    tested 87.18 %, BENCHMARKS.md). One scale for every policy, the median of the episodes', cannot
    price them all: ResNet-56's batch-1 table on ONNX Runtime's channel block priced the
    ``uncoupled`` rule's first play at 0.573 of dense and it measured 0.516, while ``uniform``
    measured 0.588 for 0.574; aimed by their median, ``uniform`` played again measured 0.641 (over
    a 0.6 budget), ``uncoupled`` was never filled, and DDPG's pick tested 2.76 points under
    ``uncoupled`` filled to its latency (BENCHMARKS.md).
    """
    if (room <= 0 or env.budget.metric != "latency" or not env.config.latency_fill
            or episode.outcome.latency is None):
        return []
    played = [(t.user_attrs["reward"], t.user_attrs["rule"], t.user_attrs["widths"],
               t.user_attrs.get("ratios", {}).get("latency"))
              for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
              if "rule" in t.user_attrs and "reward" in t.user_attrs]
    played.append((episode.reward, rule, episode.outcome.widths, episode.outcome.ratios.get("latency")))
    seen = [np.asarray(w, dtype=np.int64) for _, _, w, _ in played]
    out: list[tuple[str, float, np.ndarray, float]] = []
    for i, (_, name, widths, measured) in enumerate(sorted(played, key=lambda p: -p[0])):
        scale = own_scale(env, widths, measured, best=i == 0)
        if scale is None:
            continue
        with env.aimed_by(scale):
            for fraction, policy in at_aims(env, name, besides=seen, aims=RULE_AIMS if i == 0 else (1.0,)):
                out.append((name, fraction, policy, scale))
                seen.append(env.feasible_policy(policy))
    return out[:room]


def own_scale(env: LayerSparsityEnv, widths, measured: float | None, best: bool = False) -> float | None:
    """The measured over predicted latency of a policy of ``widths`` that measured ``measured``
    (a fraction of dense), where the wall aimed by it would play that policy's family otherwise
    than it did: the policy ran over the budget (beyond :data:`LATENCY_TOLERANCE`), or that ratio
    would fill it by more than the tolerance; for the ``best`` rule, wherever the ratio is not 1.
    Else None: played again it would measure the same."""
    if measured is None:
        return None
    scale = measured / env.cost.ratio(np.asarray(widths, dtype=np.int64))
    if best:
        return None if np.isclose(scale, 1.0) else scale
    with env.aimed_by(scale):
        over = measured > env.budget.ratio * (1.0 + LATENCY_TOLERANCE)
        if not over and env.wall.aim * scale < measured * (1.0 + LATENCY_TOLERANCE):
            return None
    return scale


def best_own_replay(env: LayerSparsityEnv, study: optuna.Study, episode: Episode, room: int) -> float | None:
    """The scale at which a search plays its own ``episode`` (just played, not yet told to
    ``study``) again, its requested sparsities as they were, with the wall aimed by that episode's
    own measured over predicted latency (:func:`own_scale`); None where it is not played again.

    Only a latency budget that fills replays, only the searcher's own episodes (not a rule's, not
    a replay's, not a repeat), and only the best of them by reward so far. The wall prices a
    search's own episodes by the median ratio of the episodes so far, but the ratio follows the
    widths: ResNet-56 at batch 1 on ONNX Runtime (0.6 of dense) measured 0.97 of the table on the
    median and 0.91 on the rule's policies. Priced over what they run at, the search's best
    requests were cut below the budget: TPE over the stage space asked for stage 3's inner convs at
    32 of 64, the wall cut the last to 24 and the pick tested 80.39 %; the same request aimed by
    0.912 and filled tested 83.51 % at 0.583 measured, where ``uncoupled`` filled to 0.600 tested
    81.37 % (BENCHMARKS.md)."""
    o = episode.outcome
    if (room <= 0 or env.budget.metric != "latency" or not env.config.latency_fill or o.latency is None
            or o.repeat or episode.rule is not None):
        return None
    own = [t.user_attrs["reward"] for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
           if "rule" not in t.user_attrs and "reward" in t.user_attrs]
    if own and max(own) >= episode.reward:
        return None
    scale = own_scale(env, o.widths, o.ratios.get("latency"))
    if scale is None:
        return None
    with env.aimed_by(scale):  # what the episode's steps would keep, and the fill after them
        again = env.episode_widths(episode.requested)
    return None if np.array_equal(again, o.widths) else scale


def portfolio(env: LayerSparsityEnv) -> list[tuple[str, np.ndarray]]:
    """Each rule of :data:`PORTFOLIO` (:data:`LATENCY_PORTFOLIO` for a latency budget or masks) and
    its requested per-unit sparsities, for ``env``'s budget;
    a rule that asks for the same policy as an earlier one is left out."""
    out: list[tuple[str, np.ndarray]] = []
    knapsack_first = env.budget.metric == "latency" or not env.table.strategy.physical
    for name in LATENCY_PORTFOLIO if knapsack_first else PORTFOLIO:
        policy = rule_policy(env, name)
        if not any(np.allclose(policy, p) for _, p in out):
            out.append((name, policy))
    return out
