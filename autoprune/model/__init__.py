"""Step 1 of an episode's setup, the model: registered architectures (:mod:`~autoprune.model.zoo`)
and checkpoints loaded with ``weights_only=True`` (:mod:`~autoprune.model.checkpoints`)."""
