"""Reward functions, chosen by name (``--reward``).

Each takes the episode's outcome and returns the reward and its parts (for the step's info
dict and the study's records). They are pure: no model, no data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from autoprune.common.registry import Registry


@dataclass(frozen=True)
class Outcome:
    """What one finished episode achieved."""

    accuracy: float  # the proxy score on search-val (top-1 by default), in [0, 1]
    cost_ratio: float  # the budget metric, as a fraction of dense
    budget: float  # the budget, as a fraction of dense
    flops: float  # absolute (effective) FLOPs of the pruned model, MACs per sample


RewardFn = Callable[[Outcome, float], tuple[float, dict]]
REWARDS: Registry[RewardFn] = Registry("reward")


@REWARDS.register("acc", help="AMC's R_err = -error; the action wall enforces the budget")
def reward_acc(o: Outcome, lam: float = 1.0) -> tuple[float, dict]:
    error = 1.0 - o.accuracy
    return -error, {"error": error}


@REWARDS.register("acc-log-flops", help="AMC's R_FLOPs = -error * log(FLOPs)")
def reward_acc_log_flops(o: Outcome, lam: float = 1.0) -> tuple[float, dict]:
    error = 1.0 - o.accuracy
    log_flops = math.log(max(o.flops, 1.0))
    return -error * log_flops, {"error": error, "log_flops": log_flops}


@REWARDS.register(
    "acc-penalty", help="accuracy - lambda * max(0, cost/budget - 1) - 0.01 * cost ratio"
)
def reward_acc_penalty(o: Outcome, lam: float = 1.0) -> tuple[float, dict]:
    over = max(0.0, o.cost_ratio / o.budget - 1.0)
    penalty = lam * over
    thrift = 0.01 * o.cost_ratio  # among equally accurate policies, prefer the cheaper
    return o.accuracy - penalty - thrift, {"accuracy": o.accuracy, "penalty": penalty, "thrift": thrift}
