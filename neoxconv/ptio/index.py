"""Index a torch-saved (`.pt`) file without reading tensor data.

A `torch.save` file is a zip archive (neox-formats.md; torch/serialization.py): `<archive>/data.pkl`
holds the pickled object tree, each tensor storage is a stored (uncompressed) record
`<archive>/data/<key>`, and small records say `.format_version`, `.storage_alignment`, `byteorder`
and `version`. `index_pt` reads the zip central directory, one 30-byte local header per record
(to find where its bytes start) and `data.pkl`, and unpickles it with a restricted unpickler that
turns every tensor into a `TensorRecord` (dtype, shape, stride, storage offset, and the byte range
of its storage in the file) instead of loading it. Non-tensor values (ints, strings, dicts, the
numpy RNG state of DeepSpeed/NeoX files, ...) are kept as they are.

Restricted unpickling: only the globals on an allowlist are resolved, a subset of what
`torch.load(weights_only=True)` plus `neoxconv.io._safe_globals()` accept (torch's tensor and
storage rebuild functions are replaced by record builders, so no tensor is created and no data is
read). Anything else (a code payload such as `os.system`) is refused with a one-line error before
it runs. numpy's `_reconstruct`/`scalar` are accepted under both module spellings, `numpy.core`
(files written with numpy 1) and `numpy._core` (numpy 2): the same objects either way.

Legacy (pre-1.6, non-zip) torch files are refused with a clear error: `torch.load(mmap=True)`,
which neoxconv uses for every pickled input, cannot read them either, and NeoX/DeepSpeed have
written zip files since 2020.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from neoxconv.errors import DamagedInput, NeoxconvError

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # zip local file header, 30 bytes
_LOCAL_SIG = 0x04034B50


@dataclass(frozen=True, slots=True)
class StorageRecord:
    """One `data/<key>` record: a tensor storage as stored in the file."""

    path: Path
    key: str
    dtype: torch.dtype  # the dtype the storage was saved with (uint8 for untyped storages)
    nbytes: int
    offset: int  # byte offset of the record's data in the file
    crc32: int | None  # from the central directory (None for safetensors): an unchanged copy reuses it
    location: str  # where it lived when saved ("cpu", "cuda:0"); irrelevant for reading


@dataclass(frozen=True, slots=True)
class TensorRecord:
    """A tensor as `torch.load` would rebuild it, without its data."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage: StorageRecord
    storage_offset: int = 0  # in elements of `dtype`
    requires_grad: bool = False
    parameter: bool = False  # saved as torch.nn.Parameter

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    @property
    def file_range(self) -> tuple[int, int] | None:
        """(offset, nbytes) of this tensor's bytes in the file, when they are one contiguous run."""
        if not self.is_contiguous:
            return None
        return self.storage.offset + self.storage_offset * self.dtype.itemsize, self.nbytes

    @property
    def whole_storage(self) -> bool:
        """The tensor is exactly its storage: copying the record copies the tensor (crc known)."""
        return self.is_contiguous and self.storage_offset == 0 and self.nbytes == self.storage.nbytes


@dataclass
class PtIndex:
    """What a torch-saved file holds, from its headers and pickle alone."""

    path: Path
    obj: Any  # the unpickled tree, tensors replaced by TensorRecord
    records: dict[str, zipfile.ZipInfo] = field(repr=False)  # record name (no archive prefix) -> zip entry
    archive: str = ""  # the archive folder name inside the zip

    def tensors(self) -> dict[str, TensorRecord]:
        """Every TensorRecord in the tree, keyed by its dotted path ("module.sequential.0.x.weight")."""
        out: dict[str, TensorRecord] = {}

        def walk(prefix: str, x: Any) -> None:
            if isinstance(x, TensorRecord):
                out[prefix] = x
            elif isinstance(x, dict):
                for k, v in x.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            elif isinstance(x, (list, tuple)):
                for i, v in enumerate(x):
                    walk(f"{prefix}.{i}" if prefix else str(i), v)

        walk("", self.obj)
        return out


