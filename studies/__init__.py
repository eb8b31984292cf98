"""autoprune.studies: Optuna storage, the study runner, trial <-> policy records, and the CLI."""
