"""File I/O kept apart from conversion logic: safe pickle loading, atomic output directories,
sharded safetensors writing.

Pickled checkpoints (`.pt`, `.bin`, `.pth`) are loaded with `weights_only=True` plus an
explicit allowlist of the harmless non-tensor types real NeoX/DeepSpeed files hold (numpy RNG
state, argparse.Namespace, ...). Full unpickling is only used when the user opts in with
`--trust-pickle`, because unpickling arbitrary files can run code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from neoxconv.errors import NeoxconvError

_TRUST_PICKLE = False


def set_trust_pickle(value: bool) -> None:
    """Opt in to full unpickling for inputs the user trusts (`--trust-pickle`)."""
    global _TRUST_PICKLE
    _TRUST_PICKLE = value


def _safe_globals() -> list:
    import numpy as np

    allowed: list = [argparse.Namespace, np.ndarray, np.dtype]
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    # ndarray reconstruction and numpy scalars: numpy RNG state, ds_config values.
    allowed += [core.multiarray._reconstruct, core.multiarray.scalar]
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
        raise NeoxconvError(f"{path}: file not found") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types; the user needs one line
        msg = str(e).strip().splitlines()
        first = next((ln for ln in msg if "Unsupported global" in ln or "GLOBAL" in ln), msg[0] if msg else repr(e))
        hint = " (if you trust this file, pass --trust-pickle)" if "weights_only" in str(e) or "global" in str(e).lower() else ""
        raise NeoxconvError(f"{path}: cannot load checkpoint: {first.strip()}{hint}") from e


def save_pickle(obj: dict, path: Path) -> None:
    torch.save(obj, path)


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
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out` in one rename.

    On any error the temporary directory is removed, so a failed run never leaves something
    that looks like a finished output. An existing `out` is refused unless `force`.
    """
    out = Path(out)
    if out.exists() and not force:
        raise NeoxconvError(f"{out}: output already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise NeoxconvError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise NeoxconvError(f"{path}: invalid JSON: {e}") from None


_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


class SafetensorsStreamWriter:
    """Write one safetensors file tensor by tensor, in any order, holding none of it in memory.

    The safetensors library only writes whole dicts, which would hold a full shard (GBs) in
    memory. The format is simple (8-byte little-endian header length, JSON header with each
    tensor's dtype/shape/byte range, raw little-endian data), and every shape is known from the
    conversion plan, so the header goes first and each tensor is written at its offset.
    Files are read back with the safetensors library in the tests.
    """

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": metadata} if metadata else {}
        self._slots: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        offset = 0
        for name, dtype, shape in entries:
            n = dtype.itemsize
            for s in shape:
                n *= s
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._slots[name] = (offset, n, dtype, tuple(shape))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._base = 8 + len(raw)
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._f.write(len(raw).to_bytes(8, "little") + raw)
        self._f.truncate(self._base + offset)
        self._pending = set(self._slots)

    def write(self, name: str, t: torch.Tensor) -> None:
        offset, n, dtype, shape = self._slots[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{name}: planned {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._f.seek(self._base + offset)
        self._f.write(memoryview(data))
        self._pending.discard(name)

    @property
    def complete(self) -> bool:
        return not self._pending

    def close(self) -> None:
        self._f.close()
        if self._pending:
            raise ValueError(f"safetensors file closed with unwritten tensors: {sorted(self._pending)[:3]}")
