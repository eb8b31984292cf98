"""autoprune.studies."""
