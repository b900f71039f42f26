"""Lazy tensors that know which source bytes they are: rows of source tensors, rearranged.

A conversion mostly moves rows: tensor-parallel merges and splits of column and vocabulary
tensors are concatenations and chunks on dim 0, and a fused QKV is per-head blocks of rows. A
`Lazy` tensor is such an arrangement, not yet done: `ids`, one integer per row (its leading
dims), names a row of a `Source` (a contiguous tensor of a checkpoint file, mapped; an
in-memory tensor; or shape only), and `row_shape` is the trailing dims that stay whole.

The role code (neoxconv.roles, fusing, the family tables) runs unchanged on Lazy tensors:

- ops on leading dims (reshape, chunk, split, narrow, indexing, transpose, `torch.cat` and
  `torch.stack`) rearrange `ids` only: no tensor data is touched;
- a `torch.cat` on a later dim (a row-parallel merge of tensor-parallel ranks) is a `Joined`:
  the parts, not yet concatenated; narrowing it on that dim (a split for other ranks) narrows the
  parts, so tp 2 -> tp 4 never builds the merged tensor;
- anything else (a dtype cast, arithmetic: averaged norms, summed biases) first `materialize()`s
  the tensor (one copy where rows must be gathered, none for a single run of one source) and runs
  the real torch op. A Lazy or Joined is therefore always correct; deferring only saves copies.

What a writer needs comes from neoxconv.pipeline.tensor_parts: runs of consecutive source rows,
each a byte range of a file (copied with copy_file_range) or a memoryview; a Joined, a strided
view or rows permuted one by one gathered a chunk at a time (ptio.ranges.Gathered). Tensors of shape-only
sources materialize as `meta` tensors, so a whole conversion plans from file headers without
reading data (and without `torch.cat` on meta tensors, whose first call imports torch._dynamo:
~1.5 s).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

_lock = threading.Lock()
_next_id = 1
_LEAD_OPS = {torch.cat, torch.concat, torch.concatenate, torch.stack}
SMALL = 1 << 16  # elements: a shape-only tensor this small plans with real zeros (see materialize)
MAX_RUNS = 64  # more runs than this in one output tensor: gather it (one copy) rather than write each run


@dataclass(eq=False)
class Source:
    """Rows of one contiguous tensor: `tensor` [rows, *row_shape] (None: shape only), and where its
    bytes are in a file, when they are (`file`, `offset` of row 0)."""

    rows: int
    row_shape: tuple[int, ...]
    dtype: torch.dtype
    tensor: torch.Tensor | None = None
    file: Path | None = None
    offset: int = 0
    base: int = field(init=False)

    def __post_init__(self) -> None:
        global _next_id
        with _lock:  # ids of different sources never touch: a run never crosses two sources
            self.base = _next_id
            _next_id += self.rows + 1

    @property
    def row_bytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.row_shape:
            n *= s
        return n


def _src_of_tensor(t: torch.Tensor, lead: int) -> Source:
    t = t.detach()
    if t.device.type != "meta":
        t = t.contiguous()
    rows = 1
    for s in t.shape[:lead]:
        rows *= s
    row_shape = tuple(t.shape[lead:])
    return Source(rows, row_shape, t.dtype, None if t.device.type == "meta" else t.reshape(rows, *row_shape))


class Deferred:
    """What Lazy and Joined share: tensor attributes from `shape` and `dtype`, and every other op
    run on the real tensor, `materialize()`."""

    __slots__ = ()
    shape: torch.Size
    dtype: torch.dtype

    def materialize(self) -> torch.Tensor:
        raise NotImplementedError

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    ndim = property(dim)

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel() * self.dtype.itemsize

    @property
    def device(self) -> torch.device:
        return torch.device("meta" if self.is_meta else "cpu")

    @property
    def is_meta(self) -> bool:
        return False

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def is_contiguous(self) -> bool:
        return True

    def contiguous(self) -> "Deferred":
        return self

    def detach(self) -> "Deferred":
        return self

    def to(self, *args, **kwargs):
        """Same dtype, on the CPU: itself (as torch returns the tensor itself); else the real op."""
        dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
        others = [a for a in args if not isinstance(a, torch.dtype)]
        device = kwargs.get("device", others[0] if others else None)
        if dtype in (None, self.dtype) and device in (None, "cpu", torch.device("cpu")) and not kwargs.get("copy"):
            return self
        return self.materialize().to(*args, **kwargs)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*_materialized(args), **_materialized(kwargs or {}))

    def __getattr__(self, name: str):  # any other tensor method: on the real tensor
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    def numpy(self):
        return self.materialize().numpy()

    # arithmetic and comparisons: on the real tensor
    def __add__(self, o): return self.materialize() + real(o)  # noqa: E704
    def __radd__(self, o): return real(o) + self.materialize()  # noqa: E704
    def __sub__(self, o): return self.materialize() - real(o)  # noqa: E704
    def __rsub__(self, o): return real(o) - self.materialize()  # noqa: E704
    def __mul__(self, o): return self.materialize() * real(o)  # noqa: E704
    def __rmul__(self, o): return real(o) * self.materialize()  # noqa: E704
    def __truediv__(self, o): return self.materialize() / real(o)  # noqa: E704
    def __neg__(self): return -self.materialize()  # noqa: E704
    def __eq__(self, o): return self.materialize() == real(o)  # noqa: E704
    __hash__ = object.__hash__


class Joined(Deferred):
    """`torch.cat` on a dim past the first (a row-parallel merge of tensor-parallel ranks), not
    yet done. A writer gathers it a chunk at a time from its parts (for a merge of mapped rank
    files, from the mapping; neoxconv.pipeline.tensor_parts), so the merged tensor is never built;
    narrowing it on the joined dim (a split for other ranks) narrows its parts. Anything else runs
    on the real tensor (`materialize()`: the torch.cat)."""

    __slots__ = ("parts", "axis", "shape", "dtype")

    def __init__(self, parts: list, axis: int):
        self.parts, self.axis, self.dtype = list(parts), axis, parts[0].dtype
        shape = list(parts[0].shape)
        shape[axis] = sum(p.shape[axis] for p in parts)
        self.shape = torch.Size(shape)

    @classmethod
    def of(cls, tensors, dim: int) -> "Joined | None":
        """The cat of these tensors (Lazy or real, with data, on the CPU) on `dim` past the
        first, or None when torch.cat must run now (dim 0, no data, mismatched shapes or dtypes)."""
        tensors = list(tensors)
        n = tensors[0].dim()
        if n < 2 or any(t.dim() != n for t in tensors):
            return None
        axis = dim + n if dim < 0 else dim
        shape = tensors[0].shape
        if not 0 < axis < n or any(
                t.dtype != tensors[0].dtype or t.is_meta or t.device.type != "cpu"
                or any(a != b for i, (a, b) in enumerate(zip(t.shape, shape, strict=True)) if i != axis)
                for t in tensors):
            return None
        return cls(tensors, axis)

    def __repr__(self) -> str:
        return f"Joined({list(self.shape)}, {self.dtype}, {len(self.parts)} parts on dim {self.axis})"

    def materialize(self) -> torch.Tensor:
        return torch.cat([real(p) for p in self.parts], self.axis)

    def narrow(self, dim: int, start: int, length: int):
        if (dim + self.dim() if dim < 0 else dim) != self.axis or length <= 0:
            return self.materialize().narrow(dim, start, length)
        out, at = [], 0
        for p in self.parts:
            width = p.shape[self.axis]
            lo, hi = max(start, at), min(start + length, at + width)
            if lo < hi:
                out.append(p.narrow(self.axis, lo - at, hi - lo))
            at += width
        return out[0] if len(out) == 1 else Joined(out, self.axis)

    def split(self, size, dim: int = 0):
        total = self.shape[dim]
        sizes = size if isinstance(size, (list, tuple)) else [min(size, total - a) for a in range(0, total, size)]
        out, at = [], 0
        for s in sizes:
            out.append(self.narrow(dim, at, s))
            at += s
        return tuple(out)

    def chunk(self, chunks: int, dim: int = 0):
        return self.split(-(-self.shape[dim] // chunks), dim)


class Lazy(Deferred):
    """A tensor made of rows of sources (see the module docstring)."""

    __slots__ = ("ids", "row_shape", "dtype", "sources")

    def __init__(self, ids: torch.Tensor, row_shape: tuple[int, ...], dtype: torch.dtype, sources: tuple[Source, ...]):
        self.ids, self.row_shape, self.dtype, self.sources = ids, tuple(row_shape), dtype, sources

    # -- making ------------------------------------------------------------------------------

    @classmethod
    def of(cls, src: Source, shape: tuple[int, ...] | None = None) -> "Lazy":
        """All rows of a source, as a tensor of `shape` (default [rows, *row_shape])."""
        ids = torch.arange(src.base, src.base + src.rows)
        lazy = cls(ids, src.row_shape, src.dtype, (src,))
        return lazy if shape is None else lazy.reshape(shape)

    @classmethod
    def leaf(cls, t: torch.Tensor, file: Path | None = None, offset: int = 0) -> "Lazy":
        """A contiguous tensor (a mapped view of `file` at byte `offset`, or in memory) as rows of
        its last dim: rows = all leading dims (a 1-D tensor: one row per element)."""
        src = _src_of_tensor(t, max(t.dim() - 1, 1) if t.dim() else 0)
        if file is not None:
            src.file, src.offset = Path(file), offset
        return cls.of(src, tuple(t.shape))

    @classmethod
    def of_record(cls, t: torch.Tensor, rec) -> "Lazy":
        """A tensor read from a file (`t`, mapped) as described by its ptio TensorRecord: rows
        that are byte ranges of the file when the record is contiguous."""
        where = rec.file_range
        return cls.leaf(t, rec.storage.path, where[0]) if where else cls.leaf(t)

    @classmethod
    def shape_only(cls, shape: tuple[int, ...], dtype: torch.dtype) -> "Lazy":
        """A tensor of this shape and dtype without data (planning)."""
        return cls.leaf(torch.empty(shape, dtype=dtype, device="meta"))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.ids.shape, *self.row_shape))

    @property
    def is_meta(self) -> bool:
        return any(s.tensor is None for s in self.sources)

    def __repr__(self) -> str:
        return f"Lazy({list(self.shape)}, {self.dtype}, {len(self.sources)} source(s))"

    # -- leading-dim ops: rearrange ids --------------------------------------------------------

    def _lead(self, dim: int) -> int | None:
        """`dim` as a leading dim, or None when it is one of the row dims."""
        d = dim + self.dim() if dim < 0 else dim
        return d if d < self.ids.dim() else None

    def _with(self, ids: torch.Tensor) -> "Lazy":
        return Lazy(ids, self.row_shape, self.dtype, self.sources)

    def reshape(self, *shape) -> "Lazy | torch.Tensor":
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        shape = _resolve(shape, self.numel())
        k = len(self.row_shape)
        if k and tuple(shape[-k:]) != self.row_shape or len(shape) < k:
            return self.materialize().reshape(shape)
        return self._with(self.ids.reshape(shape[:len(shape) - k]))

    view = reshape

    def chunk(self, chunks: int, dim: int = 0):
        d = self._lead(dim)
        if d is None:
            return self.materialize().chunk(chunks, dim)
        return tuple(self._with(i) for i in self.ids.chunk(chunks, d))

    def split(self, size, dim: int = 0):
        d = self._lead(dim)
        if d is None:
            return self.materialize().split(size, dim)
        return tuple(self._with(i) for i in self.ids.split(size, d))

    def narrow(self, dim: int, start: int, length: int):
        d = self._lead(dim)
        if d is None:
            return self.materialize().narrow(dim, start, length)
        return self._with(self.ids.narrow(d, start, length))

    def transpose(self, a: int, b: int):
        da, db = self._lead(a), self._lead(b)
        if da is None or db is None:
            return self.materialize().transpose(a, b)
        return self._with(self.ids.transpose(da, db))

    def __getitem__(self, index):
        idx = index if isinstance(index, tuple) else (index,)
        if all(isinstance(i, (int, slice)) for i in idx) and len(idx) <= self.ids.dim():
            return self._with(self.ids[idx])
        return self.materialize()[index]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LEAD_OPS:
            out = _cat_or_stack(func, *args, **kwargs)
            if out is not None:
                return out
        return func(*_materialized(args), **_materialized(kwargs))

    # -- data ---------------------------------------------------------------------------------

    def runs(self) -> list[tuple[Source, int, int]]:
        """Runs of consecutive rows: (source, first row, row count), in order."""
        flat = self.ids.reshape(-1)
        n = flat.numel()
        if n == 0:
            return []
        cut = torch.ones(n, dtype=torch.bool)
        cut[1:] = flat[1:] != flat[:-1] + 1
        starts = cut.nonzero().flatten().tolist()
        values = flat[starts].tolist() if len(starts) > 1 else [int(flat[0])]
        bases = [s.base for s in self.sources]
        order = sorted(range(len(bases)), key=bases.__getitem__)
        sorted_bases = [bases[i] for i in order]
        out = []
        for j, (start, value) in enumerate(zip(starts, values, strict=True)):
            count = (starts[j + 1] if j + 1 < len(starts) else n) - start
            src = self.sources[order[bisect.bisect_right(sorted_bases, value) - 1]]
            out.append((src, value - src.base, count))
        return out

    def materialize(self) -> torch.Tensor:
        """The real tensor: a view of the source for a single run, else one gathering copy.
        Without data (planning): zeros when small, else a `meta` tensor. (Arithmetic on meta
        tensors imports torch._dynamo, ~2 s; what a conversion computes arithmetically is norms
        and biases, which are small, while large tensors are only cast, chunked or concatenated,
        which meta tensors do without it.)"""
        if self.is_meta:
            if self.numel() <= SMALL:
                return torch.zeros(self.shape, dtype=self.dtype)
            return torch.empty(self.shape, dtype=self.dtype, device="meta")
        runs = self.runs()
        if len(runs) == 1:
            src, start, count = runs[0]
            return src.tensor[start:start + count].reshape(self.shape)
        if len(self.sources) == 1 and len(runs) > MAX_RUNS:
            src = self.sources[0]
            return src.tensor.index_select(0, self.ids.reshape(-1) - src.base).reshape(self.shape)
        pieces = [src.tensor[start:start + count] for src, start, count in runs]
        if not pieces:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.cat(pieces).reshape(self.shape)


def _resolve(shape: tuple, numel: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if -1 in shape:
        known = 1
        for s in shape:
            if s != -1:
                known *= s
        shape = tuple(numel // known if s == -1 else s for s in shape)
    return shape


def real(x):
    """The real tensor of a Lazy or Joined; anything else as it is."""
    return x.materialize() if isinstance(x, Deferred) else x


def _materialized(x):
    if isinstance(x, Deferred):
        return x.materialize()
    if isinstance(x, (list, tuple)):
        return type(x)(_materialized(v) for v in x)
    if isinstance(x, dict):
        return {k: _materialized(v) for k, v in x.items()}
    return x


def _cat_or_stack(func, tensors, dim: int = 0, *, out=None):
    """torch.cat / torch.stack of Lazy tensors: on leading dims a Lazy (real tensors join as
    in-memory sources), a cat on a later dim a Joined; None when it must run on real tensors."""
    if out is not None:
        return None
    joined = _lead_cat_or_stack(func, tensors, dim)
    if joined is None and func is not torch.stack:
        joined = Joined.of(tensors, dim)
    return joined


def _lead_cat_or_stack(func, tensors, dim: int):
    lazies = [t for t in tensors if isinstance(t, Lazy)]
    row_shape, dtype = lazies[0].row_shape, lazies[0].dtype
    k = len(row_shape)
    parts = []
    for t in tensors:
        if not isinstance(t, Lazy):
            if t.dtype != dtype or t.dim() < k or tuple(t.shape[t.dim() - k:]) != row_shape:
                return None
            t = Lazy.of(_src_of_tensor(t, t.dim() - k), tuple(t.shape)) if t.numel() else \
                Lazy(torch.empty(tuple(t.shape[:t.dim() - k]), dtype=torch.long), row_shape, dtype, ())
        if t.row_shape != row_shape or t.dtype != dtype:
            return None
        parts.append(t)
    lead = parts[0].ids.dim()
    d = dim + lead + k + (func is torch.stack) if dim < 0 else dim
    if d > lead - (func is not torch.stack) or any(p.ids.dim() != lead for p in parts):
        if any(p.is_meta for p in parts) and func is not torch.stack:
            return _meta_cat(parts, d)
        return None
    ids = func([p.ids for p in parts], d)
    sources = tuple(dict.fromkeys(s for p in parts for s in p.sources))
    return Lazy(ids, row_shape, dtype, sources)


def _meta_cat(parts: list[Lazy], dim: int) -> torch.Tensor:
    """The result of a row-dim cat when planning: its shape, on the meta device (torch.cat on
    meta tensors would import torch._dynamo)."""
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    return torch.empty(shape, dtype=parts[0].dtype, device="meta")
