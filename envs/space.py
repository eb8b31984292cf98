"""The search space a user can steer: per-unit sparsity bounds and units that share one sparsity.

* ``ranges``: ``"PATTERN=LO:HI"`` bounds the sparsity of every unit whose name matches the
  fnmatch pattern; ``"PATTERN=V"`` fixes it (``"conv1=0"`` never prunes ``conv1``). The pattern
  ``coupled`` names every unit an add or concat ties across layers (a residual stream:
  ``coupled=0`` keeps them whole). Later entries override earlier ones; units no entry names keep
  ``[min_sparsity, max_sparsity]``.
* ``share``: ``"PATTERN"`` makes every unit that matches take one sparsity, decided at the first of
  them in network order (its *leader*); ``"stage"`` groups units by the first component of their
  name (``layer1.0.conv1`` and ``layer1.2.conv1`` share, ``conv1`` stays alone). A unit in two
  groups belongs to the first; a unit its range fixes decides nothing and shares with none. Fewer
  decisions suit small episode budgets.

The *stage space*, ``coupled=0`` with ``share stage``, keeps the residual stream whole and gives
each stage's block-inner convs one sparsity: the ``uncoupled`` rule's structure with a knob per
stage. On ResNet-56 it is 3 decisions where the free space has 30, and TPE over it led the best
rule by 2.85 points at 0.5flops where the free space led by 2.07 (BENCHMARKS.md).

The wall still clips every unit (followers too) so the budget holds, never past a unit's upper
bound; widths are still rounded to the nearest whole channel (or ``round_to`` multiple), so an
achieved sparsity can sit up to half a step outside its bounds (a unit of 16 channels bounded
to ``0:0.3`` keeps 11, sparsity 0.3125). A bound of exactly 0 always keeps the whole unit.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autoprune.errors import AutopruneError
from autoprune.units import UnitTable

COUPLED = "coupled"
"""The ``--range`` pattern that names every unit an add or concat ties across layers."""


@dataclass(frozen=True)
class SearchSpace:
    """Per unit: the sparsity range (``low``, ``high``) and the unit whose decision it takes
    (``leader``; itself for a free unit)."""

    low: np.ndarray
    high: np.ndarray
    leader: np.ndarray

    @property
    def leaders(self) -> list[int]:
        """The units whose sparsity is decided (the others follow one of them)."""
        return [u for u, lead in enumerate(self.leader) if lead == u]

    @property
    def groups(self) -> dict[int, list[int]]:
        """Each deciding unit and the units that take its sparsity (itself first)."""
        return {lead: [u for u in range(len(self.leader)) if self.leader[u] == lead] for lead in self.leaders}

    @classmethod
    def build(cls, table: UnitTable, min_sparsity: float, max_sparsity: float,
              ranges: Sequence[str] = (), share: Sequence[str] = ()) -> SearchSpace:
        names = table.names
        low = np.full(len(names), float(min_sparsity))
        high = np.full(len(names), float(max_sparsity))
        for entry in ranges:
            pattern, lo, hi = parse_range(entry)
            if pattern == COUPLED:
                hit = np.flatnonzero(table.coupled())
            else:
                hit = _matching(names, pattern, f"range {entry!r}")
            low[hit], high[hit] = lo, hi
        fixed = low == high
        leader = np.arange(len(names))
        grouped = np.zeros(len(names), dtype=bool)
        for entry in share:
            groups = _stages(names) if entry == "stage" else [_matching(names, entry, f"share {entry!r}")]
            for members in groups:
                members = [u for u in members if not grouped[u] and not fixed[u]]
                if len(members) > 1:
                    leader[members] = members[0]
                    grouped[members] = True
                    # one decision: the group takes the range all its members allow
                    lo, hi = low[members].max(), high[members].min()
                    if lo > hi:
                        raise AutopruneError(f"share {entry!r} joins units whose range bounds do not "
                                             f"overlap ({names[members[0]]} and others)")
                    low[members], high[members] = lo, hi
        return cls(low, high, leader)


def parse_range(entry: str) -> tuple[str, float, float]:
    """``PATTERN=LO:HI`` or ``PATTERN=V`` -> (pattern, lo, hi), sparsities in [0, 1)."""
    pattern, sep, bounds = entry.rpartition("=")
    try:
        if not sep or not pattern:
            raise ValueError
        lo, _, hi = bounds.partition(":")
        lo_v, hi_v = float(lo), float(hi or lo)
    except ValueError:
        raise AutopruneError(f"range {entry!r}: expected PATTERN=LO:HI or PATTERN=VALUE, e.g. "
                             "'layer1.*=0:0.3' or 'conv1=0'") from None
    if not 0.0 <= lo_v <= hi_v < 1.0:
        raise AutopruneError(f"range {entry!r}: need 0 <= LO <= HI < 1")
    return pattern, lo_v, hi_v


def _matching(names: list[str], pattern: str, what: str) -> list[int]:
    hit = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, pattern)]
    if not hit:
        raise AutopruneError(f"{what} matches no unit; the units are: {', '.join(names[:8])}"
                             + (" ..." if len(names) > 8 else "") + " (see `autoprune inspect`)")
    return hit


def _stages(names: list[str]) -> list[list[int]]:
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n.split(".")[0], []).append(i)
    return list(groups.values())
