"""The one exception type for errors a user can cause.

Anything a user can get wrong (a budget string, a model name, a checkpoint that does not fit,
an infeasible budget, unreachable storage) raises :class:`AutopruneError` with a message that
says what to do. The CLI prints that message on one line and exits with code 2.
"""

from __future__ import annotations


class AutopruneError(Exception):
    """An error the user can fix; its message is shown as-is, without a traceback."""

    exit_code = 2
