"""What a user keeps: a policy applied to the model, optionally fine-tuned and timed
(:mod:`~autoprune.export.apply`), saved as plain tensors and a ``torch.export`` program
(:mod:`~autoprune.export.artifacts`)."""
