"""Fused tensor layouts shared by format adapters (per TP rank; never in the canonical map).

QKV (neox-formats.md §4), n = heads on this rank, kv = KV heads on this rank, d = head dim:

- mha_interleaved: rows grouped per head as [q_h; k_h; v_h] -> view [n, 3, d, ...]. NeoX MHA
  and HF GPTNeoX use it (kv == n).
- gqa_blocked: [Q; K; V] (current NeoX GQA, since 2024-11).
- gqa_fakehead: per query head [q_h (d); k-fragment (g); v-fragment (g)], g = d*kv/n
  (NeoX 2024-02 .. 2024-11).

Gated MLP (T7): NeoX `linear1` holds [up; gate] on each rank; the activation is applied to
the second half.
"""

from __future__ import annotations

import torch

from neoxconv.errors import NeoxconvError

QKV_LAYOUTS = ("mha_interleaved", "gqa_blocked", "gqa_fakehead")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int,
             layout: str) -> torch.Tensor:
    rest = q.shape[1:]
    d = q.shape[0] // heads
    if layout == "mha_interleaved":
        if kv_heads != heads:
            raise NeoxconvError(f"the interleaved QKV layout needs as many KV heads as heads ({kv_heads} != {heads})")
        return torch.stack([t.reshape(heads, d, *rest) for t in (q, k, v)], dim=1).reshape(3 * heads * d, *rest)
    if layout == "gqa_blocked":
        return torch.cat([q, k, v], dim=0)
    if layout == "gqa_fakehead":
        g = _fake_head_fragment(d, heads, kv_heads)
        parts = [q.reshape(heads, d, *rest), k.reshape(heads, g, *rest), v.reshape(heads, g, *rest)]
        return torch.cat(parts, dim=1).reshape(-1, *rest)
    raise NeoxconvError(f"unknown QKV layout {layout!r} (known: {', '.join(QKV_LAYOUTS)})")


def split_qkv(qkv: torch.Tensor, heads: int, kv_heads: int, layout: str) -> tuple[torch.Tensor, ...]:
    rest = qkv.shape[1:]
    d = qkv.shape[0] // (heads + 2 * kv_heads)
    if qkv.shape[0] != (heads + 2 * kv_heads) * d:
        raise NeoxconvError(f"fused QKV has {qkv.shape[0]} rows, not a multiple of {heads} + 2*{kv_heads} heads")
    if layout == "mha_interleaved":
        if kv_heads != heads:
            raise NeoxconvError(f"the interleaved QKV layout needs as many KV heads as heads ({kv_heads} != {heads})")
        x = qkv.reshape(heads, 3, d, *rest)
        return tuple(x[:, i].reshape(heads * d, *rest) for i in range(3))
    if layout == "gqa_blocked":
        return tuple(qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=0))
    if layout == "gqa_fakehead":
        g = _fake_head_fragment(d, heads, kv_heads)
        x = qkv.reshape(heads, d + 2 * g, *rest)
        q, k, v = x.split([d, g, g], dim=1)
        return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)
    raise NeoxconvError(f"unknown QKV layout {layout!r} (known: {', '.join(QKV_LAYOUTS)})")


def _fake_head_fragment(d: int, heads: int, kv_heads: int) -> int:
    if (d * kv_heads) % heads:
        raise NeoxconvError(f"the fake-head QKV layout needs head_dim*kv_heads divisible by heads ({d}*{kv_heads} % {heads})")
    return d * kv_heads // heads


def fuse_gated(up: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return torch.cat([up, gate], dim=0)


def split_gated(linear1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    up, gate = linear1.chunk(2, dim=0)
    return up, gate
