"""Stream a `.pt` file that `torch.load` reads, byte-identical to what `torch.save` writes.

`PtWriter(path, tree)` takes the object tree to save, in which tensors may be

- `Slot(dtype, shape)`: a contiguous tensor whose bytes come later, from `write(slot, data)`;
- a `TensorRecord` of an indexed source file: its storage is copied from the source file with
  `os.copy_file_range`, reusing the CRC-32 from the source's central directory (nothing is read);
- a `torch.Tensor`: written from memory, as torch.save would.

The pickle (`data.pkl`, protocol 2 with torch's persistent ids) is made from the tree at once,
so storage keys, record sizes and therefore every offset in the file are known before any data
exists: `write` may be called in any order and from several threads (positional writes), and
nothing but the pickle is held in memory. Records are laid out as torch.save lays them out
(data.pkl, .format_version, .storage_alignment, byteorder, data/0..N-1, version,
.data/serialization_id; see zipformat.py), so a file written here from the same tree equals
torch.save's byte for byte.

A file is written to its final path; on error it is removed (`with PtWriter(...) as w:`).
"""

from __future__ import annotations

import collections
import io
from collections.abc import Callable
import os
import pickle
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neoxconv.ptio.index import StorageRecord, TensorRecord, storage_classes
from neoxconv.ptio.ranges import Gathered, MappedFile, PositionalOutput, copy_range, crc32
from neoxconv.ptio.zipformat import DESCRIPTOR_SIG, central_directory, layout, serialization_id

PICKLE_PROTOCOL = 2  # torch.serialization.DEFAULT_PROTOCOL
_FORMAT_RECORDS = ((".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little"))
_VERSION = b"3\n"  # PyTorchStreamWriter's kMinProducedFileFormatVersion for torch.save
_SERIAL_ID = ".data/serialization_id"


@dataclass(frozen=True, eq=False)
class Slot:
    """A planned contiguous tensor: dtype and shape now, bytes later (`PtWriter.write`)."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class FileRange:
    """Bytes of another file: copied with copy_file_range; crc32 known, or computed from `data`
    (the same bytes, e.g. a mapped view, when the caller has them) or from a mapping."""

    path: Path
    offset: int
    nbytes: int
    crc32: int | None = None
    data: Any = field(default=None, compare=False, repr=False)


# ---------------------------------------------------------------------------------------------
# data.pkl


def _storage_class(dtype: torch.dtype):
    """torch's typed storage class for a dtype (rebuilt with _rebuild_tensor_v2), or None: dtypes
    torch saves as UntypedStorage with _rebuild_tensor_v3 (uint16, float8, ...)."""
    return storage_classes().get(dtype)


class _StorageStub:
    """Stands for one storage in the pickle; pickled as torch's persistent id."""

    __slots__ = ("dtype", "nbytes", "source", "key")

    def __init__(self, dtype: torch.dtype, nbytes: int, source: Any):
        self.dtype, self.nbytes, self.source, self.key = dtype, nbytes, source, None


class _TensorStub:
    """Pickles as torch.Tensor.__reduce_ex__ does for a plain dense CPU tensor."""

    __slots__ = ("storage", "offset", "shape", "stride", "dtype", "requires_grad")

    def __init__(self, storage, offset, shape, stride, dtype, requires_grad):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride
        self.dtype, self.requires_grad = dtype, requires_grad

    def __reduce_ex__(self, protocol):
        args = (self.storage, self.offset, tuple(self.shape), tuple(self.stride), self.requires_grad,
                collections.OrderedDict())
        if _storage_class(self.dtype) is None:
            return torch._utils._rebuild_tensor_v3, (*args, self.dtype)
        return torch._utils._rebuild_tensor_v2, args


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


