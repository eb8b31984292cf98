"""Cutting a unit: the granularity strategies (:mod:`~autoprune.prune.granularity`), which elements go
first (:mod:`~autoprune.prune.importance`), and the pruners that slim or mask a copy of the dense
model (:mod:`~autoprune.prune.pruners`)."""
