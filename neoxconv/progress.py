"""How long operations report how far they are (the bars themselves: neoxconv.cli.progress).

An operation takes a callback and calls it with what is done of a known total: ``(done, total)``
for one phase, ``(label, done, total)`` for a sequence of phases (parity's forward passes), and
``(label, done, total, unit)`` where the phases count different things (export-run).
"""

from __future__ import annotations

from collections.abc import Callable

BYTES = "bytes"
GROUPS = "layer groups"

Progress = Callable[[int, int], None]


def counter(total: int, progress: Progress | None) -> Callable[[int], None]:
    """``add(n)``: n more of ``total`` done, reported to ``progress(done, total)`` as a running sum."""
    done = 0

    def add(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    return add
