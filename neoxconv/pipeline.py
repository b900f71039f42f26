"""Run a write plan (neoxconv.plan): read, transform and write concurrently, and hash every output
file as it grows.

- **Jobs** (one per layer group) run on `workers` threads. The main thread opens each file a job
  writes into, in plan order (so what is opened when is the same for any worker count), and
  submits jobs in order, at most `workers` at once and within a memory budget of three times
  the largest job's computed bytes. torch kernels, file I/O, CRC-32 and SHA-256 release the GIL,
  so the threads overlap for real.
- **Writes** are positional (every offset is in the plan), so the output is byte-identical
  whatever the worker count or order. Rows a Lazy tensor takes from a source file are copied
  file to file (`copy_file_range`: no copy in user space); rearranged tensors (merges, splits,
  permuted rows) are gathered through a small reused buffer (`tensor_parts`); computed tensors
  are written from memory. A file is closed (its zip directory written) by whichever job writes
  into it last. The cyclic garbage collector leaves the libraries' objects alone meanwhile
  (neoxconv.heap.frozen_heap).
- **Hashing**: each file's SHA-256 follows its contiguous written prefix on background threads,
  so a file's hash is ready about when its last byte is written; the manifest and the resume
  journal take it from here instead of reading everything again at the end.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from neoxconv.heap import frozen_heap
from neoxconv.io import tensor_bytes
from neoxconv.lazy import MAX_RUNS, Joined, Lazy, real
from neoxconv.ptio.ranges import Gathered
from neoxconv.plan import OutFile, Plan

FileHash = tuple[int, str]  # (size, sha256 hex)
_HASH_CHUNK = 1 << 20  # hashed in 1 MiB pieces (hashlib releases the GIL for each)
_HASH_STEP = 8 << 20  # hash a growing file once this much more of it is written


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def tensor_parts(t) -> list:
    """What to write for one output tensor, in order, copying nothing that is already somewhere:
    the source byte ranges of a Lazy tensor's rows (ptio.FileRange, with the mapped bytes for a
    CRC) or a tensor's memory. What must be rearranged (a Joined: a row-parallel merge; a strided
    view: a row-parallel split; rows permuted one by one, as a rotary permutation does) is
    Gathered a chunk at a time, never whole in memory."""
    from neoxconv.ptio import FileRange

    if isinstance(t, Lazy):
        runs = t.runs()
        if len(runs) > MAX_RUNS:
            return [_gathered_rows(t)]
        parts = []
        for src, row, count in runs:
            data = tensor_bytes(src.tensor[row:row + count])
            if src.file is not None:
                at = src.offset + row * src.row_bytes
                parts.append(FileRange(src.file, at, count * src.row_bytes, data=data))
            else:
                parts.append(data)
        return parts
    if isinstance(t, Joined):
        return [_gathered_join(t)]
    if t.is_contiguous() or t.dim() < 2:
        return [tensor_bytes(t)]
    return [_gathered_join(Joined([t], 1))]


def _gathered_join(t: Joined) -> Gathered:
    """A Joined (one part: any strided tensor) row by row over the dims before its joined one:
    each row is every part's block, side by side."""
    parts = [real(p) for p in t.parts]
    rows = math.prod(t.shape[:t.axis])
    flat = [p.reshape(rows, -1) for p in parts]
    widths = [f.shape[1] for f in flat]
    total = sum(widths)

    def fill(r0: int, r1: int, out: torch.Tensor) -> None:
        dst = out.view(t.dtype).view(r1 - r0, total)
        at = 0
        for f, w in zip(flat, widths, strict=True):
            dst[:, at:at + w].copy_(f[r0:r1])
            at += w
    return Gathered(rows, total * t.dtype.itemsize, fill)


def _gathered_rows(t: Lazy) -> Gathered | memoryview:
    """A Lazy tensor of many short runs (rows permuted one by one), row by row."""
    if len(t.sources) != 1:
        return tensor_bytes(t.materialize())
    src = t.sources[0]
    table = src.tensor.reshape(src.rows, -1)
    index = t.ids.reshape(-1) - src.base

    def fill(r0: int, r1: int, out: torch.Tensor) -> None:
        torch.index_select(table, 0, index[r0:r1], out=out.view(t.dtype).view(r1 - r0, table.shape[1]))
    return Gathered(index.numel(), src.row_bytes, fill)


def write_tensor(writer, out: OutFile, key: str, t) -> int:
    """Write one planned tensor into its file's writer; returns its size in bytes."""
    dtype, shape = out.index[key]
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ValueError(f"{out.relpath}: {key} planned as {dtype} {list(shape)}, produced {t.dtype} {list(t.shape)}")
    parts = tensor_parts(t)
    writer.write(out.slots[key] if out.kind == "pt" else key, parts)
    return sum(p.nbytes for p in parts)