class _Stubber:
    """Replaces every tensor placeholder in a tree by a _TensorStub; one _StorageStub per storage."""

    def __init__(self):
        self.storages: dict[Any, _StorageStub] = {}
        self.tensors: dict[int, _TensorStub] = {}  # id(leaf) -> stub: a leaf seen twice stays one object
        self.slots: dict[int, _StorageStub] = {}  # id(Slot) -> its storage
        self.memo: dict[int, Any] = {}  # id(container) -> stubbed container

    def stub(self, x: Any) -> Any:
        """`x` with tensors replaced by stubs. Containers without tensors are returned as they
        are, and a container seen twice maps to one copy, so the pickle's memo (shared
        references) comes out as torch.save's."""
        if isinstance(x, (Slot, TensorRecord, torch.Tensor)):
            if id(x) not in self.tensors:
                self.tensors[id(x)] = self._tensor(x)
            return self.tensors[id(x)]
        if type(x) not in (dict, collections.OrderedDict, list, tuple):
            return x
        if id(x) in self.memo:
            return self.memo[id(x)]
        if type(x) in (dict, collections.OrderedDict):
            items = [(k, self.stub(v)) for k, v in x.items()]
            same = all(a is b for (_, a), b in zip(items, x.values(), strict=True))
            out = x if same else type(x)(items)
        else:
            values = [self.stub(v) for v in x]
            same = all(a is b for a, b in zip(values, x, strict=True))
            out = x if same else type(x)(values)
        self.memo[id(x)] = out
        return out

    def _storage(self, ident: Any, dtype: torch.dtype, nbytes: int, source: Any) -> _StorageStub:
        st = self.storages.get(ident)
        if st is None:
            st = self.storages[ident] = _StorageStub(dtype, nbytes, source)
        elif st.dtype != dtype:  # torch.save refuses this too
            raise ValueError("cannot save tensors that view one storage as different dtypes")
        return st

    def _tensor(self, x: Any) -> _TensorStub:
        if isinstance(x, Slot):
            st = self._storage(id(x), x.dtype, x.nbytes, x)
            self.slots[id(x)] = st
            return _TensorStub(st, 0, x.shape, _contiguous_strides(x.shape), x.dtype, False)
        if isinstance(x, TensorRecord):
            if x.parameter:
                raise ValueError("a record saved as torch.nn.Parameter: write it as a plain tensor")
            st = self._storage(x.storage, x.dtype, x.storage.nbytes, x.storage)
            return _TensorStub(st, x.storage_offset, x.shape, x.stride, x.dtype, x.requires_grad)
        if x.device.type != "cpu" or x.layout != torch.strided or type(x) is not torch.Tensor:
            raise ValueError(f"only plain dense CPU tensors can be written, got {type(x).__name__} on {x.device}")
        storage = x.untyped_storage()
        st = self._storage(storage._cdata, x.dtype, storage.nbytes(), x)
        return _TensorStub(st, x.storage_offset(), tuple(x.shape), x.stride(), x.dtype, x.requires_grad)


