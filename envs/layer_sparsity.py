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
table's figure (BENCHMARKS.md, where the timings also drifted as the process ran).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from autoprune.budget import Budget, parse_budget
from autoprune.costs import COST_MODELS, CostModel, closed_form
from autoprune.envs.budget_check import FIRST_PAIRS, extra_pairs, within_budget
from autoprune.envs.rewards import REWARDS, Outcome
from autoprune.envs.space import SearchSpace
from autoprune.envs.state import N_FEATURES, observation, rest_flops, static_features
from autoprune.envs.wall import ActionWall
from autoprune.errors import AutopruneError
from autoprune.policy import Policy
from autoprune.runtimes import RUNTIMES
from autoprune.task import EpisodePruned, PruningTask, TaskConfig


def make_cost_model(task: PruningTask, budget: Budget, latency_batch: int = 1,
                    latency_threads: int | None = None, progress: bool = True,
                    latency_runtime: str = "eager") -> CostModel:
    """The cost model of ``budget.metric`` for ``task`` (latency: measured once per runtime, cached)."""
    import autoprune.latency  # noqa: F401  (registers the latency cost model)

    return COST_MODELS.get(budget.metric).build(task, batch_size=latency_batch, threads=latency_threads,
                                                runtime=latency_runtime, progress=progress)


def check_reachable(table, budget: Budget, min_sparsity: float, max_sparsity: float,
                    ranges: Sequence[str] = (), share: Sequence[str] = ()) -> None:
    """Refuse a FLOPs or params budget the search space cannot meet, from the unit table alone
    (a latency budget needs the model's measured latency table: the env checks it)."""
    if budget.metric == "latency":
        return
    space = SearchSpace.build(table, min_sparsity, max_sparsity, ranges, share)
    ActionWall(table, COST_MODELS.get(budget.metric)(table), budget.ratio, space.low, space.high).check_feasible()


