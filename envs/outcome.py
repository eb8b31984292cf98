"""What one finished episode achieved: :class:`EpisodeOutcome`, typed.

The env returns it from the last step (``info["outcome"]``, its fields also flat in ``info`` for
Gymnasium users), searchers hand it on in their :class:`~autoprune.agents.base.Episode`, and the
study runner records it in the trial (:class:`~autoprune.studies.records.EpisodeRecord`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EpisodeOutcome:
    """One scored policy.

    Attributes:
        policy: ``{unit name: achieved sparsity}``.
        widths: kept elements per unit, in network order.
        accuracy: the proxy score on search-val (the partial score if scoring stopped early).
        ratios: ``{flops, params[, latency, latency_predicted]}`` as fractions of dense.
        budget: the budget, as ``0.5flops`` and so on; ``metric`` its cost metric.
        within_budget: the cost meets the budget (a measured latency within its tolerance).
        reward: the env's reward; ``reward_parts`` what it is made of.
        eval_seconds: time to prune, reconstruct, score (and time) the policy.
        reconstruction: the refit's record (``refit``, ``fallbacks``, ``seconds``), if it ran.
        latency: how a latency budget's figure was measured (``pairs``, ``margin``[, ``first``],
            ``scale``), latency budgets only.
        stopped_after: the chunks of search-val scored before an early stop ended the episode;
            ``None`` for an episode scored in full. A stopped episode is recorded as pruned.
        patterns: ``{unit name: pattern}`` where units take patterns (``nm`` granularity).
        repeat: the env had scored these widths in full before (this search): the earlier
            outcome, nothing pruned, scored or timed again (``eval_seconds`` is this lookup's).
    """

    policy: dict[str, float]
    widths: tuple[int, ...]
    accuracy: float
    ratios: dict[str, float]
    budget: str
    metric: str
    within_budget: bool
    reward: float
    reward_parts: dict[str, float]
    eval_seconds: float
    reconstruction: dict | None = None
    latency: dict | None = None
    stopped_after: int | None = None
    patterns: dict[str, str] | None = None
    repeat: bool = False

    @property
    def stopped(self) -> bool:
        return self.stopped_after is not None

    @property
    def cost(self) -> float:
        """The budget metric's ratio to dense."""
        return self.ratios[self.metric]

    def info(self) -> dict[str, Any]:
        """The last step's ``info``: every field, flat, and the outcome itself under ``outcome``."""
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "outcome": self}