def pickle_tree(tree: Any) -> tuple[bytes, list[_StorageStub], dict[int, _StorageStub]]:
    """data.pkl for `tree`, the storages in key order, and the storage of each Slot (by id)."""
    stubber = _Stubber()
    stubbed = stubber.stub(tree)
    order: list[_StorageStub] = []

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if type(obj) is not _StorageStub:
                if isinstance(obj, (torch.Tensor, torch.UntypedStorage, torch.storage.TypedStorage)):
                    raise ValueError("a tensor inside a container other than dict/list/tuple cannot be written")
                return None
            if obj.key is None:
                obj.key = str(len(order))  # torch: id_map.setdefault(storage, str(len(id_map)))
                order.append(obj)
            cls = _storage_class(obj.dtype)
            if cls is None:
                return ("storage", torch.UntypedStorage, obj.key, "cpu", obj.nbytes)
            return ("storage", cls, obj.key, "cpu", obj.nbytes // obj.dtype.itemsize)

    buf = io.BytesIO()
    _Pickler(buf, protocol=PICKLE_PROTOCOL).dump(stubbed)
    return buf.getvalue(), order, stubber.slots


# ---------------------------------------------------------------------------------------------
# the writer


@dataclass
class _Record:
    index: int
    nbytes: int
    crc: int | None = None
    words: list[int] = field(default_factory=list)  # CRC words torch's writer sees (see _descriptor_words)


def _record_sizes(pkl: bytes, storages: list[_StorageStub]) -> list[tuple[str, int]]:
    """Every record of the archive, in torch.save's order, with its size."""
    return [("data.pkl", len(pkl)), *((n, len(b)) for n, b in _FORMAT_RECORDS),
            *((f"data/{s.key}", s.nbytes) for s in storages), ("version", len(_VERSION)), (_SERIAL_ID, 40)]


def _archive_name(path: Path) -> str:
    """torch's archive folder: the file name up to its last dot."""
    name = Path(path).name
    return name.rsplit(".", 1)[0] if "." in name else name


class PtWriter(PositionalOutput):
    """`on_write(offset, nbytes)` is called after every write into the file (from the writing
    thread): a reader can follow what is finished (neoxconv.pipeline hashes files as they grow)."""

    def __init__(self, path: Path, tree: Any, archive: str | None = None,
                 on_write: Callable[[int, int], None] | None = None):
        self.path = Path(path)
        self._on_write = on_write
        pkl, storages, slots = pickle_tree(tree)
        self._storages = storages
        self._slot_storage = slots
        records = _record_sizes(pkl, storages)
        self._names = [n for n, _ in records]
        self._entries = layout(archive or _archive_name(self.path), records)
        self._recs = {s.key: _Record(4 + i, s.nbytes) for i, s in enumerate(storages)}
        self._small: dict[int, tuple[int, list[int]]] = {}  # entry index -> (crc, words)
        self._lock = threading.Lock()
        self._claimed: set[str] = set()
        self._sources: dict[Path, MappedFile] = {}
        self._fd = -1
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._put(0, pkl)
            for i, (_, data) in enumerate(_FORMAT_RECORDS, start=1):
                self._put(i, data)
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def size_of(tree: Any, path: Path, archive: str | None = None) -> int:
        """The size of the file `PtWriter(path, tree)` writes (planning: nothing is opened)."""
        pkl, storages, _ = pickle_tree(tree)
        entries = layout(archive or _archive_name(Path(path)), _record_sizes(pkl, storages))
        return entries[-1].end + len(central_directory(entries, [0] * len(entries)))

    @property
    def nbytes(self) -> int:
        """Size of the finished file (known from the plan)."""
        return self._entries[-1].end + len(central_directory(self._entries, [0] * len(self._entries)))

    def slots(self) -> list[Slot]:
        """Slots still to be written, in file order."""
        return [s.source for s in self._storages if isinstance(s.source, Slot) and self._recs[s.key].crc is None]

    def write(self, slot: Slot, data) -> None:
        """The bytes of one Slot: a tensor of its dtype and shape, raw bytes, a FileRange, or a
        list of those in order (concatenated). Thread-safe; any order."""
        st = self._slot_storage.get(id(slot))
        if st is None:
            raise KeyError(f"{slot} is not a slot of this file")
        if isinstance(data, torch.Tensor):
            if data.dtype != slot.dtype or tuple(data.shape) != tuple(slot.shape):
                raise ValueError(f"slot is {slot.dtype} {tuple(slot.shape)}, got {data.dtype} {tuple(data.shape)}")
        self._write_storage(st, data)

    # -- internals -----------------------------------------------------------------------------

    def _write_storage(self, st: _StorageStub, data: Any) -> None:
        """Write one storage record from a tensor, bytes, a FileRange, or a list of those
        concatenated (e.g. a dim-0 merge of ranks: ranges of several source files)."""
        rec = self._recs[st.key]
        entry = self._entries[rec.index]
        parts = [p if isinstance(p, (FileRange, Gathered)) else _raw_bytes(p)
                 for p in (data if isinstance(data, (list, tuple)) else [data])]
        sizes = [p.nbytes if isinstance(p, (FileRange, Gathered)) else len(p) for p in parts]
        if sum(sizes) != rec.nbytes:
            raise ValueError(f"data/{st.key} needs {rec.nbytes} bytes, got {sum(sizes)}")
        with self._lock:
            if st.key in self._claimed:
                raise ValueError(f"data/{st.key} written twice")
            self._claimed.add(st.key)
        self._pwrite(entry.header, entry.header_offset)
        crc, head, at = 0, b"", entry.data_offset
        for part, n in zip(parts, sizes, strict=True):
            if isinstance(part, FileRange):
                whole = len(parts) == 1 and part.crc32 is not None  # the CRC of the source record
                if whole:
                    crc = part.crc32
                elif part.data is not None:
                    crc = crc32(part.data, crc)
                else:
                    crc = self._mapped(part.path).crc32(part.offset, n, crc)
                fd = os.open(part.path, os.O_RDONLY)  # per part: writers hold no source fds
                try:
                    if len(head) < 8:
                        head += bytes(part.data[:8 - len(head)]) if part.data is not None else \
                            os.pread(fd, 8 - len(head), part.offset)
                    self._io(copy_range, fd, part.offset, self._fd, at, n)
                finally:
                    os.close(fd)
                self._wrote(at, n)
            elif isinstance(part, Gathered):
                def each(chunk):
                    nonlocal crc, head
                    crc = crc32(chunk, crc)
                    head += bytes(chunk[:8 - len(head)])
                self._pwrite_gathered(part, at, each)
            else:
                crc = crc32(part, crc)
                head += bytes(part[:8 - len(head)])
                self._pwrite(part, at)
            at += n
        self._pwrite(entry.descriptor(crc), entry.data_offset + entry.size)
        with self._lock:
            rec.crc, rec.words = crc, _descriptor_words(entry, head, crc)

    def _put(self, index: int, data: bytes) -> None:
        """A small record (pickle, format records, version, id), written whole."""
        entry = self._entries[index]
        crc = crc32(data)
        self._pwrite(entry.header + data + entry.descriptor(crc), entry.header_offset)
        self._small[index] = (crc, _descriptor_words(entry, data[:8], crc))


    def _mapped(self, path: Path) -> MappedFile:
        """A source file mapped for the CRC of ranges whose bytes the caller did not pass."""
        path = Path(path)
        with self._lock:
            if path not in self._sources:
                self._sources[path] = MappedFile(path)
            return self._sources[path]

    def close(self) -> None:
        """Write what the tree holds itself (source records, tensors), the trailing records and
        the central directory. Every Slot must have been written."""
        try:
            for st in self._storages:
                if self._recs[st.key].crc is not None:
                    continue
                if isinstance(st.source, StorageRecord):
                    src = st.source
                    self._write_storage(st, FileRange(src.path, src.offset, src.nbytes, src.crc32))
                elif isinstance(st.source, torch.Tensor):
                    self._write_storage(st, _storage_bytes(st.source))
            missing = [f"data/{st.key}" for st in self._storages if self._recs[st.key].crc is None]
            if missing:
                raise ValueError(f"{self.path}: closed with {len(missing)} slot(s) unwritten ({missing[0]}, ...)")
            n_version = len(self._entries) - 2
            self._put(n_version, _VERSION)
            crcs: list[int | None] = [None] * len(self._entries)
            words: list[int] = []
            for i in range(len(self._entries) - 1):
                crc, w = self._small[i] if i in self._small else self._by_index(i)
                crcs[i] = crc
                words += w
            sid = serialization_id(self._names[:-1], words).encode()
            self._put(len(self._entries) - 1, sid)
            crcs[-1] = self._small[len(self._entries) - 1][0]
            self._pwrite(central_directory(self._entries, crcs), self._entries[-1].end)
            self._io(os.ftruncate, self._fd, self.nbytes)
        except BaseException:
            self.abort()
            raise
        self._close_fds()

    def _by_index(self, index: int) -> tuple[int, list[int]]:
        rec = self._recs[self._storages[index - 4].key]
        return rec.crc, rec.words

    def _close_fds(self) -> None:
        self._sources.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        """Close and remove the unfinished file."""
        self._close_fds()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> PtWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _descriptor_words(entry, head: bytes, crc: int) -> list[int]:
    """The 32-bit words torch's writer folds into the serialization id for one record: it reads
    bytes 4..8 of every write that starts with the data-descriptor signature, so a record whose
    data happens to start with PK 07 08 contributes one word more than its CRC."""
    words = []
    if entry.name.encode()[:4] == DESCRIPTOR_SIG and len(entry.name) >= 8:
        words.append(int.from_bytes(entry.name.encode()[4:8], "little"))
    if entry.size >= 8 and head[:4] == DESCRIPTOR_SIG:
        words.append(int.from_bytes(head[4:8], "little"))
    if entry.size:
        words.append(crc)
    return words


def _raw_bytes(data: Any) -> memoryview:
    if isinstance(data, torch.Tensor):
        t = data.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        if t.numel() == 0:
            return memoryview(b"")
        return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")
    return memoryview(data).cast("B")


def _storage_bytes(t: torch.Tensor) -> memoryview:
    """All bytes of a tensor's storage (torch.save writes the whole storage of a view)."""
    storage = t.untyped_storage()
    if storage.nbytes() == 0:
        return memoryview(b"")
    flat = torch.empty(0, dtype=torch.uint8).set_(storage)
    return memoryview(flat.numpy()).cast("B")


def save(tree: Any, path: Path) -> None:
    """torch.save(tree, path) for trees of tensors and TensorRecords (no Slots): records are
    copied from their source files without being read."""
    PtWriter(path, tree).close()
