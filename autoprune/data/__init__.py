"""Step 1 of an episode's setup, the data: registered datasets and the protocol's splits (search-val,
calibration, test), as tensors (:mod:`~autoprune.data.datasets`)."""