def index_pt(path: Path, trust: bool | None = None) -> PtIndex:
    """Index a torch-saved file: central directory, local headers and `data.pkl` only.

    `trust` (default: neoxconv.io's --trust-pickle setting) resolves any global, as
    full unpickling (torch.load without weights_only) would; tensors are still records, never loaded.
    """
    from neoxconv import io as nio

    path = Path(path)
    trust = nio._TRUST_PICKLE if trust is None else trust
    try:
        with open(path, "rb") as f:
            if not zipfile.is_zipfile(f):
                raise DamagedInput(f"{path}: cannot load checkpoint: not a torch zip archive (damaged, empty, or a "
                                   "legacy pre-1.6 torch file: re-save it with torch >= 1.6)")
            zf = zipfile.ZipFile(f)
            records, archive = _records(path, zf)
            offsets = _data_offsets(path, f, records)
            _check_format(path, zf, records)
            pkl = zf.read(records["data.pkl"])
    except NeoxconvError:
        raise
    except FileNotFoundError:
        raise DamagedInput(f"{path}: file not found") from None
    except Exception as e:  # noqa: BLE001 - zipfile raises many types on damage; the user needs one line
        raise DamagedInput(f"{path}: cannot load checkpoint: damaged torch archive ({type(e).__name__}: {e})") from None
    unpickler = _RecordUnpickler(pkl, path, records, offsets, trust)
    try:
        obj = unpickler.load()
    except NeoxconvError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt pickle raises anything; the user needs one line
        raise DamagedInput(f"{path}: cannot load checkpoint: {type(e).__name__}: {e}") from None
    return PtIndex(path, obj, records, archive)


def _records(path: Path, zf: zipfile.ZipFile) -> tuple[dict[str, zipfile.ZipInfo], str]:
    infos = zf.infolist()
    if not infos or "/" not in infos[0].filename:
        raise DamagedInput(f"{path}: cannot load checkpoint: not a torch archive (records are not in one folder)")
    archive = infos[0].filename.split("/", 1)[0]
    records = {}
    for info in infos:
        folder, _, name = info.filename.partition("/")
        if folder != archive:
            raise DamagedInput(f"{path}: cannot load checkpoint: not a torch archive (records in folders {archive!r} "
                               f"and {folder!r})")
        records[name] = info
    if "data.pkl" not in records:
        raise DamagedInput(f"{path}: cannot load checkpoint: no data.pkl record (a TorchScript or other archive?)")
    return records, archive


def _data_offsets(path: Path, f, records: dict[str, zipfile.ZipInfo]) -> dict[str, int]:
    """Where each data/ record's bytes start: after its local header, name and extra field."""
    offsets = {}
    fd = f.fileno()
    size = os.fstat(fd).st_size
    for name, info in records.items():
        if not name.startswith("data/"):
            continue
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise NeoxconvError(f"{path}: record {name} is compressed or encrypted; torch writes stored records only")
        raw = os.pread(fd, _LOCAL_HEADER.size, info.header_offset)
        if len(raw) != _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(raw)[0] != _LOCAL_SIG:
            raise DamagedInput(f"{path}: cannot load checkpoint: corrupt zip: no local header for record {name}")
        name_len, extra_len = _LOCAL_HEADER.unpack(raw)[9:11]
        offsets[name] = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if offsets[name] + info.file_size > size:
            raise DamagedInput(f"{path}: cannot load checkpoint: record {name} ends beyond the file (truncated?)")
    return offsets


def _check_format(path: Path, zf: zipfile.ZipFile, records: dict[str, zipfile.ZipInfo]) -> None:
    if "byteorder" in records:
        order = zf.read(records["byteorder"]).decode(errors="replace")
        if order != "little":
            raise NeoxconvError(f"{path}: tensors are stored {order}-endian (byteorder record {order!r}); "
                                "neoxconv reads little-endian checkpoints only")


# ---------------------------------------------------------------------------------------------
# the restricted unpickler


@dataclass(frozen=True, slots=True)
class _Marker:
    """A storage type (torch.HalfStorage, ...) named by the pickle: only its dtype matters.
    Frozen: a pickle's BUILD opcode cannot change it (markers are shared between files)."""

    dtype: torch.dtype


_STORAGE_NAMES = ("DoubleStorage", "FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage", "IntStorage",
                  "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage", "ComplexFloatStorage",
                  "ComplexDoubleStorage")