def execute(plan: Plan, root: Path, *, workers: int = 1, progress: Callable[[int], None] | None = None,
            done: dict[str, FileHash] | None = None, on_file: Callable[[str, FileHash], None] | None = None,
            ) -> dict[str, FileHash]:
    """Write `plan`'s files under `root`. Files in `done` (a resumed run's finished files) are
    neither opened nor written. `on_file(relpath, (size, sha256))` is called as each file is
    finished and hashed. Returns the size and hash of every planned file."""
    root, done, workers = Path(root), dict(done or {}), max(1, workers)
    remaining = {rel: sum(rel in j.files for j in plan.jobs) for rel in plan.files if rel not in done}
    writers: dict[str, object] = {}
    hasher = _Hasher(threads=max(1, min(workers, 4)), on_file=on_file)
    costs = {id(j): 2 * j.computed for j in plan.jobs}
    budget = _Budget(3 * max(costs.values(), default=0))
    slots = threading.Semaphore(workers)
    errors: list[BaseException] = []
    lock = threading.Lock()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

    def run(job) -> None:
        try:
            for rel, key, t in plan.produce(job.group):
                if rel in done or key is None:
                    continue
                n = write_tensor(writers[rel], plan.files[rel], key, t)
                if progress:
                    progress(n)
            for rel in job.files:
                with lock:
                    if rel in done:
                        continue
                    remaining[rel] -= 1
                    last = remaining[rel] == 0
                if last:
                    writers[rel].close()
                    hasher.close(rel)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
        finally:
            budget.release(costs[id(job)])
            slots.release()

    try:
        with frozen_heap(), ThreadPoolExecutor(workers, thread_name_prefix="neoxconv-write") as pool:
            for job in plan.jobs:
                if all(rel in done for rel in job.files):
                    continue
                slots.acquire()
                budget.acquire(costs[id(job)])
                if errors:
                    slots.release()
                    budget.release(costs[id(job)])
                    break
                for rel in job.files:
                    if rel not in done and rel not in writers:
                        path = root / rel
                        path.parent.mkdir(parents=True, exist_ok=True)
                        writers[rel] = open_writer(plan.files[rel], path, hasher.track(rel, path))
                pool.submit(run, job)
        if errors:
            raise errors[0]
        return {**done, **hasher.results()}
    except BaseException:
        for rel, w in writers.items():
            if remaining.get(rel):
                w.abort()
        raise
    finally:
        hasher.stop()
        torch.set_num_threads(threads)


def open_writer(out: OutFile, path: Path, on_write):
    """Open one output file's writer (its header is written now). Every output file is opened
    here, in plan order: the one place where a test injects a write fault."""
    return out.open(path, on_write)


class _Budget:
    """Bytes of computed tensors allowed in flight; one job always runs, whatever its size."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            while self.used and self.used + n > self.limit:
                self._cond.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class _File:
    """One output file being hashed: its written spans, how far it is hashed, its digest."""

    def __init__(self, path: Path):
        self.path, self.h, self.hashed, self.frontier = path, hashlib.sha256(), 0, 0
        self.spans: dict[int, int] = {}  # start -> end of written spans beyond the frontier
        self.closed, self.busy, self.result = False, False, None

    def add(self, offset: int, n: int) -> None:
        end = offset + n
        if end <= self.frontier:
            return
        start = max(offset, self.frontier)
        self.spans[start] = max(end, self.spans.get(start, 0))
        while self.frontier in self.spans:
            self.frontier = max(self.frontier, self.spans.pop(self.frontier))

    def ready(self) -> bool:
        return not self.busy and self.result is None and (
            self.closed or self.frontier - self.hashed >= _HASH_STEP)


class _Hasher:
    """SHA-256 of every output file, following what has been written (see the module docstring)."""

    def __init__(self, threads: int, on_file=None):
        self._files: dict[str, _File] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._error: BaseException | None = None
        self._on_file = on_file
        self._threads = [threading.Thread(target=self._run, daemon=True, name="neoxconv-hash") for _ in range(threads)]
        for t in self._threads:
            t.start()

    def track(self, rel: str, path: Path) -> Callable[[int, int], None]:
        f = self._files[rel] = _File(path)

        def on_write(offset: int, n: int) -> None:
            with self._cond:
                f.add(offset, n)
                if f.ready():
                    self._cond.notify()
        return on_write

    def close(self, rel: str) -> None:
        """The file is complete: hash what is left of it."""
        with self._cond:
            self._files[rel].closed = True
            self._cond.notify_all()

    def results(self) -> dict[str, FileHash]:
        with self._cond:
            while self._error is None and any(f.result is None for f in self._files.values()):
                self._cond.wait()
            if self._error is not None:
                raise self._error
            return {rel: f.result for rel, f in self._files.items()}

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                f = next((f for f in self._files.values() if f.ready()), None)
                while f is None and not self._stop:
                    self._cond.wait()
                    f = next((f for f in self._files.values() if f.ready()), None)
                if f is None:
                    return
                f.busy = True
                upto = None if f.closed else f.frontier
            try:
                end = _hash_range(f, upto)
            except BaseException as e:  # noqa: BLE001 - reported by results()
                with self._cond:
                    self._error = self._error or e
                    self._cond.notify_all()
                return
            with self._cond:
                f.hashed, f.busy = end, False
                if f.closed and upto is None:
                    f.result = (end, f.h.hexdigest())
                    if self._on_file:
                        self._on_file(next(r for r, g in self._files.items() if g is f), f.result)
                self._cond.notify_all()


def _hash_range(f: _File, upto: int | None) -> int:
    """Hash f from where it stands to `upto` (None: to its end). Returns where it stopped.

    The written bytes are in the page cache: they are hashed from a read-only mapping of the
    range, populated in one call (MAP_POPULATE), which saves copying them out with pread."""
    fd = os.open(f.path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        end = size if upto is None else upto
        if end > size:  # (a mapping read beyond the end of a file would kill the process)
            raise OSError(f"{f.path}: ends at {size} bytes, {end} were written")
        if end <= f.hashed:
            return f.hashed
        base = f.hashed - f.hashed % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(fd, end - base, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                       prot=mmap.PROT_READ, offset=base) as mm:
            view = memoryview(mm)
            try:
                for at in range(f.hashed - base, end - base, _HASH_CHUNK):
                    f.h.update(view[at:min(at + _HASH_CHUNK, end - base)])
            finally:
                view.release()
        return end
    finally:
        os.close(fd)
