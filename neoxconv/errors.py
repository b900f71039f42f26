"""User-facing errors: one line, exit code 2, no traceback (unless --debug)."""

from __future__ import annotations


class NeoxconvError(Exception):
    """A problem with the user's input or environment. The message is shown as one line."""

    exit_code = 2


class DamagedInput(NeoxconvError):
    """The input is a checkpoint, but its files are damaged: unreadable or truncated tensor data,
    a referenced file missing, shards that disagree, non-finite values, a hash mismatch.
    Conversions refuse it like any bad input (exit 2); `neoxconv verify` reports it as
    "damaged" (exit 1), as opposed to input that is not a readable checkpoint at all (exit 2)."""


class ParityFailure(NeoxconvError):
    """A numerical check ran and failed (exit code 1)."""

    exit_code = 1
