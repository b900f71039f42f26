"""Progress bars for the long operations (conversions, verify, parity, export-run).

One rich bar per operation on stderr, with the time left: bytes with their speed for work over
bytes (writing, hashing), a count for work over layer groups (forward passes, scans). Off with
--json and when stderr is not a terminal; transient, so the summary lines stay alone.
"""

from __future__ import annotations

from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)

from neoxconv.cli.app import console
from neoxconv.progress import BYTES, GROUPS

__all__ = ["BYTES", "GROUPS", "Bar", "Bars"]


class Bar:
    """``Bar(what, total, unit=..., quiet=...)``; ``advance(n)`` or ``update(done, total)``; used
    as a context manager, or with ``start()`` / ``stop()``."""

    def __init__(self, what: str, total: int | None = None, *, unit: str = BYTES, quiet: bool = False):
        counts = [DownloadColumn(), TransferSpeedColumn()] if unit == BYTES else [MofNCompleteColumn(), TextColumn(unit)]
        self.progress = Progress(TextColumn(what), BarColumn(), *counts, TimeRemainingColumn(), console=console,
                                 transient=True, disable=quiet or not console.is_terminal)
        self.task = self.progress.add_task("", total=total)

    @property
    def disabled(self) -> bool:
        return self.progress.disable

    def advance(self, n: int) -> None:
        self.progress.update(self.task, advance=n)

    def update(self, done: int, total: int | None = None) -> None:
        self.progress.update(self.task, completed=done, total=total)

    def start(self) -> Bar:
        self.progress.start()
        return self

    def stop(self) -> None:
        self.progress.stop()

    def __enter__(self) -> Bar:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Bars:
    """One bar at a time for a sequence of labelled phases reporting ``(label, done, total)``
    (parity's two forward passes; hashing, then scanning): a new label stops the previous bar
    and starts its own, counting in ``unit`` (the default given here, or the call's); a phase
    that reaches its total is finished and its bar goes (so a report printed next stands alone)."""

    def __init__(self, unit: str, quiet: bool):
        self.unit, self.quiet = unit, quiet
        self.label: str | None = None
        self.bar: Bar | None = None

    def __call__(self, label: str, done: int, total: int, unit: str | None = None) -> None:
        if label != self.label:
            self.stop()
            self.label, self.bar = label, Bar(label, total, unit=unit or self.unit, quiet=self.quiet).start()
        if self.bar is None:  # this phase is finished
            return
        self.bar.update(done, total)
        if total and done >= total:
            self.bar.stop()
            self.bar = None

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        self.label, self.bar = None, None