class LayerSparsityEnv(gym.Env):
    """Choose each unit's sparsity in turn; the reward is accuracy minus a cost penalty.

    Args:
        task: a built :class:`~autoprune.task.PruningTask`; if ``None``, one is built from
            ``task_kwargs`` (the fields of :class:`~autoprune.task.TaskConfig`).
        budget: ``0.5flops``, ``0.3params``, ``0.7latency``, ``2xflops``, ``50%flops``.
        reward: a name in :data:`~autoprune.envs.rewards.REWARDS`.
        reward_lambda: the penalty weight of ``acc-penalty``.
        min_sparsity, max_sparsity: the range actions are rescaled to.
        ranges, share: per-unit bounds and shared sparsities (:mod:`autoprune.envs.space`).
        latency_batch, latency_threads: what latency budgets are measured for.
        latency_runtime: what runs the model when its latency is measured, a name in
            :data:`~autoprune.runtimes.RUNTIMES` (``eager``, ``compile``, ``onnxruntime``).
        latency_margin: under a latency budget, the wall aims at ``budget / (1 + margin)``;
            ``None`` (the default) takes the latency table's stated error
            (:meth:`~autoprune.latency.LatencyModel.margin`), 0 aims at the budget itself.
        latency_remeasure: measure a borderline episode's latency again with more pairs
            (:func:`~autoprune.envs.budget_check.extra_pairs`).
        latency_correct: from the third measured episode on, aim the wall by the median ratio of
            measured to predicted latency so far (:meth:`observe_latency`), so a table that is
            off by a steady factor on the policies a search visits does not put most episodes
            over budget.
        progress: let the task and latency table show progress bars.
    """

    metadata = {"render_modes": []}

    def __init__(self, task: PruningTask | None = None, budget: str | Budget = "0.5flops",
                 reward: str = "acc", reward_lambda: float = 1.0, min_sparsity: float = 0.0,
                 max_sparsity: float = 0.8, latency_batch: int = 1,
                 latency_threads: int | None = None, progress: bool = False,
                 ranges: Sequence[str] = (), share: Sequence[str] = (), latency_runtime: str = "eager",
                 latency_margin: float | None = None, latency_remeasure: bool = True,
                 latency_correct: bool = True, **task_kwargs: Any) -> None:
        super().__init__()
        self.budget = budget if isinstance(budget, Budget) else parse_budget(budget)
        self.reward_fn = REWARDS.get(reward)
        self.reward_name, self.reward_lambda = reward, reward_lambda
        RUNTIMES.get(latency_runtime)  # a typo is refused whatever the budget
        if not 0.0 <= min_sparsity <= max_sparsity < 1.0:
            raise AutopruneError(f"need 0 <= min_sparsity <= max_sparsity < 1, got "
                                 f"{min_sparsity:g} and {max_sparsity:g}")
        if task is None:
            try:
                config = TaskConfig(**task_kwargs)
            except TypeError as err:
                raise AutopruneError(f"LayerSparsity-v0: {err}") from None
            task = PruningTask(config, progress=progress)
        elif task_kwargs:
            raise TypeError(f"pass either task or task settings, not both: {sorted(task_kwargs)}")
        self.task = task
        self.table = task.table
        self.n_units = len(self.table.units)
        self.space = SearchSpace.build(self.table, min_sparsity, max_sparsity, ranges, share)
        self.ranges, self.share = tuple(ranges), tuple(share)
        self.cost = make_cost_model(task, self.budget, latency_batch, latency_threads, progress, latency_runtime)
        margin = 0.0
        if self.budget.metric == "latency":
            margin = self.cost.margin() if latency_margin is None else float(latency_margin)
        self.wall = ActionWall(self.table, self.cost, self.budget.ratio, self.space.low, self.space.high, margin)
        self.wall.check_feasible()
        self.min_sparsity, self.max_sparsity = min_sparsity, max_sparsity
        self.latency_batch, self.latency_threads = latency_batch, latency_threads
        self.latency_runtime = latency_runtime
        self.latency_margin = self.wall.margin  # what the wall kept of it (see ActionWall)
        self.latency_remeasure = bool(latency_remeasure)
        self.latency_correct = bool(latency_correct)
        self._latency_errors: list[float] = []  # measured / predicted, one per measured episode
        self._meter = None  # measures episodes against the dense model, prepared once (latency budgets)
        self._static = static_features(self.table)
        self._rest = rest_flops(self.table)
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.observation_space = spaces.Box(0.0, 1.0, (N_FEATURES,), np.float32)
        self._t = 0
        self._kept = self.table.sizes().copy()
        self._requested = np.zeros(self.n_units)
        self.episodes = 0
        # Set by the study runner for --early-stop: called with the score so far after each chunk
        # of search-val; returning True stops the episode (EpisodePruned).
        self.on_chunk: Callable[[float, int], bool] | None = None

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
        super().reset(seed=seed)
        self._t = 0
        self._kept = self.table.sizes().copy()
        return self._obs(), {"unit": self.table.units[0].name, "step": 0}

    def step(self, action):
        t = self._t
        lead = self.space.leader[t]  # a unit that shares its sparsity takes its leader's request
        self._requested[t] = self.action_to_sparsity(action) if lead == t else self._requested[lead]
        decision = self.wall.decide(self._kept, t, self._requested[t])
        self._kept[t] = decision.kept
        info = {"unit": self.table.units[t].name, "step": t, "requested": decision.requested,
                "sparsity": decision.achieved, "kept": decision.kept, "clipped": decision.clipped}
        if t + 1 < self.n_units:
            self._t = t + 1
            return self._obs(), 0.0, False, False, info
        reward, summary = self.finish(self._kept)
        info.update(summary)
        self.episodes += 1
        return self._obs(), reward, True, False, info

    def finish(self, kept: np.ndarray) -> tuple[float, dict]:
        """Apply, evaluate and score the policy of ``kept`` widths; returns reward and summary."""
        kept = np.asarray(kept, dtype=np.int64)
        start = time.perf_counter()
        try:
            model, evaluation = self.task.evaluate(kept, self.on_chunk)
        except EpisodePruned as stop:  # what the pruned trial records
            stop.summary = {"policy": Policy.from_kept(self.table, kept).sparsity, "widths": [int(k) for k in kept],
                            "accuracy": stop.score, "ratios": self.task.cost_ratios(kept),
                            "pruned_after_chunks": stop.chunks, "eval_seconds": time.perf_counter() - start}
            raise
        ratios = self.task.cost_ratios(kept)
        measurement = None
        if self.budget.metric == "latency":
            ratios["latency_predicted"] = self.cost.ratio(kept)
            ratios["latency"], measurement = self.measure_latency(model)
            measurement["scale"] = self.wall.scale  # how the wall aimed this episode
            self.observe_latency(ratios["latency_predicted"], ratios["latency"])
        outcome = Outcome(evaluation.accuracy, ratios[self.budget.metric], self.budget.ratio,
                          closed_form(self.table, kept).flops)
        reward, parts = self.reward_fn(outcome, self.reward_lambda)
        policy = Policy.from_kept(self.table, kept)
        summary = {
            "policy": policy.sparsity,
            "widths": [int(k) for k in kept],
            "accuracy": evaluation.accuracy,
            "ratios": ratios,
            "budget": str(self.budget),
            "budget_metric": self.budget.metric,
            "within_budget": within_budget(ratios[self.budget.metric], self.budget),
            "reward": reward,
            "reward_parts": parts,
            "eval_seconds": time.perf_counter() - start,
        }
        if measurement is not None:
            summary["latency"] = measurement
        rec = evaluation.reconstruction
        if rec is not None:
            summary["reconstruction"] = {"refit": rec.refit, "fallbacks": rec.fallbacks,
                                         "seconds": round(rec.seconds, 3)}
        return float(reward), summary

    def measure_latency(self, model) -> tuple[float, dict]:
        """The latency ratio of ``model`` to the dense model, measured as the budget is checked,
        and how: the pairs behind it, the wall's margin and, if it was measured again, the first
        figure."""
        from autoprune.latency import RatioMeter

        if self._meter is None:
            self._meter = RatioMeter(self.task.dense, self.table.input_shape, self.task.device)
        first: list[float] = []

        def more(times) -> int:
            first.append(times.ratio)
            return extra_pairs(times.ratio, self.budget) if self.latency_remeasure else 0

        times = self._meter.measure(model, self.cost.batch_size, self.cost.threads, pairs=FIRST_PAIRS,
                                    runtime=self.cost.runtime, more=more)
        how = {"pairs": times.pairs, "margin": self.latency_margin}
        if times.pairs > FIRST_PAIRS:
            how["first"] = first[0]
        return times.ratio, how

    def observe_latency(self, predicted: float, measured: float) -> None:
        """Learn from one episode's predicted and measured latency ratios: with
        ``latency_correct``, from the third on, the wall aims by their median ratio."""
        self._latency_errors.append(measured / predicted)
        if self.latency_correct and len(self._latency_errors) >= 3:
            self.wall.rescale(float(np.median(self._latency_errors)))

    def replay_latency(self, episodes: Iterable[tuple[float, float]]) -> None:
        """Aim as a study's (predicted, measured) episodes say, in place of what this env saw:
        a search run again on the same env must not count its episodes twice."""
        self._latency_errors = []
        self.wall.rescale(1.0)
        for predicted, measured in episodes:
            self.observe_latency(predicted, measured)

    def feasible_policy(self, sparsity) -> np.ndarray:
        """Run the wall over a whole requested policy at once (what one episode would do)."""
        kept = self.table.sizes().copy()
        for t in range(self.n_units):
            kept[t] = self.wall.decide(kept, t, float(sparsity[self.space.leader[t]])).kept
        return kept
