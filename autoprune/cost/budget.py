"""Budgets: one cost metric and the fraction of the dense model's cost that may be kept; a search
may have several, one per metric (``0.5flops,0.75latency``), and meets them all."""

from __future__ import annotations

import re
from dataclasses import dataclass

from autoprune.errors import AutopruneError

_FORMS = "0.5flops, 0.3params, 0.7latency, 2xflops (keep 1/2), 50%flops"
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(x|%)?\s*(flops|macs|params|latency)\s*$", re.I)


@dataclass(frozen=True)
class Budget:
    """Keep at most ``ratio`` of the dense model's ``metric`` (0 < ratio < 1)."""

    metric: str
    ratio: float

    def __str__(self) -> str:
        return f"{self.ratio:g}{self.metric}"

    @property
    def slug(self) -> str:
        """A short form for study names: ``0.5flops``."""
        return f"{round(self.ratio, 4):g}{self.metric}"


def parse_budget(text: str) -> Budget:
    """Parse ``0.5flops``, ``0.3params``, ``0.7latency``, ``2xflops`` or ``50%flops``."""
    match = _PATTERN.match(str(text))
    if not match:
        raise AutopruneError(f"cannot read budget {text!r}; accepted forms: {_FORMS}")
    number, form, metric = float(match.group(1)), match.group(2), match.group(3).lower()
    metric = "flops" if metric == "macs" else metric
    if form == "x":
        if number <= 1:
            raise AutopruneError(f"budget {text!r}: a reduction factor like 2xflops must be > 1")
        ratio = 1.0 / number
    elif form == "%":
        ratio = number / 100.0
    else:
        ratio = number
    if not 0.0 < ratio < 1.0:
        raise AutopruneError(
            f"budget {text!r} keeps {ratio:g} of the dense {metric}; it must be between 0 and 1 "
            f"(accepted forms: {_FORMS})"
        )
    return Budget(metric, ratio)


def parse_budgets(text: str) -> tuple[Budget, ...]:
    """Parse one budget or several, comma-separated, one per metric: ``0.5flops,0.75latency``."""
    parts = [p for p in str(text).split(",")]
    if any(not p.strip() for p in parts):
        raise AutopruneError(f"cannot read budgets {text!r}: an empty entry; give e.g. 0.5flops,0.75latency")
    budgets = tuple(parse_budget(p) for p in parts)
    seen: dict[str, Budget] = {}
    for b in budgets:
        if b.metric in seen:
            raise AutopruneError(f"two budgets on {b.metric}: {seen[b.metric]} and {b}; give one per metric")
        seen[b.metric] = b
    return budgets


def primary(budgets: tuple[Budget, ...]) -> Budget:
    """The budget the action wall aims by and the reward weighs: the latency one where there is
    one (it is predicted, so the wall's margin and correction are for it), else the first."""
    return next((b for b in budgets if b.metric == "latency"), budgets[0])


def budgets_slug(budgets: tuple[Budget, ...]) -> str:
    """Study-name form of several budgets: ``0.5flops+0.75latency``."""
    return "+".join(b.slug for b in budgets)
