"""``LayerSparsityEnv``: AMC's layer-by-layer pruning as a Gymnasium environment.

One episode visits every unit in network order. At each step the agent picks the unit's sparsity
(an action in [-1, 1], rescaled to [min_sparsity, max_sparsity]); the action wall clips it so the
budget stays reachable; the state carries the achieved sparsity. After the last unit the policy
is applied to a fresh copy of the dense model (physical slimming, or masks), the layers whose
inputs shrank are refit to the dense outputs (reconstruction), BatchNorm is recalibrated, proxy
accuracy is measured on search-val, and the reward is computed. Earlier steps give reward 0.
The last step's ``info`` holds the policy, proxy accuracy, cost ratios and the reward's parts.

Under a latency budget the wall aims below the budget by the latency table's stated error (the
margin), and the finished policy's latency is measured against the dense model, again with more
pairs where it is borderline (:mod:`autoprune.envs.budget_check`); the dense model is prepared for
the runtime once per env, not once per episode. From the third measured episode the wall aims by
the median ratio of measured to predicted latency: the table fits its calibration policies to a
few per cent, but a search visits other policies, and on ResNet-56 they measured 4-11 % over the
table's figure (BENCHMARKS.md, where the timings also drifted as the process ran). With
``latency_refit`` the table's coefficients are fitted again after every measured
episode instead, on its calibration policies and the episodes so far, so the wall prices each kind
of cut as this search measured it rather than scaling them all by one figure. With
``latency_adapt``, from the tenth the margin is what the measurements show of the corrected
table's error: how far over their median 9 in 10 of the ratios stayed (:func:`scatter`). And
since the wall only cuts, a policy that asked for more sparsity than needed is widened into the
slack it left below the aim before it is scored (``latency_fill``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from autoprune.cost.budget import Budget
from autoprune.cost.flops import COST_MODELS, CostModel, closed_form
from autoprune.cost.runtimes import get_runtime
from autoprune.envs.budget_check import LATENCY_TOLERANCE, MORE_PAIRS, extra_pairs, within_budget
from autoprune.envs.config import EnvConfig
from autoprune.envs.outcome import EpisodeOutcome
from autoprune.envs.rewards import REWARDS, Outcome
from autoprune.envs.space import SearchSpace
from autoprune.envs.state import N_FEATURES, observation, rest_flops, static_features
from autoprune.envs.wall import ActionWall
from autoprune.errors import AutopruneError
from autoprune.task import PruningTask, TaskConfig
from autoprune.units.policy import Policy

ADAPT_AFTER = 10
"""Measured episodes before their scatter sizes the wall's margin (``latency_adapt``); before
them, it only ever widens the margin asked for."""
MARGIN_FLOOR = 0.01
"""The least margin measurements may size: a median of 30 pairs moves by about 1 % (EnvConfig)."""

Stop = Callable[[float, int], bool]
"""``stop(score so far, chunk index) -> bool``: called after each chunk of search-val; True ends
scoring there (an Optuna pruner's decision). Passed per episode: ``reset(options={"stop": stop})``."""


def scatter(errors: np.ndarray) -> float:
    """How far over its median measured over predicted latency runs, as a fraction: the 90th
    percentile of each ratio over the median, less one (9 in 10 of the episodes so far stayed
    within it). An upper percentile, not a spread: the table's misses are lopsided and
    heavy-tailed (ResNet-56 on ONNX Runtime: most within 3 %, a few mixed-width policies 10-20 %
    over)."""
    errors = np.asarray(errors, dtype=np.float64)
    return float(np.quantile(errors / np.median(errors), 0.9) - 1.0)


def auto_widths(task: PruningTask) -> bool:
    """Whether ``task`` asks for the widths its runtime rewards (``round_to="auto"``)."""
    return getattr(task.config, "round_to", None) == "auto"


def make_cost_model(task: PruningTask, config: EnvConfig, progress: bool = True,
                    metric: str | None = None) -> CostModel:
    """The cost model of the budget's metric (or ``metric``) for ``task`` (latency: measured once
    per runtime, cached; under ``round_to="auto"`` over a table of the widths it rewards)."""
    import autoprune.cost.latency  # noqa: F401  (registers the latency cost model)

    return COST_MODELS.get(metric or config.parsed_budget.metric).build(
        task, batch_size=config.latency_batch, threads=config.latency_threads, runtime=config.latency_runtime,
        progress=progress, auto_widths=auto_widths(task))


def width_grid(table) -> str:
    """The name a study records for a table's auto widths: ``auto:`` and a digest of them."""
    widths = repr([[w for w, _ in levels] for levels in table.levels])
    return "auto:" + hashlib.sha256(widths.encode()).hexdigest()[:12]


def check_reachable(table, config: EnvConfig) -> None:
    """Refuse a FLOPs or params budget the search space cannot meet, from the unit table alone
    (a latency budget needs the model's measured latency table: the env checks it)."""
    space = SearchSpace.build(table, config.min_sparsity, config.max_sparsity, config.ranges, config.share)
    for budget in config.parsed_budgets:
        if budget.metric != "latency":
            ActionWall(table, COST_MODELS.get(budget.metric)(table), budget.ratio, space.low,
                       space.high).check_feasible()


class LayerSparsityEnv(gym.Env):
    """Choose each unit's sparsity in turn; the reward is accuracy minus a cost penalty.

    Args:
        task: a built :class:`~autoprune.task.PruningTask`; if ``None``, one is built from the
            settings that are fields of :class:`~autoprune.task.TaskConfig`.
        config: the env's settings (:class:`~autoprune.envs.config.EnvConfig`: budget, reward,
            sparsity range, search space, how latency is measured); or give them as keywords
            (``budget="0.5flops", max_sparsity=0.9``), as ``gymnasium.make`` does.
        progress: let the task and latency table show progress bars.

    After construction ``config`` holds what the env resolved (the latency margin it aims with),
    which is what a study records.
    """

    metadata = {"render_modes": []}

    def __init__(self, task: PruningTask | None = None, config: EnvConfig | str | Budget | None = None, *,
                 progress: bool = False, **settings: Any) -> None:
        super().__init__()
        if isinstance(config, (str, Budget)):  # LayerSparsityEnv(task, "0.5flops")
            settings["budget"], config = str(config), None
        env_settings, task_settings = EnvConfig.split(settings)
        if config is None:
            config = EnvConfig(**env_settings)
        elif env_settings:
            raise TypeError(f"pass either config or env settings, not both: {sorted(env_settings)}")
        config.check()
        self.budgets = config.parsed_budgets  # every budget; ``budget`` the primary one (the wall aims by it)
        self.budget = config.parsed_budget
        self.reward_fn = REWARDS.get(config.reward)
        if task is None:
            try:
                task_config = TaskConfig(**task_settings)
            except TypeError as err:
                raise AutopruneError(f"LayerSparsity-v0: {err}") from None
            task = PruningTask(task_config, progress=progress)
        elif task_settings:
            raise TypeError(f"pass either task or task settings, not both: {sorted(task_settings)}")
        self.task = task
        self.table = task.table
        self.n_units = len(self.table.units)
        self.space = SearchSpace.build(self.table, config.min_sparsity, config.max_sparsity, config.ranges,
                                       config.share)
        self.cost = make_cost_model(task, config, progress)
        # the other budgets (several at once): exact costs the wall meets at the budget itself
        self.extra = tuple((b, make_cost_model(task, config, progress, b.metric)) for b in self.budgets
                           if b != self.budget)
        grid, self._block = None, 1  # the runtime's channel block, where widths are timed
        if auto_widths(task):  # the latency table's widths, whatever the budget's metric
            latency = self.cost if self.budget.metric == "latency" else make_cost_model(task, config, progress,
                                                                                        "latency")
            self.table, grid, self._block = latency.table, width_grid(latency.table), latency.channel_block
        elif self.budget.metric == "latency":
            self._block = get_runtime(self.cost.runtime).channel_block(self.cost.device)
        margin = 0.0
        if self.budget.metric == "latency":
            margin = self.cost.margin() if config.latency_margin is None else float(config.latency_margin)
        self.wall = ActionWall(self.table, self.cost, self.budget.ratio, self.space.low, self.space.high, margin,
                               [(cost, b.ratio) for b, cost in self.extra])
        self.wall.check_feasible()
        # what the wall kept of the margin, and which widths it plays
        self.config = dataclasses.replace(config, latency_margin=self.wall.margin, width_grid=grid)
        self._latency_errors: list[float] = []  # measured / predicted, one per measured episode
        self._timed: tuple[list[np.ndarray], list[float]] = ([], [])  # their widths and measured ratios
        self.table_cost = self.cost  # as calibrated; ``cost`` may be refit on measured episodes
        self._meter = None  # measures episodes against the dense model, prepared once (latency budgets)
        self._scored: dict[tuple[int, ...], EpisodeOutcome] = {}  # widths scored in full: their outcome
        self._static = static_features(self.table)
        self._rest = rest_flops(self.table)
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.observation_space = spaces.Box(0.0, 1.0, (N_FEATURES,), np.float32)
        self._t = 0
        self._kept = self.table.sizes().copy()
        self._requested = np.zeros(self.n_units)
        self._stop: Stop | None = None
        self.episodes = 0

    # -- pure helpers ---------------------------------------------------------------------------
    def action_to_sparsity(self, action, t: int | None = None) -> float:
        """Action in [-1, 1] to unit ``t``'s sparsity range (the unit about to be decided)."""
        t = self._t if t is None else t
        lo, hi = self.space.low[t], self.space.high[t]
        a = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0))
        return float(lo + (a + 1.0) / 2.0 * (hi - lo))

    def sparsity_to_action(self, sparsity: float, t: int | None = None) -> np.ndarray:
        t = self._t if t is None else t
        lo, hi = self.space.low[t], self.space.high[t]
        a = 2.0 * (float(sparsity) - lo) / max(hi - lo, 1e-12) - 1.0
        return np.array([np.clip(a, -1.0, 1.0)], dtype=np.float32)

    def _obs(self) -> np.ndarray:
        t = self._t
        current = closed_form(self.table, self._kept).flops
        reduced = 1.0 - current / self.table.dense_macs
        previous = self.table.achieved(t - 1, int(self._kept[t - 1])) if t > 0 else 0.0
        return observation(self._static, t, reduced, self._rest[t], previous)

    # -- gymnasium API ----------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode; ``options={"stop": stop}`` lets ``stop`` end its scoring early (:data:`Stop`)."""
        super().reset(seed=seed)
        self._stop = (options or {}).get("stop")
        self._t = 0
        self._kept = self.table.sizes().copy()
        return self._obs(), {"unit": self.table.units[0].name, "step": 0}

    def step(self, action):
        t = self._t
        lead = self.space.leader[t]  # a unit that shares its sparsity takes its leader's request
        self._requested[t] = self.action_to_sparsity(action) if lead == t else self._requested[lead]
        decision = self.wall.decide(self._kept, t, self._requested[t])
        self._kept[t] = decision.kept
        if t + 1 == self.n_units and self._fills:
            self._kept = self.wall.fill(self._kept, self.space.groups)
        info = {"unit": self.table.units[t].name, "step": t, "requested": decision.requested,
                "sparsity": decision.achieved, "kept": decision.kept, "clipped": decision.clipped}
        if t + 1 < self.n_units:
            self._t = t + 1
            return self._obs(), 0.0, False, False, info
        outcome = self.finish(self._kept, self._stop)
        if self.config.latency_retry:
            outcome = self._played_again(outcome)
        info.update(outcome.info())
        self.episodes += 1
        return self._obs(), outcome.reward, True, False, info

    def finish(self, kept: np.ndarray, stop: Stop | None = None) -> EpisodeOutcome:
        """Apply, evaluate and score the policy of ``kept`` widths. With ``stop``, scoring may end
        early (the outcome's ``stopped_after``; its latency is then not measured).

        Widths scored in full before (since :meth:`forget_scores`) are not scored again: their
        outcome comes back marked ``repeat``. The proxy of given widths is deterministic, and a
        sampler over a small space asks for the same widths often: TPE over ResNet-56's stage space
        at 0.6 of dense on ONNX Runtime (batch 1) played 17 and 19 distinct policies in 40 episodes,
        one of them 8 times, and spent half its episode time on the repeats (BENCHMARKS.md).
        """
        kept = np.asarray(kept, dtype=np.int64)
        start = time.perf_counter()
        seen = self._scored.get(tuple(kept.tolist()))
        if seen is not None:
            return dataclasses.replace(seen, eval_seconds=time.perf_counter() - start, repeat=True)
        model, evaluation = self.task.evaluate(kept, stop)
        ratios = self.task.cost_ratios(kept)
        measurement = None
        if self.budget.metric == "latency" and evaluation.stopped_after is None:
            ratios["latency_predicted"] = self.cost.ratio(kept)
            ratios["latency"], measurement = self.measure_latency(model)
            measurement["scale"] = self.wall.scale  # how the wall aimed this episode
            if self._refits:
                measurement["coef"] = list(self.cost.coef)
            self.observe_latency(ratios["latency_predicted"], ratios["latency"], kept)
        cost = ratios.get(self.budget.metric, ratios["flops"])  # a stopped latency episode is not timed
        reward, parts = self.reward_fn(Outcome(evaluation.accuracy, cost, self.budget.ratio,
                                               closed_form(self.table, kept).flops), self.config.reward_lambda)
        rec = evaluation.reconstruction
        policy = Policy.from_kept(self.table, kept)
        outcome = EpisodeOutcome(
            policy=policy.sparsity, widths=tuple(int(k) for k in kept), patterns=policy.patterns or None,
            accuracy=evaluation.accuracy, ratios=ratios, budget=",".join(str(b) for b in self.budgets),
            metric=self.budget.metric, reward=float(reward), reward_parts=parts,
            within_budget=all(within_budget(ratios.get(b.metric, cost), b) for b in self.budgets),
            eval_seconds=time.perf_counter() - start, latency=measurement,
            reconstruction=None if rec is None else {"refit": rec.refit, "fallbacks": rec.fallbacks,
                                                     "seconds": round(rec.seconds, 3)},
            stopped_after=evaluation.stopped_after,
        )
        if not outcome.stopped:
            self._scored[tuple(outcome.widths)] = outcome
        return outcome

    def _played_again(self, first: EpisodeOutcome) -> EpisodeOutcome:
        """``first``, or where its measured latency ran over the budget beyond the tolerance, the
        episode's requested sparsities played once more with the wall aimed by ``first``'s own
        measured over predicted latency (:meth:`aimed_by`; ``latency_retry``), the first play's
        figures under ``latency["over"]``.

        The table prices a search's odd policies worst: on ResNet-56 at 0.7 of dense (ONNX
        Runtime, batch 1) DDPG's own episodes measured up to 14 % over the table's figure, and 12
        of 120 ran over the budget beyond the tolerance, lost to the search (BENCHMARKS.md).
        Played again, such an episode keeps what the agent asked for, cut to fit as it measures."""
        measured = first.ratios.get("latency")
        if measured is None or first.stopped or within_budget(measured, self.budget):
            return first
        scale = measured / first.ratios["latency_predicted"]
        with self.aimed_by(scale):
            kept = self.episode_widths(self._requested)
        if np.array_equal(kept, first.widths):  # at the narrowest widths the wall allows already
            return first
        self._kept = kept
        second = self.finish(kept, self._stop)
        over = {"latency": measured, "latency_predicted": first.ratios["latency_predicted"],
                "widths": list(first.widths), "accuracy": first.accuracy, "scale": scale}
        return dataclasses.replace(second, latency=dict(second.latency or {}, over=over),
                                   eval_seconds=first.eval_seconds + second.eval_seconds)

    def forget_scores(self) -> None:
        """Score every policy afresh from here on (:meth:`finish` reuses the outcome of widths
        scored before): the study runner calls it as a search starts, so searches that share an
        env (a benchmark's seeds) each pay for their own episodes."""
        self._scored.clear()

    def measure_latency(self, model) -> tuple[float, dict]:
        """The latency ratio of ``model`` to the dense model, measured as the budget is checked,
        and how: the pairs behind it, the wall's margin and, if it was measured again, the first
        figure."""
        from autoprune.cost.latency import RatioMeter

        if self._meter is None:
            self._meter = RatioMeter(self.task.dense, self.table.input_shape, self.task.device)
        first: list[float] = []

        def more(times) -> int:
            first.append(times.ratio)
            return extra_pairs(times.ratio, self.budget) if self.config.latency_remeasure else 0

        pairs = self.config.latency_pairs
        times = self._meter.measure(model, self.cost.batch_size, self.cost.threads, pairs=pairs,
                                    runtime=self.cost.runtime, more=more)
        how = {"pairs": times.pairs, "margin": self.wall.margin}
        if times.pairs > pairs:
            how["first"] = first[0]
        return times.ratio, how

    @property
    def _refits(self) -> bool:
        """Whether measured episodes refit the latency table (else they scale it)."""
        return self.budget.metric == "latency" and self.config.latency_correct and self.config.latency_refit

    def observe_latency(self, predicted: float, measured: float, kept=None) -> None:
        """Learn from one episode's predicted and measured latency ratios (of the policy of widths
        ``kept``): with ``latency_correct``, the wall aims by them, and until the tenth with a
        margin that covers how far over their median they ran (:func:`scatter`) where that is
        more than the margin asked for; with ``latency_adapt``, from the tenth on, with that
        scatter as its margin.

        How the wall aims by them: with ``latency_refit``, it prices policies by the
        table with its coefficients fitted again on its calibration and every episode so far
        (:meth:`~autoprune.cost.latency.LatencyModel.refit`; ``kept`` is needed), from the first;
        without (the default), from the third, by the table scaled by the median of measured over
        predicted.
        A median of a few episodes is the least sure: they are the portfolio's rules, the most
        unlike policies a search plays, which a table may price 7 % apart (ResNet-56 at batch 64:
        two rules that cut only inner convs measured 7 % under their prediction, a third on the
        mark; aimed by their median alone, the next rule ran 5 % over the budget)."""
        self._record(predicted, measured, kept)
        self._aim()

    @contextmanager
    def aimed_by(self, scale: float | None) -> Iterator[None]:
        """Aim the wall, for what is played inside the block, as if the latency table's ratios were
        ``scale`` times its prediction (:meth:`~autoprune.envs.wall.ActionWall.scaled`): a rule
        played again at its own first play's measured over predicted latency. Afterwards the wall
        aims as every episode measured so far says, the ones inside included. ``None``: as now."""
        if scale is None:
            yield
            return
        seen = len(self._latency_errors)
        try:
            with self.wall.scaled(scale):
                yield
        finally:
            if len(self._latency_errors) != seen:
                self._aim()

    def replay_latency(self, episodes: Iterable[tuple]) -> None:
        """Aim as a study's ``(predicted, measured[, kept])`` episodes say, in place of what this
        env saw: a search run again on the same env must not count its episodes twice (the
        table is refit once, on them all)."""
        self._latency_errors, self._timed = [], ([], [])
        self.wall.rescale(1.0, self.wall.asked)
        for predicted, measured, *kept in episodes:
            self._record(predicted, measured, *kept)
        self._aim()

    def _record(self, predicted: float, measured: float, kept=None) -> None:
        self._latency_errors.append(measured / predicted)
        if self._refits:
            if kept is None:
                raise ValueError("a latency refit needs each measured episode's widths")
            self._timed[0].append(np.asarray(kept, dtype=np.int64))
            self._timed[1].append(float(measured))

    def _aim(self) -> None:
        """Price and aim the wall as the episodes so far say (:meth:`observe_latency`)."""
        if self._refits:
            self.cost = self.table_cost.refit(*self._timed) if self._timed[0] else self.table_cost
            self.wall.reprice(self.cost)
        errors = np.asarray(self._latency_errors)
        if not self.config.latency_correct or len(errors) < 3:
            return
        scale, margin = 1.0 if self._refits else float(np.median(errors)), self.wall.asked
        if len(errors) < ADAPT_AFTER:
            margin = max(margin, scatter(errors))
        elif self.config.latency_adapt:
            margin = min(margin, max(MARGIN_FLOOR, scatter(errors)))
        self.wall.rescale(scale, margin)

    def meets(self, kept) -> bool:
        """Whether widths ``kept`` meet every budget as the cost models predict (the primary one
        at the budget itself, not at the wall's aim)."""
        return max(self.over(kept)) <= 1.0 + 1e-9

    def over(self, kept) -> list[float]:
        """Each budget's predicted cost of ``kept`` as a fraction of the budget, the primary first."""
        kept = np.asarray(kept)
        return [cost.ratio(kept) / b.ratio for b, cost in ((self.budget, self.cost), *self.extra)]

    def feasible_policy(self, sparsity) -> np.ndarray:
        """Run the wall over a whole requested policy at once (what one episode would do)."""
        kept = self.table.sizes().copy()
        for t in range(self.n_units):
            kept[t] = self.wall.decide(kept, t, float(sparsity[self.space.leader[t]])).kept
        return kept

    @property
    def _fills(self) -> bool:
        """Whether a finished episode is widened into the slack below the wall's aim."""
        return self.config.latency_fill and self.budget.metric == "latency"

    def episode_widths(self, sparsity) -> np.ndarray:
        """The widths an episode that requests ``sparsity`` (per unit) ends at, as the wall aims
        now: its steps (:meth:`feasible_policy`), then the fill where the env fills."""
        kept = self.feasible_policy(sparsity)
        return self.wall.fill(kept, self.space.groups) if self._fills else kept

    def width_note(self) -> str | None:
        """Which widths ``round_to="auto"`` plays, in one line; for explicit multiples under a
        latency budget, a warning where they fall off the runtime's channel block (else None)."""
        c, levels = self.config, self.table.levels
        if c.width_grid is None:
            if self._block <= 1 or self.table.multiple % self._block == 0:
                return None
            return (f"widths are multiples of {self.table.multiple}, but {c.latency_runtime} on this CPU lays "
                    f"channels out in blocks of {self._block}: a width off them runs slower than the latency "
                    f"table predicts, so episodes may measure over the budget; --round-to auto (or a multiple "
                    f"of {self._block}) keeps to the blocks")
        widest = max(range(self.n_units), key=lambda u: self.table.units[u].size)
        blocks = (f" and multiples of its channel block ({self._block}) or narrower than one block"
                  if self._block > 1 else "")
        return (f"round_to auto: {sum(len(lv) for lv in levels)} widths over {self.n_units} units, those at which "
                f"{c.latency_runtime} (batch {c.latency_batch}) runs faster than at the next wider one by the "
                f"latency table{blocks}; {self.table.units[widest].name} may keep "
                + ", ".join(str(w) for w, _ in levels[widest]))

    def latency_note(self) -> str | None:
        """How a latency budget is aimed at and checked, in one line (None for other budgets)."""
        if self.budget.metric != "latency":
            return None
        worst, mean = self.cost.fit_error
        c = self.config
        how = (f"measured again with {MORE_PAIRS} more pairs where the first {c.latency_pairs} put it over the budget"
               if c.latency_remeasure else f"measured once with {c.latency_pairs} pairs")
        return (f"latency budget {self.budget}: the action wall aims at {self.wall.aim:.4f} as the latency "
                f"table predicts it, a margin of {c.latency_margin:.1%} (the table's fit error: mean {mean:.1%}, "
                f"max {worst:.1%}); each episode's latency is {how}, and is within budget up to "
                f"{LATENCY_TOLERANCE:.0%} over it"
                + ("; after each episode the table's coefficients are fitted again on its calibration and "
                   "every episode measured so far" if self._refits else "")
                + ("; from the third episode the wall aims by the median of measured over predicted latency"
                   if c.latency_correct and not self._refits else "")
                + (f" (until the {ADAPT_AFTER}th with a margin that also covers how far over the median of "
                   "measured over predicted latency they ran)" if c.latency_correct else "")
                + (f", from the {ADAPT_AFTER}th with how far over it 9 in 10 of them run as its margin"
                   if c.latency_correct and c.latency_adapt else "")
                + ("; each policy is widened into what it leaves below the aim" if c.latency_fill else "")
                + ("; an episode that still measures over the budget beyond that is played once more, aimed by "
                   "its own measured over predicted latency" if c.latency_retry else ""))