@functools.cache
def storage_classes() -> dict[torch.dtype, type]:
    """dtype -> torch's legacy typed storage class (torch.HalfStorage, ...), which torch.save
    names in its persistent ids; other dtypes are saved as torch.UntypedStorage."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "TypedStorage is deprecated"
        return {getattr(torch, name).dtype: getattr(torch, name) for name in _STORAGE_NAMES}


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> object. torch's weights_only defaults that plain tensors need, plus
    neoxconv.io's allowlist for NeoX/DeepSpeed metadata."""
    import _codecs

    from neoxconv.io import _safe_globals

    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("_codecs", "encode"): _codecs.encode,  # bytes in protocol 2
    }
    for mod in ("builtins", "__builtin__"):  # protocol 2 files name the Python 2 module
        allowed.update({(mod, "set"): set, (mod, "bytearray"): bytearray, (mod, "complex"): complex})
    for dtype, cls in storage_classes().items():
        allowed[("torch", cls.__name__)] = _Marker(dtype)
    allowed[("torch.storage", "UntypedStorage")] = _Marker(torch.uint8)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    for name, fn in (("_rebuild_tensor", _rebuild_tensor), ("_rebuild_tensor_v2", _rebuild_tensor_v2),
                     ("_rebuild_tensor_v3", _rebuild_tensor_v3), ("_rebuild_parameter", _rebuild_parameter)):
        allowed[("torch._utils", name)] = fn
    for obj in _safe_globals():
        if isinstance(obj, tuple):  # (object, "module.name") as torch's safe_globals takes it
            obj, full = obj
            allowed[tuple(full.rsplit(".", 1))] = obj
            continue
        module, name = obj.__module__, obj.__qualname__
        allowed[(module, name)] = obj
        if module.startswith("numpy._core."):  # numpy 1 wrote numpy.core.*: same objects
            allowed[("numpy.core." + module[len("numpy._core."):], name)] = obj
    allowed[("argparse", "Namespace")] = argparse.Namespace
    return allowed


def _rebuild_tensor(storage: StorageRecord, storage_offset: int, size, stride,
                    dtype: torch.dtype | None = None) -> TensorRecord:
    if not isinstance(storage, StorageRecord):
        raise pickle.UnpicklingError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    dtype = dtype or storage.dtype
    rec = TensorRecord(dtype, tuple(int(s) for s in size), tuple(int(s) for s in stride), storage, int(storage_offset))
    if rec.numel:
        last = rec.storage_offset + sum((s - 1) * st for s, st in zip(rec.shape, rec.stride, strict=True))
        if min(rec.stride, default=0) < 0 or (last + 1) * dtype.itemsize > storage.nbytes:
            raise pickle.UnpicklingError(f"tensor of shape {list(rec.shape)} reaches beyond its storage "
                                         f"data/{storage.key}")
    return rec


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    if metadata:
        raise pickle.UnpicklingError(f"tensor with metadata {metadata} (conjugate/negative bit) is not supported")
    return replace(_rebuild_tensor(storage, storage_offset, size, stride), requires_grad=bool(requires_grad))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if metadata:
        raise pickle.UnpicklingError(f"tensor with metadata {metadata} (conjugate/negative bit) is not supported")
    return replace(_rebuild_tensor(storage, storage_offset, size, stride, dtype), requires_grad=bool(requires_grad))


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, TensorRecord):
        raise pickle.UnpicklingError("Parameter rebuilt from something other than a tensor")
    return replace(data, requires_grad=bool(requires_grad), parameter=True)


_ALLOWED: dict[tuple[str, str], Any] | None = None


class _RecordUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path, records, offsets: dict[str, int], trust: bool):
        import io

        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._path, self._records, self._offsets, self._trust = path, records, offsets, trust
        self._storages: dict[str, StorageRecord] = {}

    def find_class(self, module: str, name: str) -> Any:
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        obj = _ALLOWED.get((module, name))
        if obj is not None:
            return obj
        if module == "torch._utils" or module.startswith("torch._tensor"):
            raise NeoxconvError(f"{self._path}: cannot load checkpoint: {module}.{name} (a tensor kind other than a "
                                "plain dense tensor) is not supported")
        if self._trust:
            return super().find_class(module, name)  # --trust-pickle: the user's explicit opt-in
        raise NeoxconvError(f"{self._path}: cannot load checkpoint: Unsupported global: GLOBAL {module}.{name} is not "
                            "allowed (if you trust this file, pass --trust-pickle)")

    def persistent_load(self, pid: Any) -> StorageRecord:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise DamagedInput(f"{self._path}: cannot load checkpoint: unknown persistent id {pid!r:.80}")
        _, kind, key, location, numel = pid
        if not isinstance(kind, _Marker):
            raise DamagedInput(f"{self._path}: cannot load checkpoint: storage of unknown type {kind!r:.80}")
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key in self._storages:
            return self._storages[key]
        name = f"data/{key}"
        info = self._records.get(name)
        nbytes = int(numel) * kind.dtype.itemsize
        if info is None:
            raise DamagedInput(f"{self._path}: cannot load checkpoint: the pickle names storage {name}, which is "
                               "missing")
        if info.file_size != nbytes:
            raise DamagedInput(f"{self._path}: cannot load checkpoint: {name} has {info.file_size} bytes, the pickle "
                               f"says {nbytes}")
        loc = location.decode() if isinstance(location, bytes) else str(location)
        rec = StorageRecord(self._path, key, kind.dtype, nbytes, self._offsets[name], info.CRC, loc)
        self._storages[key] = rec
        return rec
