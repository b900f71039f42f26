"""Tensor-parallel roles: how p ranks hold canonical tensors, with pure split and merge.

Every tensor a family's table (neoxconv/archs) names is declared with one of these roles, and
every adapter that shards asks that role: NeoX (any TP), Meta (model-parallel shards) and
Hugging Face, which is the p = 1 case (HF GPTNeoX keeps Q, K and V fused). Nothing guesses a
role from a tensor's name (neox-formats.md §3).

A role maps a tuple of *members* (the full canonical tensors it holds: one, or several for a
fused tensor) to p per-rank tensors and back:

| role          | members        | split (members -> p parts)                 | merge (p parts -> members)        |
|---------------|----------------|--------------------------------------------|-----------------------------------|
| VOCAB         | embed, lm_head | pad/trim rows to ctx.vocab_rows, chunk 0   | concat dim 0                      |
| COLUMN        | q, k, v, up,   | chunk dim 0                                | concat dim 0                      |
|               | gate (+ bias)  |                                            |                                   |
| ROW           | o/down weight  | chunk dim 1                                | concat dim 1                      |
| ROW_BIAS      | o/down bias    | parallel residual: exact split of the sum; | float64 sum; else float64 mean    |
|               |                | else a copy per rank                       | (T5)                              |
| REPLICATED    | norms          | a copy per rank                            | float64 mean (T6)                 |
| FusedQKV(l)   | (q, k, v)      | COLUMN each, fused per rank in layout l    | unfused per rank, COLUMN each     |
| GATED_MLP     | (up, gate)     | COLUMN each, [up_r ; gate_r] per rank (T7) | halves per rank, COLUMN each      |
| RANK_SHARED_  | QK ScaleNorm   | chunk 0, one value per rank (each rank's   | each rank's value repeated over   |
| GAIN          | gains [heads]  | heads must share it)                       | its heads, concat                 |

merge(split(x)) == x bit for bit for every role and every p (tests/test_roles.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from neoxconv.errors import NeoxconvError
from neoxconv.fusing import QKV_LAYOUTS, fuse_gated, fuse_qkv, split_gated, split_qkv

Tensor = torch.Tensor


@dataclass(frozen=True)
class Context:
    """What a split or merge may depend on besides the tensors (readers and writers fill it
    from the ModelSpec; `vocab_rows` is the row count a writer wants)."""

    heads: int = 1  # attention heads of the whole model (fused QKV)
    kv_heads: int = 1
    parallel_residual: bool = False  # GPT-J residual: row biases are parts of a sum
    vocab_size: int = 0  # real vocabulary: rows a vocab split never trims
    vocab_rows: int | None = None  # rows a vocab split pads or trims to (None: keep)

    @classmethod
    def of(cls, spec, **changes) -> "Context":
        ctx = cls(heads=spec.heads, kv_heads=spec.kv_heads, parallel_residual=spec.parallel_residual,
                  vocab_size=spec.vocab_size, vocab_rows=spec.vocab_rows)
        return dataclasses.replace(ctx, **changes)


@dataclass(frozen=True)
class Role:
    """How p tensor-parallel ranks hold `arity` canonical tensors (the members)."""

    name: str
    arity: int = 1

    def split(self, members: Sequence[Tensor], p: int, ctx: Context) -> list[Tensor]:
        """Full members -> what each of p ranks stores."""
        raise NotImplementedError

    def merge(self, parts: Sequence[Tensor], ctx: Context) -> tuple[Tensor, ...]:
        """What p ranks store -> the full members (the inverse of split)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# one canonical tensor per stored tensor


@dataclass(frozen=True)
class VocabParallel(Role):
    def split(self, members, p, ctx):
        (t,) = members
        t = t if ctx.vocab_rows is None else resize_vocab(t, ctx.vocab_rows, ctx.vocab_size)
        return _chunk(t, p, 0, self.name)

    def merge(self, parts, ctx):
        return (_cat(parts, 0),)


@dataclass(frozen=True)
class ColumnParallel(Role):
    def split(self, members, p, ctx):
        (t,) = members
        return _chunk(t, p, 0, self.name)

    def merge(self, parts, ctx):
        return (_cat(parts, 0),)


@dataclass(frozen=True)
class RowParallel(Role):
    def split(self, members, p, ctx):
        (t,) = members
        return _chunk(t, p, 1, self.name)

    def merge(self, parts, ctx):
        return (_cat(parts, 1),)


@dataclass(frozen=True)
class RowParallelBias(Role):
    """The bias of a row-parallel layer. Under a parallel (GPT-J) residual every rank adds its
    own bias before one all-reduce, so the effective bias is the sum over ranks; otherwise it is
    added once after the all-reduce and every rank holds a copy (neox-formats.md §3.1)."""

    def split(self, members, p, ctx):
        (t,) = members
        if p == 1:
            return [t]
        return split_sum(t, p) if ctx.parallel_residual else [t for _ in range(p)]

    def merge(self, parts, ctx):
        if len(parts) == 1:
            return (parts[0],)
        # Sequential residual: copies that drifted apart are averaged as norms are (T5).
        return (_sum64(parts) if ctx.parallel_residual else _mean64(parts),)


@dataclass(frozen=True)
class Replicated(Role):
    """Norms: a copy per rank. Copies drift apart slightly in training (T6); the float64 mean
    is what every reference converter takes (bit-exact for identical copies)."""

    def split(self, members, p, ctx):
        (t,) = members
        return [t for _ in range(p)]

    def merge(self, parts, ctx):
        return (parts[0] if len(parts) == 1 else _mean64(parts),)


