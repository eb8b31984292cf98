"""autoprune.agents."""
