"""User-facing errors: one line, exit code 2, no traceback (unless --debug)."""

from __future__ import annotations


class NeoxconvError(Exception):
    """A problem with the user's input or environment. The message is shown as one line."""

    exit_code = 2


class ParityFailure(NeoxconvError):
    """A numerical check ran and failed (exit code 1)."""

    exit_code = 1
