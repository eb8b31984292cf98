"""AMC's state embedding: one feature vector per unit, normalised over the network.

Static features (AMC's layer embedding): index, type, input channels, output channels (the
unit's width), kernel, stride, feature-map size, FLOPs and params of the unit's own layers.
Dynamic features: FLOPs already removed, FLOPs of the units still to come, and the previous
unit's *achieved* sparsity. Each static feature is min-max scaled to [0, 1] over the network's
units; the dynamic ones are already fractions of the dense model.
"""

from __future__ import annotations

import numpy as np

from autoprune.units import KIND_CODES, UnitTable

STATIC_FEATURES = ("index", "type", "in_channels", "out_channels", "kernel", "stride",
                   "feature_size", "flops", "params")
DYNAMIC_FEATURES = ("flops_reduced", "flops_rest", "previous_sparsity")
N_FEATURES = len(STATIC_FEATURES) + len(DYNAMIC_FEATURES)


def static_features(table: UnitTable) -> np.ndarray:
    """``(n_units, 9)`` static features, each column scaled to [0, 1] over the units."""
    rows = []
    for u in table.units:
        lay = u.layer
        rows.append([u.index, KIND_CODES[u.kind], lay.in_channels, u.size, lay.kernel, lay.stride,
                     lay.in_hw[0] * lay.in_hw[1], u.macs, u.params])
    feats = np.asarray(rows, dtype=np.float64)
    lo, hi = feats.min(0), feats.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return (feats - lo) / span


def rest_flops(table: UnitTable) -> np.ndarray:
    """For each step t, the dense FLOPs share of the layers units after t shrink (capped at 1)."""
    touched = np.array([u.touched_macs for u in table.units], dtype=np.float64) / table.dense_macs
    after = np.concatenate([np.cumsum(touched[::-1])[::-1][1:], [0.0]])
    return np.minimum(after, 1.0)


def observation(static: np.ndarray, t: int, reduced: float, rest: float, previous: float) -> np.ndarray:
    """The state at step ``t``: static features of unit ``t`` plus the dynamic ones."""
    dyn = np.clip([reduced, rest, previous], 0.0, 1.0)
    return np.concatenate([static[t], dyn]).astype(np.float32)
