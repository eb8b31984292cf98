"""autoprune.studies: Optuna storage, the study runner, the study's records, export and reports.

A library layer: the command line (:mod:`autoprune.cli`) and the Python API (:mod:`autoprune.api`)
sit above it.
"""

# The one place the default storage is spelled (kept here, free of imports, for the CLI's help).
DEFAULT_STORAGE = "sqlite:///autoprune.db"
