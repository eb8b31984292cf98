"""Reconstruction after the cut: each layer whose inputs shrank is refit by least squares to the
dense layer's outputs (:mod:`~autoprune.reconstruct.refit`, the solver in
:mod:`~autoprune.reconstruct.lsq`)."""
