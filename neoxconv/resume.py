"""Where a conversion writes, and `--resume`: a journal of finished files in the temporary
directory, so that a killed or failed run can be continued.

Every conversion writes into a hidden sibling `.OUT.partial-XXXX` and renames it to OUT at the end
(neoxconv.io.atomic_output_dir). Inside it, `.neoxconv-journal.jsonl` holds one line with the
plan's digest (neoxconv.plan.Plan.digest: version, options, planned files and sizes, every source
file's size and mtime), then one line per finished weights file with its size and SHA-256 (from
neoxconv.pipeline's hashing, as the file is completed).

- Without `--resume` (as before): a new temporary directory; on failure it is removed. A killed
  process leaves it behind, journal included.
- With `--resume`: the temporary directory of an earlier run of the same plan is taken up again;
  journaled files whose size and SHA-256 still match are kept (not opened, not rewritten) and
  the rest is written; the result is byte-identical to an uninterrupted run. A temporary
  directory of a different plan (changed source or options) is refused in one line. On failure
  the directory is kept for the next `--resume`. With no earlier run, it starts afresh.

The journal is removed before OUT is renamed into place; the manifest never lists it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from neoxconv.errors import NeoxconvError

JOURNAL = ".neoxconv-journal.jsonl"


class Journal:
    """The journal of one temporary output directory (see the module docstring)."""

    def __init__(self, tmp: Path, digest: str, *, resume: bool):
        self.tmp, self.digest = Path(tmp), digest
        self.path = self.tmp / JOURNAL
        self.done: dict[str, tuple[int, str]] = {}
        self.kept = 0
        recorded = _read(self.path) if resume and self.path.is_file() else None
        if recorded is not None and recorded[0] != digest:
            raise NeoxconvError(f"{self.tmp}: an earlier run with other sources or options left this; --resume "
                                "continues only the same conversion (remove it, or run without --resume)")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if recorded else os.O_TRUNC), 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise NeoxconvError(f"{self.tmp}: another neoxconv run is writing this output") from None
        if recorded is None:
            self._append({"plan": digest})
            return
        from neoxconv.manifest import sha256

        for rel, (size, digest_) in recorded[1].items():
            p = self.tmp / rel
            if p.is_file() and p.stat().st_size == size and sha256(p) == digest_:
                self.done[rel] = (size, digest_)
        self.kept = len(self.done)

    def record(self, rel: str, result: tuple[int, str]) -> None:
        """A weights file is finished: its size and SHA-256."""
        self._append({"file": rel, "size": result[0], "sha256": result[1]})

    def _append(self, entry: dict) -> None:
        os.write(self._fd, (json.dumps(entry) + "\n").encode())

    def close(self, remove: bool) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if remove:
            self.path.unlink(missing_ok=True)


def _read(path: Path) -> tuple[str, dict[str, tuple[int, str]]] | None:
    """(plan digest, finished files) of a journal; None when it has no readable header."""
    files: dict[str, tuple[int, str]] = {}
    digest = None
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if not isinstance(entry, dict):
            continue
        if digest is None:
            digest = entry.get("plan")
            if not isinstance(digest, str):
                return None
        elif isinstance(entry.get("file"), str) and isinstance(entry.get("size"), int) \
                and isinstance(entry.get("sha256"), str):
            files[entry["file"]] = (entry["size"], entry["sha256"])
    return (digest, files) if digest else None


def earlier_run(out: Path, digest: str) -> Path | None:
    """The temporary directory an earlier run of this plan left beside OUT; refuses one left by
    a different plan (the newest such directory is the one a user would mean)."""
    out = Path(out)
    if not out.parent.is_dir():
        return None
    found = sorted((p for p in out.parent.glob(f".{out.name}.partial-*") if (p / JOURNAL).is_file()),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for p in found:
        recorded = _read(p / JOURNAL)
        if recorded is not None and recorded[0] == digest:
            return p
    if found:
        raise NeoxconvError(f"{found[0]}: left by an earlier run with other sources or options; --resume continues "
                            "only the same conversion (remove it, or run without --resume)")
    return None


@contextlib.contextmanager
def output_dir(out: Path, digest: str, *, force: bool = False, resume: bool = False) -> Iterator[Journal]:
    """The temporary directory to write OUT into, with its journal (see the module docstring);
    renamed to OUT when the block succeeds."""
    from neoxconv.io import atomic_output_dir

    tmp = earlier_run(out, digest) if resume else None
    with atomic_output_dir(out, force=force, tmp=tmp, keep_on_error=resume) as tmp:
        journal = Journal(tmp, digest, resume=resume)
        try:
            yield journal
        except BaseException:
            journal.close(remove=False)
            raise
        journal.close(remove=True)
