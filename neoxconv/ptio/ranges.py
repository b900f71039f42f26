"""Ranged reads of indexed tensors, and byte-range copies between files.

- `MappedFile.tensor(record)`: a zero-copy tensor on a private read-only-in-practice mapping of
  the file (page cache, not process memory; nothing is ever written back), as
  `torch.load(mmap=True)` gives.
- `read_tensor(fd, record)`: an owned, contiguous copy read with `os.preadv` (one copy, no
  mapping), for data that will be rearranged anyway.
- `Gathered`: the bytes of a rearranged tensor (a row-parallel merge or split, permuted rows),
  made a chunk at a time in a small reused buffer, never whole in memory.
- `copy_range(...)`: bytes that do not change go file to file with `os.copy_file_range` (in the
  kernel; no user-space copy at all), falling back to `os.pread`/`os.pwrite` in 8 MiB chunks where
  the file systems refuse. (`sendfile` writes at the destination's file position, which
  concurrent writers to one file share, so positional reads and writes are the safe fallback.)
- `crc32(...)`: the CRC-32 a zip record needs (zlib-ng's: 3x zlib's speed with the CPU's
  carry-less multiply; the same checksum).

All of these release the GIL in the kernel or in zlib-ng, so worker threads overlap.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path

import torch
from zlib_ng import zlib_ng

from neoxconv.ptio.index import TensorRecord

CHUNK = 8 << 20
# Writes from memory go in calls of 1 MiB: on the project machine (Linux 6.18, ext4, a VM) one
# pwrite of 8 MiB or more from a freshly computed tensor cost 10-30x the CPU of the same bytes
# in 1 MiB calls (1.34 GB of merged matrices: 4-13 s vs 0.45 s), 128 KiB calls no less than 1 MiB.
# benchmarks/convert_speed.py --io-primitives measures it.
WRITE_PIECE = 1 << 20
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


class MappedFile:
    """A whole file mapped privately (copy-on-write, never written back).

    Tensors handed out keep the mapping alive; it is unmapped when the last one is freed.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            # ACCESS_COPY: writable for torch.frombuffer without a warning; nothing reaches the file.
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if self.size else None

    def view(self, offset: int, nbytes: int) -> memoryview:
        if offset < 0 or offset + nbytes > self.size:
            raise ValueError(f"{self.path}: bytes {offset}..{offset + nbytes} beyond the file's {self.size}")
        return memoryview(self._mm)[offset:offset + nbytes] if nbytes else memoryview(b"")

    def tensor(self, rec: TensorRecord) -> torch.Tensor:
        """The tensor `rec` describes, viewing the mapped file (zero-copy)."""
        st = rec.storage
        if st.path != self.path:
            raise ValueError(f"record of {st.path} read from {self.path}")
        count = st.nbytes // rec.dtype.itemsize
        if count == 0:
            base = torch.empty(0, dtype=rec.dtype)
        else:
            self.view(st.offset, st.nbytes)  # bounds check
            base = torch.frombuffer(self._mm, dtype=rec.dtype, count=count, offset=st.offset)
        return base.as_strided(rec.shape, rec.stride, rec.storage_offset)

    def crc32(self, offset: int, nbytes: int, start: int = 0) -> int:
        """CRC-32 of a byte range, continuing from `start` (the CRC of what precedes it)."""
        return crc32(self.view(offset, nbytes), start)


def crc32(data, start: int = 0) -> int:
    """CRC-32 (zip's, zlib's) of a bytes-like object, continuing from `start`; the GIL is released."""
    return zlib_ng.crc32(data, start)


