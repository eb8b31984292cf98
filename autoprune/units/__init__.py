"""Units and policies: what one action of the search decides, traced once from the dense model.

:mod:`~autoprune.units.trace` records the model's layers, :mod:`~autoprune.units.table` holds the
units and the closed-form cost coefficients, :mod:`~autoprune.units.channels` the coupled channel
groups (through :mod:`~autoprune.units.tp_adapter`), :mod:`~autoprune.units.policy` the
``{unit: sparsity}`` documents a search produces.
"""

from autoprune.units.table import Unit, UnitKind, UnitTable, channel_table, weight_table
from autoprune.units.trace import KIND_CODES, Layer, classifier_name, excluded_by, trace_layers

__all__ = ["KIND_CODES", "Layer", "Unit", "UnitKind", "UnitTable", "channel_table", "classifier_name", "excluded_by",
           "trace_layers", "weight_table"]
