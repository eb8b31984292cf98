"""AMC's action wall: clip each unit's sparsity so the budget stays reachable.

Before unit ``t`` is decided, every unit after it is assumed to take its maximum sparsity. If the
requested sparsity would then still exceed the budget, the sparsity is raised to the smallest
value that meets it. By induction every finished episode meets the budget (exactly, for costs
with a closed form), whatever the agent asks for.

A cost that is predicted rather than computed (latency, from a lookup table) is off by the
prediction's error, so the wall can aim lower than the budget: at ``budget / (1 + margin)``, the
margin stated by the cost model (:meth:`~autoprune.cost.flops.CostModel.margin`). The aim never goes
below what maximum sparsity everywhere reaches, so a budget within reach stays within reach and
the margin shrinks instead (``ActionWall.margin`` is the one it kept). Where measurements show
the prediction off by a steady factor, :meth:`ActionWall.rescale` aims by the measured figure, and
with a margin that measurements size; where they refit the cost model, :meth:`ActionWall.reprice`
prices by the refit one.

The wall only ever cuts: a policy that asks for more sparsity than the budget needs ends below it.
Under a predicted cost on coarse widths that slack can be large (ResNet-56's TPE episodes at
0.75latency on ONNX Runtime measured 0.49-0.77 of dense, BENCHMARKS.md), so
:meth:`ActionWall.fill` widens a finished policy back into it, one width step at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from autoprune.cost.flops import CostModel
from autoprune.errors import AutopruneError
from autoprune.units import UnitTable


@dataclass(frozen=True)
class WallDecision:
    """What the wall made of one request."""

    requested: float  # sparsity asked for (after rescaling the action)
    kept: int  # elements kept after rounding and clipping
    achieved: float  # 1 - kept / size
    clipped: bool  # the wall raised the sparsity


class ActionWall:
    """Keeps a budget reachable while units are decided one by one.

    Args:
        table: the unit table (sizes, rounding).
        cost: the budget's cost model.
        budget: the fraction of the dense cost that may be kept.
        low, high: the range each unit's sparsity is taken from (a number for every unit, or one
            per unit).
        margin: aim at ``budget / (1 + margin)`` (non-negative).
        extra: more budgets to meet at once, ``(cost model, budget)`` pairs of exact costs (FLOPs,
            params), met at the budget itself.
    """

    def __init__(self, table: UnitTable, cost: CostModel, budget: float, low, high, margin: float = 0.0,
                 extra: Sequence[tuple[CostModel, float]] = ()) -> None:
        if not margin >= 0.0:
            raise AutopruneError(f"a budget margin is a non-negative fraction, got {margin:g}")
        self.table, self.cost, self.budget = table, cost, budget
        self.extra = tuple(extra)
        n = len(table.units)
        self.low = np.broadcast_to(np.asarray(low, dtype=np.float64), (n,))
        self.high = np.broadcast_to(np.asarray(high, dtype=np.float64), (n,))
        self.floor = np.array([table.kept(u.index, self.high[u.index]) for u in table.units], dtype=np.int64)
        self.lowest = cost.ratio(self.floor)
        self.asked = float(margin)  # the margin asked for at the start (a ceiling for what measurements size)
        self._asked = self.asked
        self.rescale(1.0)
        # tolerance for float round-off in the closed form, far below one channel's worth
        self.eps = 1e-9

    def rescale(self, scale: float, margin: float | None = None) -> None:
        """Aim as if the cost model's ratios were ``scale`` times what it predicts: measured
        latency over predicted, from the episodes so far (1: trust the model); with ``margin``,
        aim that far below the budget in place of the margin asked for (the prediction's error as
        measured once it is scaled)."""
        if not scale > 0.0:
            raise ValueError(f"a cost scale is positive, got {scale}")
        if margin is not None:
            if not margin >= 0.0:
                raise ValueError(f"a budget margin is a non-negative fraction, got {margin}")
            self._asked = float(margin)
        self.scale = float(scale)
        self.aim = aim(self.budget / self.scale, self._asked, self.lowest)
        # what is left of the margin where the aim was raised, in measured terms
        self.margin = self.budget / (self.aim * self.scale) - 1.0

    @contextmanager
    def scaled(self, scale: float) -> Iterator[None]:
        """Aim inside the block as if the cost model's ratios were ``scale`` times what it predicts,
        at the margin asked for at the start; then as before. One policy's own measured over
        predicted latency prices its family of widths better than the episodes' median does."""
        saved = self.scale, self._asked
        self.rescale(scale, self.asked)
        try:
            yield
        finally:
            self.rescale(*saved)

    def reprice(self, cost: CostModel) -> None:
        """Price policies with ``cost`` from now on (the budget's cost model with coefficients
        fitted again on measurements), aiming as before: at the same scale and margin."""
        self.cost = cost
        self.lowest = cost.ratio(self.floor)
        self.rescale(self.scale)

    @property
    def _levels_note(self) -> str:
        return "" if self.table.levels is None else ", or where a unit's narrowest level is wider"

    def check_feasible(self) -> None:
        """Refuse a budget that even maximum sparsity everywhere cannot meet (each of them: the
        floor is the cheapest policy by every metric at once)."""
        for cost, budget in ((self.cost, self.budget), *self.extra):
            lowest = cost.ratio(self.floor)
            if lowest > budget + self.eps:
                raise AutopruneError(
                    f"budget {budget:g}{cost.metric} is out of reach: with max sparsity "
                    f"{self.high.max():g} on every unit (less where a range says{self._levels_note}) the model "
                    f"keeps {lowest:.4f} of its dense {cost.metric}; ask for at least "
                    f"{lowest:.4f}{cost.metric}, or raise max_sparsity or the range bounds"
                )

    def meets(self, kept: np.ndarray) -> bool:
        """Whether widths ``kept`` meet the aim and every extra budget, as the models predict."""
        return self.cost.ratio(kept) <= self.aim + self.eps and all(
            cost.ratio(kept) <= budget + self.eps for cost, budget in self.extra)

    def decide(self, kept: np.ndarray, t: int, requested: float) -> WallDecision:
        """Clip unit ``t``'s requested sparsity given the kept widths of units before it.

        ``kept[:t]`` holds decided widths; entries from ``t`` on are ignored.
        """
        probe = kept.copy()
        probe[t + 1 :] = self.floor[t + 1 :]

        def feasible(s: float) -> bool:
            probe[t] = self.table.kept(t, s)
            return self.meets(probe)

        s = float(np.clip(requested, self.low[t], self.high[t]))
        clipped = False
        if not feasible(s):
            clipped = True
            lo, hi = s, float(self.high[t])  # infeasible at lo, feasible at hi (by induction)
            for _ in range(50):  # kept(s) is a step function: 50 halvings find its step exactly
                mid = 0.5 * (lo + hi)
                if feasible(mid):
                    hi = mid
                else:
                    lo = mid
            s = hi
        k = self.table.kept(t, s)
        return WallDecision(float(requested), int(k), self.table.achieved(t, k), clipped)

    def fill(self, kept: np.ndarray, groups: Mapping[int, Sequence[int]]) -> np.ndarray:
        """``kept`` with units widened into what it leaves below the aim: one width step at a
        time (a unit's next level, else one ``round_to`` step), the step that brings back the most
        of its units' width per unit of predicted cost first, while the widths meet the aim and
        every extra budget. The units of a group (its leader's sparsity, :attr:`SearchSpace.groups
        <autoprune.envs.space.SearchSpace.groups>`) widen together; none goes wider than its
        range's lower bound allows. Widths that meet the aim already with no step to spare come
        back as they are."""
        table = self.table
        kept = np.array(kept, dtype=np.int64)
        widest = {lead: table.kept(lead, float(self.low[lead])) for lead in groups}
        now = self.cost.ratio(kept)
        while True:
            best, best_score, best_cost = None, -np.inf, now
            for lead, group in groups.items():
                wider = _wider(table, lead, int(kept[lead]), widest[lead])
                if wider is None:
                    continue
                trial = kept.copy()
                trial[group] = [table.kept(u, table.achieved(lead, wider)) for u in group]
                if not self.meets(trial):
                    continue
                cost = self.cost.ratio(trial)
                gained = sum(int(trial[u] - kept[u]) / table.units[u].size for u in group)
                score = gained / max(cost - now, 1e-12)
                if score > best_score:
                    best, best_score, best_cost = trial, score, cost
            if best is None:
                return kept
            kept, now = best, best_cost


def _wider(table: UnitTable, u: int, kept: int, widest: int) -> int | None:
    """Unit ``u``'s next wider width than ``kept`` (its next level, else one ``round_to`` step),
    or ``None`` at ``widest``."""
    if table.levels is not None:
        above = [k for k, _ in table.levels[u] if kept < k <= widest]
        return min(above) if above else None
    wider = min(kept + table.multiple, widest)
    return wider if wider > kept else None


def aim(budget: float, margin: float, lowest: float) -> float:
    """The cost ratio the wall aims at: ``budget / (1 + margin)``, raised to ``lowest`` (what
    maximum sparsity everywhere reaches) where that is below it, and never above ``budget``."""
    return min(budget, max(budget / (1.0 + margin), lowest))
