"""autoprune: find per-layer pruning ratios that meet a budget with the least accuracy loss."""

__version__ = "0.1.0"
