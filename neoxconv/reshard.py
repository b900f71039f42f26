"""Tensor-parallel roles and their split/merge rules (neox-formats.md §3).

Every canonical tensor has one role. Resharding is these pure functions; fusing (QKV,
gated linear1) happens per rank in the NeoX adapter, after split and before merge.

| role       | tensors                              | split (full -> p)            | merge (p -> full)      |
|------------|--------------------------------------|------------------------------|------------------------|
| vocab      | embed, lm_head                       | chunk dim 0                  | concat dim 0           |
| column     | q, k, v (by heads), up, gate (+bias) | chunk dim 0                  | concat dim 0           |
| row        | o.weight, down.weight                | chunk dim 1                  | concat dim 1           |
| row_bias   | o.bias, down.bias                    | parallel residual: b/p; else copy | parallel: sum; else mean (T5) |
| replicated | norms                                | copy                         | mean (T6)              |
"""

from __future__ import annotations

import torch

from neoxconv.errors import NeoxconvError


def role_of(name: str) -> str:
    parts = name.split(".")
    if parts[0] in ("embed", "lm_head"):
        return "vocab"
    if "norm" in name:
        return "replicated"
    leaf, kind = parts[-2], parts[-1]
    if leaf in ("o", "down"):
        return "row" if kind == "weight" else "row_bias"
    if leaf in ("q", "k", "v", "up", "gate"):
        return "column"
    raise ValueError(f"no TP role for canonical tensor {name!r}")


def split(t: torch.Tensor, role: str, p: int, parallel_residual: bool) -> list[torch.Tensor]:
    if p == 1:
        return [t]
    if role in ("vocab", "column"):
        _check_divisible(t.shape[0], p, role)
        return list(t.chunk(p, dim=0))
    if role == "row":
        _check_divisible(t.shape[1], p, role)
        return list(t.chunk(p, dim=1))
    if role == "row_bias":
        # Under a parallel (GPT-J) residual every rank adds its own bias before one all-reduce,
        # so the effective bias is the sum over ranks: each rank gets ~b/p. Otherwise the bias is
        # added once after the all-reduce and every rank holds the same copy.
        return split_sum(t, p) if parallel_residual else [t for _ in range(p)]
    if role == "replicated":
        return [t for _ in range(p)]
    raise ValueError(role)


def merge(parts: list[torch.Tensor], role: str, parallel_residual: bool) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    if role in ("vocab", "column"):
        return torch.cat(parts, dim=0)
    if role == "row":
        return torch.cat(parts, dim=1)
    if role == "row_bias":
        if parallel_residual:
            return _sum_like(parts)
        # Sequential residual: one bias added after the all-reduce, replicated like a norm, so
        # copies that drifted are averaged as norms are (T5 allows rank 0 or the mean).
        return _mean(parts)
    if role == "replicated":
        # Copies of replicated params can drift apart slightly in training (T6); the mean is
        # what every reference converter uses. Computed in fp32, cast back.
        return _mean(parts)
    raise ValueError(role)


def split_sum(t: torch.Tensor, p: int) -> list[torch.Tensor]:
    """p tensors that sum to exactly t: ranks 1..p-1 hold fl(t/p), rank 0 the float64 remainder.

    Why exact: the remainder r0 = t - (p-1)*fl(t/p) has |r0| ~ |t|/p <= |t|/2, so its rounding
    error is at most ulp(t)/4, and the float64 sum r0 + (p-1)*fl(t/p) rounds back to t. A plain
    t/p per rank would not survive a round trip at p = 3.
    """
    share = (t.double() / p).to(t.dtype)
    rest = (t.double() - (p - 1) * share.double()).to(t.dtype)
    return [rest] + [share for _ in range(p - 1)]


def _mean(parts: list[torch.Tensor]) -> torch.Tensor:
    """Mean in float64, cast back once (bit-exact for identical copies)."""
    total = parts[0].double()
    for t in parts[1:]:
        total = total + t.double()
    return (total / len(parts)).to(parts[0].dtype)


def _sum_like(parts: list[torch.Tensor], acc: torch.dtype | None = None) -> torch.Tensor:
    """Sum in float64 (exact for a handful of fp32/fp16/bf16 terms), cast back once."""
    acc = acc or torch.float64
    total = parts[0].to(acc)
    for t in parts[1:]:
        total = total + t.to(acc)
    return total.to(parts[0].dtype)


def _check_divisible(n: int, p: int, role: str) -> None:
    if n % p:
        raise NeoxconvError(f"cannot split a {role} dimension of {n} into {p} tensor-parallel ranks")


def padded_vocab(vocab_size: int, multiple: int, tp: int) -> int:
    """Smallest size >= vocab_size divisible by multiple * tp (NeoX tokenizer.py, §3.3)."""
    m = multiple * tp
    return -(-vocab_size // m) * m


def resize_vocab(t: torch.Tensor, rows: int, real_vocab: int) -> torch.Tensor:
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
