"""File I/O kept apart from conversion logic: safe pickle loading, atomic output directories,
sharded safetensors writing.

Pickled checkpoints (`.pt`, `.bin`, `.pth`) are loaded with `weights_only=True` plus an
explicit allowlist of the harmless non-tensor types real NeoX/DeepSpeed files hold (numpy RNG
state, argparse.Namespace, ...). Full unpickling is only used when the user opts in with
`--trust-pickle`, because unpickling arbitrary files can run code.

Two more reading rules live here, because every reader goes through them:

- `inside(root, ref)`: a file reference stored IN a checkpoint (`latest`, an HF index's
  `weight_map`) must name a path inside the checkpoint directory.
- `check_finite(...)`: with `--check-finite` (`set_check_finite(True)`), every floating-point
  tensor a reader loads is scanned for NaN/Inf; the error names file, tensor and TP rank.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import torch

from neoxconv.errors import DamagedInput, NeoxconvError
from neoxconv.ptio.ranges import PositionalOutput

_TRUST_PICKLE = False
_CHECK_FINITE = False
_FINITE_CHUNK = 1 << 24  # elements scanned at a time: bounded temporary memory on huge tensors


def set_trust_pickle(value: bool) -> None:
    """Opt in to full unpickling for inputs the user trusts (`--trust-pickle`)."""
    global _TRUST_PICKLE
    _TRUST_PICKLE = value


def set_check_finite(value: bool) -> None:
    """Scan every floating-point tensor readers load for NaN/Inf (`--check-finite`)."""
    global _CHECK_FINITE
    _CHECK_FINITE = value


def check_finite_enabled() -> bool:
    return _CHECK_FINITE


def check_finite(t: torch.Tensor, file: object, tensor: str, rank: int | None = None) -> None:
    """With --check-finite on: refuse a tensor holding NaN or Inf, naming file, tensor and rank."""
    if not _CHECK_FINITE or not t.is_floating_point() or t.device.type == "meta":
        return
    flat = t.detach().reshape(-1)
    starts = range(0, flat.numel(), _FINITE_CHUNK)
    if all(bool(torch.isfinite(flat[s:s + _FINITE_CHUNK]).all()) for s in starts):
        return
    count, first = 0, None  # the error path: how many, and where the first is
    for s in starts:
        bad = ~torch.isfinite(flat[s:s + _FINITE_CHUNK])
        n = int(bad.sum())
        if n and first is None:
            first = s + int(bad.nonzero()[0, 0])
        count += n
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), t.shape)) if t.dim() else ()
    where = f" on TP rank {rank}" if rank is not None else ""
    raise DamagedInput(f"{file}: tensor {tensor}{where} has {count} non-finite value(s) "
                       f"(first: {flat[first].item()} at index {list(index)})")


def inside(root: Path, ref: object, what: str) -> Path:
    """The path a checkpoint's own file reference (`what`: e.g. "`latest`") names under `root`,
    refused unless it stays inside.

    The rule is lexical, on the reference as written: a relative path of plain names (no `..`
    part, not absolute, not empty). Symlinks are not resolved for the check: a file or directory
    inside the checkpoint that is itself a symlink stays allowed, wherever it points (the HF
    cache stores `snapshots/REV/model.safetensors -> ../../blobs/SHA`). A crafted reference then
    cannot reach a file outside the directory; a symlink can only come from whoever can write
    the directory itself.
    """
    text = str(ref) if isinstance(ref, str) else None
    ref_path = PurePosixPath(text) if text else None
    if ref_path is None or "\0" in text or ref_path.is_absolute() or ".." in ref_path.parts or not ref_path.parts:
        raise DamagedInput(f"{what} names {ref!r}, which is not a path inside {root} "
                           "(expected a relative name without '..')")
    return Path(root) / ref_path


def _safe_globals() -> list:
    import numpy as np

    allowed: list = [argparse.Namespace, np.ndarray, np.dtype]
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    # ndarray reconstruction and numpy scalars: numpy RNG state, ds_config values.
    allowed += [core.multiarray._reconstruct, core.multiarray.scalar]
    if core.__name__ != "numpy.core":  # numpy 2 reading a file numpy 1 wrote: the same functions, older names
        allowed += [(core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                    (core.multiarray.scalar, "numpy.core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def load_pickle(path: Path) -> dict:
    """torch.load a checkpoint file memory-mapped, without executing arbitrary pickle code."""
    try:
        if _TRUST_PICKLE:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=False)  # trust: opt-in
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:
        raise DamagedInput(f"{path}: file not found") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types; the user needs one line
        msg = str(e).strip().splitlines()
        first = next((ln for ln in msg if "Unsupported global" in ln or "GLOBAL" in ln), msg[0] if msg else repr(e))
        refused = "weights_only" in str(e) or "global" in str(e).lower()
        hint = " (if you trust this file, pass --trust-pickle)" if refused else ""
        # A refused pickle is a policy decision about readable input; anything else is damage.
        raise (NeoxconvError if refused else DamagedInput)(
            f"{path}: cannot load checkpoint: {first.strip()}{hint}") from e


def save_pickle(obj: dict, path: Path) -> None:
    try:
        torch.save(obj, path)
    except RuntimeError as e:  # torch's zip writer reports a failed write (e.g. a full disk) this way
        raise OSError(errno.EIO, "the write failed: disk full or file too large?", str(path)) from e


def owned(t: torch.Tensor) -> torch.Tensor:
    """A compact copy: torch.save of a view would write the whole underlying storage."""
    if t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.is_contiguous() and t.storage_offset() == 0:
        return t
    return t.contiguous().clone()


def parse_size(text: str) -> int:
    """A size in bytes, read the way transformers reads ``save_pretrained(max_shard_size=...)``
    (``transformers.utils.hub.convert_file_size_to_int``: 5GB, 500MB, 2GiB, 10KiB), plus a bare
    byte count. Units are bytes in any letter case ("5gb" is 5 GB, not gigabits)."""
    from transformers.utils.hub import convert_file_size_to_int

    value = str(text).strip().replace(" ", "")
    try:
        size = int(value) if value.isdigit() else convert_file_size_to_int(value.upper())
    except ValueError:
        size = 0
    if size <= 0:
        raise NeoxconvError(f"cannot read size {text!r} (use e.g. 5GB, 500MB, 2GiB)")
    return size


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool = False, tmp: Path | None = None,
                      keep_on_error: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out` in one rename.

    On any error the temporary directory is removed, so a failed run never leaves something
    that looks like a finished output. An existing `out` is refused unless `force`. `tmp`: an
    earlier run's temporary directory to write into again, and `keep_on_error`: leave it for the
    next try (both for --resume, neoxconv.resume); it is hidden and never looks finished.
    """
    out = Path(out)
    if out.exists() and not force:
        raise NeoxconvError(f"{out}: output already exists (pass --force to replace it)")
    if tmp is None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        except OSError as e:
            raise NeoxconvError(f"{out.parent}: cannot create the output here ({e.strerror or e})") from None

    def cleanup() -> str:
        if keep_on_error:
            return f" (finished files kept in {tmp} for --resume)"
        shutil.rmtree(tmp, ignore_errors=True)
        return ""

    try:
        yield tmp
    except OSError as e:  # a full or read-only disk, a write the OS refused: one line, no partial output
        kept = cleanup()
        name = str(e.filename or "")
        if name and not name.startswith(str(tmp)):  # an input the OS refused to read
            raise NeoxconvError(f"{name}: {e.strerror or e}; nothing was written to {out}{kept}") from e
        where = name.replace(str(tmp), str(out)) or str(out)
        raise NeoxconvError(f"{where}: cannot write the output ({e.strerror or e}); nothing was written "
                            f"to {out}{kept}") from e
    except BaseException:
        cleanup()
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> dict:
    """A JSON object from a file; anything else is a one-line error naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NeoxconvError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NeoxconvError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise NeoxconvError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


class SafetensorsStreamWriter(PositionalOutput):
    """Write one safetensors file tensor by tensor, in any order and from any thread, holding
    none of it in memory.

    The safetensors library only writes whole dicts, which would hold a full shard (GBs) in
    memory. The format is simple (8-byte little-endian header length, JSON header with each
    tensor's dtype/shape/byte range, raw little-endian data), and every shape is known from the
    conversion plan, so the header goes first and each tensor is written at its offset
    (positional writes). `write` takes a tensor or its bytes as a list of parts: bytes-like
    objects, `ptio.FileRange`s, which are copied file to file (copy_file_range), and
    `Gathered` tensors, written chunk by chunk.
    `on_write(offset, nbytes)` follows every write (neoxconv.pipeline hashes files as they grow).
    Files are read back with the safetensors library in the tests.
    """

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, on_write=None):
        self.path = Path(path)
        head, self._slots, self.nbytes = _safetensors_layout(entries, metadata)
        self._base = len(head)
        self._on_write = on_write
        self._lock = threading.Lock()
        self._pending = set(self._slots)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._pwrite(head, 0)
            self._io(os.ftruncate, self._fd, self.nbytes)
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def size_of(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> int:
        """The finished file's size (planning)."""
        return _safetensors_layout(entries, metadata)[2]

    def write(self, name: str, data) -> None:
        """One tensor: a torch.Tensor of its planned dtype and shape, or its bytes as a list of
        parts (bytes-like objects, ptio.FileRanges and Gathered tensors, concatenated)."""
        from neoxconv.ptio import FileRange
        from neoxconv.ptio.ranges import Gathered, copy_range

        offset, n, dtype, shape = self._slots[name]
        if isinstance(data, torch.Tensor):
            if data.dtype != dtype or tuple(data.shape) != shape:
                raise ValueError(f"{name}: planned {dtype} {shape}, got {data.dtype} {tuple(data.shape)}")
            data = [tensor_bytes(data)]
        sizes = [p.nbytes if isinstance(p, (FileRange, Gathered)) else memoryview(p).nbytes for p in data]
        if sum(sizes) != n:
            raise ValueError(f"{name}: planned {n} bytes, got {sum(sizes)}")
        at = self._base + offset
        for part, size in zip(data, sizes, strict=True):
            if isinstance(part, FileRange):
                fd = os.open(part.path, os.O_RDONLY)
                try:
                    self._io(copy_range, fd, part.offset, self._fd, at, size)
                finally:
                    os.close(fd)
                self._wrote(at, size)
            elif isinstance(part, Gathered):
                self._pwrite_gathered(part, at)
            else:
                self._pwrite(part, at)
            at += size
        with self._lock:
            self._pending.discard(name)

    @property
    def complete(self) -> bool:
        return not self._pending

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._pending:
            raise ValueError(f"safetensors file closed with unwritten tensors: {sorted(self._pending)[:3]}")

    def abort(self) -> None:
        """Close and remove the unfinished file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)



def _safetensors_layout(entries, metadata) -> tuple[bytes, dict, int]:
    """(8-byte length + JSON header, name -> (offset, nbytes, dtype, shape), file size)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    slots: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
    offset = 0
    for name, dtype, shape in entries:
        n = dtype.itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        slots[name] = (offset, n, dtype, tuple(shape))
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    head = len(raw).to_bytes(8, "little") + raw
    return head, slots, len(head) + offset


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor in row-major order (one copy only if it is not contiguous)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")