@dataclass(frozen=True)
class RankSharedGain(Role):
    """One gain per TP rank, shared by that rank's heads (NeoX's QK ScaleNorm: `g` [1] in every
    rank's attention); canonically one gain per head [heads]. A split needs every rank's heads to
    share their gain, which holds at the TP the model was trained with and any multiple of it."""

    def split(self, members, p, ctx):
        (t,) = members
        parts = _chunk(t, p, 0, self.name)
        for r, part in enumerate(parts):
            if not t.is_meta and not torch.equal(part, part[:1].expand_as(part)):
                raise NeoxconvError(f"QK ScaleNorm gains differ between the heads of TP rank {r} of {p}; NeoX holds "
                                    "one gain per rank: use the TP the model was trained with (or a multiple)")
        return [part[:1] for part in parts]

    def merge(self, parts, ctx):
        per_rank = ctx.heads // len(parts)
        return (torch.cat([part.reshape(1).expand(per_rank) for part in parts]),)


VOCAB = VocabParallel("vocab")
COLUMN = ColumnParallel("column")
ROW = RowParallel("row")
ROW_BIAS = RowParallelBias("row_bias")
REPLICATED = Replicated("replicated")
RANK_SHARED_GAIN = RankSharedGain("rank_shared_gain")


# ---------------------------------------------------------------------------------------------
# several column-parallel canonical tensors fused into one stored tensor per rank


@dataclass(frozen=True)
class FusedQKV(Role):
    """(q, k, v), each column-parallel by heads, fused per rank in `layout` (fusing.py)."""

    name: str = "fused_qkv"
    arity: int = 3
    layout: str = "mha_interleaved"
    member: Role = COLUMN

    def __post_init__(self) -> None:
        if self.layout not in QKV_LAYOUTS:
            raise NeoxconvError(f"unknown QKV layout {self.layout!r} (known: {', '.join(QKV_LAYOUTS)})")

    def split(self, members, p, ctx):
        q, k, v = (self.member.split([t], p, ctx) for t in members)
        return [fuse_qkv(q[r], k[r], v[r], ctx.heads // p, ctx.kv_heads // p, self.layout) for r in range(p)]

    def merge(self, parts, ctx):
        p = len(parts)
        per_rank = [split_qkv(x, ctx.heads // p, ctx.kv_heads // p, self.layout) for x in parts]
        return tuple(self.member.merge([r[j] for r in per_rank], ctx)[0] for j in range(3))


@dataclass(frozen=True)
class GatedMLP(Role):
    """(up, gate), each column-parallel; every rank stores [up_r ; gate_r] (NeoX linear1, T7)."""

    name: str = "gated_mlp"
    arity: int = 2
    member: Role = COLUMN

    def split(self, members, p, ctx):
        up, gate = (self.member.split([t], p, ctx) for t in members)
        return [fuse_gated(up[r], gate[r]) for r in range(p)]

    def merge(self, parts, ctx):
        halves = [split_gated(x) for x in parts]
        return tuple(self.member.merge([h[j] for h in halves], ctx)[0] for j in range(2))


GATED_MLP = GatedMLP()


# ---------------------------------------------------------------------------------------------
# numerics


def split_sum(t: Tensor, p: int) -> list[Tensor]:
    """p tensors that sum to exactly t: ranks 1..p-1 hold fl(t/p), rank 0 the float64 remainder.

    Why exact: the remainder r0 = t - (p-1)*fl(t/p) has |r0| ~ |t|/p <= |t|/2, so its rounding
    error is at most ulp(t)/4, and the float64 sum r0 + (p-1)*fl(t/p) rounds back to t. A plain
    t/p per rank would not survive a round trip at p = 3.
    """
    share = (t.double() / p).to(t.dtype)
    rest = (t.double() - (p - 1) * share.double()).to(t.dtype)
    return [rest] + [share for _ in range(p - 1)]


def _mean64(parts: Sequence[Tensor]) -> Tensor:
    """Mean in float64, cast back once (bit-exact for identical copies)."""
    return (_acc64(parts) / len(parts)).to(parts[0].dtype)


def _sum64(parts: Sequence[Tensor]) -> Tensor:
    """Sum in float64 (exact for a handful of fp32/fp16/bf16 terms), cast back once."""
    return _acc64(parts).to(parts[0].dtype)


def _acc64(parts: Sequence[Tensor]) -> Tensor:
    total = parts[0].double()
    for t in parts[1:]:
        total = total + t.double()
    return total


def _chunk(t: Tensor, p: int, dim: int, role: str) -> list[Tensor]:
    if p == 1:
        return [t]
    if t.shape[dim] % p:
        raise NeoxconvError(f"cannot split a {role} dimension of {t.shape[dim]} into {p} tensor-parallel ranks")
    return list(t.chunk(p, dim=dim))


def _cat(parts: Sequence[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=dim)


def padded_vocab(vocab_size: int, multiple: int, tp: int) -> int:
    """Smallest size >= vocab_size divisible by multiple * tp (NeoX tokenizer.py, §3.3)."""
    m = multiple * tp
    return -(-vocab_size // m) * m


def resize_vocab(t: Tensor, rows: int, real_vocab: int) -> Tensor:
    """Pad with zero rows or trim rows beyond the real vocabulary (never a real token row)."""
    have = t.shape[0]
    if rows == have:
        return t
    if rows < real_vocab:
        raise NeoxconvError(f"cannot shrink the vocabulary below its {real_vocab} real tokens (asked for {rows} rows)")
    if rows < have:
        return t[:rows]
    pad = torch.zeros((rows - have, *t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=0)