def read_tensor(fd: int, rec: TensorRecord, out: torch.Tensor | None = None) -> torch.Tensor:
    """An owned contiguous tensor with `rec`'s values, read with os.preadv (one copy).

    Non-contiguous records are read as their whole storage span, then arranged (one more copy)."""
    if rec.file_range is None:
        span = rec.storage_offset + sum((s - 1) * st for s, st in zip(rec.shape, rec.stride, strict=True)) + 1
        flat = torch.empty(span, dtype=rec.dtype)
        _pread_into(fd, rec.storage.offset, _bytes_of(flat))
        t = flat.as_strided(rec.shape, rec.stride, rec.storage_offset)
        return t.contiguous() if out is None else out.copy_(t)
    offset, nbytes = rec.file_range
    if out is None:
        out = torch.empty(rec.shape, dtype=rec.dtype)
    elif out.dtype != rec.dtype or tuple(out.shape) != rec.shape or not out.is_contiguous():
        raise ValueError(f"read_tensor: out is {out.dtype} {tuple(out.shape)}, the record {rec.dtype} {rec.shape}")
    _pread_into(fd, offset, _bytes_of(out))
    return out


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, without a copy."""
    if t.numel() == 0:
        return memoryview(bytearray())
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _pread_into(fd: int, offset: int, buf: memoryview) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise EOFError(f"file ends {len(buf) - done} bytes before the record does")
        done += n


def pwrite_all(fd: int, data, offset: int) -> None:
    """os.pwrite until everything is written, in calls of at most WRITE_PIECE bytes."""
    mv = memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:done + WRITE_PIECE], offset + done)


class Gathered:
    """The bytes of a tensor that is neither a run of source rows nor contiguous memory (a
    row-parallel merge not yet done, a strided split, rows permuted one by one), made about
    GATHER bytes at a time in a small buffer that each writing thread reuses: the tensor is never
    whole in memory, and each byte is copied once into a buffer that stays in the CPU cache and
    once by the kernel into the file (allocating the whole tensor instead costs a first touch of
    new memory, ~0.9 s/GB on the project machine).

    `rows` rows of `row_bytes` bytes; `fill(r0, r1, out)` puts rows r0..r1 into `out`, a uint8
    tensor of (r1 - r0) * row_bytes."""

    def __init__(self, rows: int, row_bytes: int, fill):
        self.rows, self.row_bytes, self.fill = rows, row_bytes, fill

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    def chunks(self):
        """The bytes in order, as views of the thread's buffer, each valid until the next."""
        step = max(1, GATHER // max(1, self.row_bytes))
        buf = _buffer(step * self.row_bytes)
        for r0 in range(0, self.rows, step):
            r1 = min(self.rows, r0 + step)
            out = buf[:(r1 - r0) * self.row_bytes]
            self.fill(r0, r1, out)
            yield memoryview(out.numpy())


GATHER = 1 << 20
_local = threading.local()


def _buffer(nbytes: int) -> torch.Tensor:
    """This thread's gather buffer of GATHER bytes; a buffer of its own for one larger row."""
    if nbytes > GATHER:
        return torch.empty(nbytes, dtype=torch.uint8)
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() != GATHER:
        buf = _local.buf = torch.empty(GATHER, dtype=torch.uint8)
    return buf


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int, kernel: bool = True) -> str:
    """Copy nbytes between files at explicit offsets (neither file position moves).

    Returns the method used: "copy_file_range", or "pread/pwrite" where the kernel refuses
    (or with kernel=False)."""
    done = 0
    try:
        while kernel and done < nbytes:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_offset + done, dst_offset + done)
            if n == 0:
                raise EOFError(f"source ends {nbytes - done} bytes before the range does")
            done += n
        if kernel:
            return "copy_file_range"
    except OSError as e:
        if e.errno not in _FALLBACK_ERRNOS:
            raise
    buf = bytearray(min(CHUNK, nbytes - done))
    mv = memoryview(buf)
    while done < nbytes:
        k = min(len(buf), nbytes - done)
        _pread_into(src_fd, src_offset + done, mv[:k])
        pwrite_all(dst_fd, mv[:k], dst_offset + done)
        done += k
    return "pread/pwrite"


class PositionalOutput:
    """What both streaming writers share: positional writes into ``self._fd`` that report to
    ``self._on_write(offset, nbytes)`` and whose OS errors name ``self.path``."""

    path: Path
    _fd: int
    _on_write = None

    def _pwrite(self, data, offset: int) -> None:
        self._io(pwrite_all, self._fd, data, offset)
        self._wrote(offset, memoryview(data).nbytes)

    def _pwrite_gathered(self, part: Gathered, offset: int, each=None) -> None:
        """A Gathered part from `offset`, chunk by chunk; `each(chunk)` sees every chunk first."""
        for chunk in part.chunks():
            if each is not None:
                each(chunk)
            self._pwrite(chunk, offset)
            offset += chunk.nbytes


    def _wrote(self, offset: int, nbytes: int) -> None:
        if self._on_write is not None and nbytes:
            self._on_write(offset, nbytes)

    def _io(self, fn, *args):
        """An OS call on the output; its error names this file (the OS names none for pwrite)."""
        try:
            return fn(*args)
        except OSError as e:
            if e.filename is None:
                raise OSError(e.errno, e.strerror, str(self.path)) from e
            raise
