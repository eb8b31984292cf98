"""Scoring a pruned model: accuracy, the search proxies (``acc``, ``ce``, ``kl``) and BatchNorm
recalibration (:mod:`~autoprune.evaluate.metrics`)."""
