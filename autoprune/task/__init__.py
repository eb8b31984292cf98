"""The pruning task: one dense model with its data, units and rankings, ready for episodes.

:class:`TaskConfig` says how to build it (stored with every study), :class:`PruningTask` is the
built thing (``prune(kept)``, ``evaluate(kept)``), :class:`Fingerprint` what it turned out to be.
"""

from autoprune.task.config import Fingerprint, TaskConfig, check_device
from autoprune.task.scorers import Score, Scorer
from autoprune.task.task import Evaluation, PruningTask, unit_table

__all__ = ["Evaluation", "Fingerprint", "PruningTask", "Score", "Scorer", "TaskConfig", "check_device",
           "unit_table"]
