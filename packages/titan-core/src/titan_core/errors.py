"""User-facing errors.

A :class:`UserError` is bad input from a person (a config key, a CLI flag, a path, a parallel
layout). The command-line entry points print its message as one line and exit with code 2, with no
traceback unless ``TITAN_DEBUG=1`` is set. Messages name the field or file, what was expected, what
was found and the fix.
"""

from __future__ import annotations

import os
import sys


class UserError(Exception):
    """Bad input that a person can fix; printed as one line, exit code 2."""


def report_user_error(prog: str, error: UserError) -> int:
    """Print ``error`` as ``PROG: error: ...`` on stderr and return exit code 2; with
    ``TITAN_DEBUG=1``, raise it instead, for the traceback."""
    if os.environ.get("TITAN_DEBUG") == "1":
        raise error
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


class RunStopped(Exception):
    """A run that ended early on purpose (a signal, a non-finite loss); one line, its own exit code.

    Args:
        message: what happened and what to do next.
        exit_code: the process's exit status.
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
