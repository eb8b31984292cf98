"""What every layer shares: the string-keyed :class:`~autoprune.common.registry.Registry`, atomic
file writes, and typed records stored as namespaced Optuna attributes."""
