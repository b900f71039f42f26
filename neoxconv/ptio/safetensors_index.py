"""safetensors headers as TensorRecords, so that one reader and one copy path serve both formats.

A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte range relative to the end of the header, then the raw little-endian data.
Each tensor becomes a TensorRecord over its own storage (there are no shared storages); its CRC-32
is unknown (None) and is computed when the bytes are copied into a zip record.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from neoxconv.errors import DamagedInput, NeoxconvError
from neoxconv.ptio.index import StorageRecord, TensorRecord

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def index_safetensors(path: Path) -> tuple[dict[str, TensorRecord], dict[str, str]]:
    """(tensor name -> record, __metadata__) from the header alone. A file that is not one is
    damage (DamagedInput, one line); a dtype not listed in DTYPES is not supported (NeoxconvError)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} beyond the file's {size} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        base = 8 + n
        meta = header.pop("__metadata__", None) or {}
        records = {}
        for name, h in header.items():
            dtype = DTYPES.get(h.get("dtype"))
            if dtype is None:
                raise NeoxconvError(f"{path}: tensor {name!r} has unsupported dtype {h.get('dtype')!r}")
            start, end = (int(x) for x in h["data_offsets"])
            shape = tuple(int(s) for s in h["shape"])
            numel = 1
            for s in shape:
                numel *= s
            if min(shape, default=0) < 0 or start < 0 or end - start != numel * dtype.itemsize or base + end > size:
                raise ValueError(f"tensor {name!r}: byte range {start}..{end} does not fit {list(shape)} "
                                 f"{h['dtype']} in the file")
            stride, acc = [], 1
            for s in reversed(shape):
                stride.append(acc)
                acc *= max(s, 1)
            storage = StorageRecord(path, name, dtype, end - start, base + start, None, "cpu")
            records[name] = TensorRecord(dtype, shape, tuple(reversed(stride)), storage)
    except NeoxconvError:
        raise
    except FileNotFoundError:
        raise DamagedInput(f"{path}: file not found") from None
    except Exception as e:  # noqa: BLE001 - any malformed header; the user needs one line
        raise DamagedInput(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return records, meta
