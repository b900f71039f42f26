"""The write plan of a conversion, from file headers alone: every output file with its size and
contents, and one job per layer group.

A writer describes its output as `outputs(group, tensors)`: the (file, key, tensor) triples one
group of canonical tensors becomes ((file, None, None): the file exists, holding no tensor),
computed by the writer's own conversion code. Run on the shape-only tensors of
`TensorMap.shapes` (neoxconv.lazy) it plans: every file's entries in order, hence every byte
offset, the bytes each job writes and how many of them are copied from a source (Lazy rows) or
computed (a real tensor: a row-parallel merge, a cast, a mean). Run on
`TensorMap.lazy_group` by neoxconv.pipeline it writes. Nothing else decides what goes where, so
the plan and the written files cannot disagree, and `--dry-run` is the plan printed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neoxconv.lazy import Lazy
from neoxconv.tensormap import Group

Entry = tuple[str, torch.dtype, tuple[int, ...]]  # key in the file, dtype, shape
Outputs = Callable[[Group, dict], Iterable[tuple[str, str, Any]]]  # -> (file, key, tensor)


@dataclass
class OutFile:
    """One output file: a torch zip (`tree` holds ptio Slots, `slots` by key) or safetensors."""

    relpath: str
    kind: str  # "pt" | "safetensors"
    entries: list[Entry]
    nbytes: int
    tree: Any = None
    slots: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] | None = None

    @property
    def index(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """key -> (dtype, shape)."""
        if not hasattr(self, "_index"):
            self._index = {key: (dtype, tuple(shape)) for key, dtype, shape in self.entries}
        return self._index

    def open(self, path: Path, on_write: Callable[[int, int], None] | None = None):
        """The file's writer; its header (zip: the pickle and format records) is written now."""
        if self.kind == "pt":
            from neoxconv.ptio import PtWriter

            return PtWriter(path, self.tree, on_write=on_write)
        from neoxconv.io import SafetensorsStreamWriter

        return SafetensorsStreamWriter(path, self.entries, self.metadata, on_write=on_write)


def pt_file(relpath: str, entries: list[Entry], tree: Callable[[dict], Any] = dict) -> OutFile:
    """A torch-saved file of `entries` (keys in order); `tree(slots)` wraps the key -> Slot dict
    into what the file holds (e.g. DeepSpeed's model-states dict)."""
    from neoxconv.ptio import PtWriter, Slot

    slots = {key: Slot(dtype, tuple(shape)) for key, dtype, shape in entries}
    obj = tree(slots)
    return OutFile(relpath, "pt", entries, PtWriter.size_of(obj, Path(relpath)), obj, slots)


def safetensors_file(relpath: str, entries: list[Entry], metadata: dict[str, str] | None = None) -> OutFile:
    from neoxconv.io import SafetensorsStreamWriter

    return OutFile(relpath, "safetensors", entries, SafetensorsStreamWriter.size_of(entries, metadata),
                   metadata=metadata)


@dataclass
class Job:
    """One group: the files it writes into and what it costs."""

    group: Group
    files: list[str]  # in the order the group first writes them
    tensors: int = 0
    nbytes: int = 0  # bytes it writes
    computed: int = 0  # of which computed in memory (the rest are rows copied from a source)


@dataclass
class Plan:
    files: dict[str, OutFile]  # in the order they are first written
    jobs: list[Job]
    outputs: Outputs
    load: Callable[[Group], dict]  # a group's tensors to write (Lazy where they can be)
    finisher: Callable[..., dict]  # (out, **late) -> the small files (configs, index, ...) and the result
    options: dict  # everything besides the source that decides the weights files (resume's check)
    late: dict = field(default_factory=dict)  # finisher options known only once OUT's temp dir is (NeoX YAML keys)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files.values())

    def data_bytes(self, skip: Iterable[str] = ()) -> int:
        """Tensor bytes `execute` writes, and counts to its `progress`, leaving out the files in
        `skip` (a resumed run's finished ones)."""
        skip = set(skip)
        return sum(math.prod(shape) * dtype.itemsize for rel, f in self.files.items() if rel not in skip
                   for _, dtype, shape in f.entries)

    def finish(self, out: Path) -> dict:
        """Write the small files beside the weights (configs, shard index, ...); the result."""
        return self.finisher(Path(out), **self.late)

    def produce(self, group: Group) -> Iterable[tuple[str, str, Any]]:
        return self.outputs(group, self.load(group))

    def memory(self, workers: int) -> int:
        """Predicted peak of computed tensors in memory, an upper bound: the `workers` largest
        jobs at once, each holding its computed outputs and the inputs they come from (x2). Planned
        from headers, a tensor that is only rearranged (a row-parallel merge or split, permuted
        rows) counts as computed, though the run gathers it through a 1 MiB buffer per worker
        (neoxconv.pipeline.tensor_parts)."""
        per_job = sorted((2 * j.computed for j in self.jobs), reverse=True)
        return sum(per_job[:max(1, workers)])

    def summary(self, workers: int = 1) -> dict:
        tensor_bytes = sum(j.nbytes for j in self.jobs)
        computed = sum(j.computed for j in self.jobs)
        return {"files": [{"path": f.relpath, "bytes": f.nbytes, "tensors": len(f.entries)}
                          for f in self.files.values()],
                "tensors": sum(j.tensors for j in self.jobs), "bytes": self.nbytes,
                "bytes_copied": tensor_bytes - computed, "bytes_computed": computed,
                "peak_memory_bytes": self.memory(workers), "workers": workers}

    def digest(self, sources: list[Path]) -> str:
        """What a resumed run must agree on: neoxconv's version, the options, every planned file
        and its size, and the sources (every file's path, size and modification time)."""
        from neoxconv import __version__

        record = {"neoxconv": __version__, "options": self.options,
                  "files": [[f.relpath, f.nbytes] for f in self.files.values()], "sources": fingerprint(sources)}
        return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(paths: list[Path]) -> list:
    """(path, size, mtime_ns) of every regular file under the given files and directories."""
    out = []
    for p in paths:
        p = Path(p)
        for f in sorted(p.rglob("*")) if p.is_dir() else [p] if p.is_file() else []:
            if f.is_file():
                st = f.stat()
                out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def make_plan(groups: list[Group], shapes: Callable[[Group], dict], outputs: Outputs,
              layout: Callable[[str, list[Entry]], OutFile], load: Callable[[Group], dict],
              finish: Callable[[Path], dict], options: dict) -> Plan:
    """Run `outputs` on every group's shape-only tensors: the entries of each file in order
    (laid out by `layout(relpath, entries)`) and the jobs."""
    entries: dict[str, list[Entry]] = {}
    jobs = []
    for g in groups:
        job = Job(g, [])
        for rel, key, t in outputs(g, shapes(g)):
            if rel not in entries:
                entries[rel] = []
            if rel not in job.files:
                job.files.append(rel)
            if key is None:  # a file without tensors (an empty state dict): planned, nothing in it
                continue
            entries[rel].append((key, t.dtype, tuple(t.shape)))
            n = t.numel() * t.dtype.itemsize
            job.tensors += 1
            job.nbytes += n
            if not isinstance(t, Lazy):
                job.computed += n
        jobs.append(job)
    files = {rel: layout(rel, e) for rel, e in entries.items()}
    return Plan(files, jobs, outputs, load, finish, options)
