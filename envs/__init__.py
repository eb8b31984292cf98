"""autoprune.envs."""
