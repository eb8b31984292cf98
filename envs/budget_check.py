r"""Whether a finished episode met its budget, and when its measured latency is measured again.

FLOPs and params have a closed form and the wall meets them exactly. Latency is measured: the
median of per-pair ratios over alternated runs of the dense and the pruned model (an episode's
first measurement takes :attr:`~autoprune.envs.EnvConfig.latency_pairs`, 30 by default), whose
noise is about 1 % (sd) for 30 pairs on a shared CPU. So an episode counts as within a latency
budget up to :data:`LATENCY_TOLERANCE` over it, and a measurement over the budget, where noise may
put it on the wrong side of that line, is measured again with more pairs, pooled with the first.

Every measurement over the budget is measured again (:data:`BORDERLINE`): below the budget the
verdict (within) cannot flip by noise, and most episodes land there, since the wall aims under the
budget by the table's margin; re-measuring them would cost time and change nothing. Over it, noise
can flip the verdict near the 3 % line (three noise sds either side of it), and a burst of load on
a shared machine can put a whole measurement 10 % over: the same ``uniform`` policy of ResNet-56
measured 0.754 of dense in one search and 0.683-0.690 in two others (ONNX Runtime, batch 1, a 0.7
budget). An episode still over after that is played again, narrower (``latency_retry``), which
costs a whole evaluation; 60 more pairs cost well under a second at batch 1. 60 more pairs make 90
in all, which cuts the noise of the median by about :math:`\sqrt{3}`.
"""

from __future__ import annotations

from autoprune.cost.budget import Budget

LATENCY_TOLERANCE = 0.03
"""An episode's measured latency may exceed its budget by this fraction (measurement noise)."""

BORDERLINE = 1.0
"""Measured latency ratios from ``budget * BORDERLINE`` up are measured again (see the module
docstring); before ``latency_retry`` only those up to 6 % over were, where one more measurement
was taken not to bring an episode back."""

MORE_PAIRS = 60
"""Pairs added to a measurement over the budget."""


def within_budget(ratio: float, budget: Budget) -> bool:
    """Whether a policy of cost ``ratio`` meets ``budget`` (a measured latency within its tolerance)."""
    tolerance = LATENCY_TOLERANCE if budget.metric == "latency" else 0.0
    return bool(ratio <= budget.ratio * (1.0 + tolerance) + 1e-9)


def extra_pairs(ratio: float, budget: Budget) -> int:
    """How many more pairs a measured latency ``ratio`` needs: :data:`MORE_PAIRS` if it is
    over ``budget``, else 0."""
    return MORE_PAIRS if ratio >= budget.ratio * BORDERLINE else 0
