"""Meta-Llama-semantics reference forward on ``consolidated.XX.pth`` shards, shard by shard.

Follows Meta's reference model (META ``llama/model.py``; neox-formats.md §4.4, §6.3, T18), with
no merging of the shards (each model-parallel shard is one rank of a :class:`.RankGroup`):

* ``tok_embeddings``: fairscale ``ParallelEmbedding`` split on the embedding dim (dim 1;
  Llama 1/2): every rank looks up all tokens in its column slice, results are all-gathered on
  the last dim; or ``VocabParallelEmbedding`` split on dim 0 (Llama 3): masked lookup +
  all-reduce. Decided from the shapes: a shard of width dim/p is a dim-1 split.
* ``wq``/``wk``/``wv``/``w1``/``w3``/``output`` column-parallel (dim 0), ``wo``/``w2``
  row-parallel (dim 1, all-reduced), norms replicated (each rank uses its own copy).
* Rotary is **interleaved-complex**: pairs (x_2i, x_2i+1), θ = ``rope_theta`` (default 10000),
  computed in fp32. GQA: ``n_kv_heads`` (default ``n_heads``), local q head j uses local kv head
  j // n_rep (Meta ``repeat_kv``). RMSNorm ``x.float()·rsqrt(mean(x²)+norm_eps)`` cast back,
  times weight. Causal attention scaled 1/sqrt(d), softmax in fp32. FFN w2(silu(w1 x)·w3 x).
* ``rope.freqs`` is ignored. Llama-3.1 ``use_scaled_rope`` is not implemented (raises).

Streaming: the shards are memory-mapped as stored (:func:`open_meta`); every layer's tensors are
taken from them, cast to the compute dtype, used and dropped, so memory holds one layer in the
compute dtype plus activations (mapped file pages are page cache, not owned memory).

Returns fp32 logits [b, s, V] (V = rows of ``output`` over all shards).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import NeoxconvError
from ..io import load_pickle, read_json
from . import ops
from .neox_semantics import UnsupportedNeoxFeature
from .ranks import RankGroup, SimulatedGroup

__all__ = ["meta_reference_logits", "meta_embedding_split_dim", "open_meta"]

_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")


def open_meta(path: str | Path) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """A Meta Llama directory as stored: its ``consolidated.XX.pth`` shards memory-mapped (no
    tensor data is read until a layer uses it) and ``params.json``."""
    path = Path(path)
    files = sorted((int(m[1]), p) for p in path.iterdir() if (m := _SHARD.match(p.name)))
    if [i for i, _ in files] != list(range(len(files))) or not files:
        raise NeoxconvError(f"{path}: expected consolidated.00.pth .. consolidated.NN.pth, found "
                            f"{[p.name for _, p in files] or 'none'}")
    shards = []
    for _, p in files:
        sd = load_pickle(p)
        if not isinstance(sd, dict):
            raise NeoxconvError(f"{p}: expected a dict of tensors")
        shards.append(sd)
    return shards, read_json(path / "params.json")


def meta_embedding_split_dim(shards: Sequence[Mapping[str, torch.Tensor]], dim: int) -> int | None:
    """1 (Llama 1/2 ParallelEmbedding), 0 (Llama 3 VocabParallelEmbedding) or None (one shard)."""
    if len(shards) == 1:
        return None
    width = shards[0]["tok_embeddings.weight"].shape[1]
    if width == dim:
        return 0
    if width * len(shards) == dim:
        return 1
    raise NeoxconvError(f"tok_embeddings shard width {width} fits neither dim={dim} nor dim/{len(shards)}")


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def _embed(
    group: RankGroup, tokens: torch.Tensor, ws: list[torch.Tensor], split: int | None, starts: list[int]
) -> list[torch.Tensor]:
    if split is None:
        return [F.embedding(tokens, ws[0])]
    if split == 1:
        full = group.all_gather_cat([F.embedding(tokens, w) for w in ws], dim=-1)
        return [full for _ in ws]
    parts = []
    for r, w in zip(group.local_ranks, ws):
        rows = w.shape[0]
        local = tokens - starts[r]
        inside = (local >= 0) & (local < rows)
        parts.append(F.embedding(local.clamp(0, rows - 1), w) * inside.unsqueeze(-1).to(w.dtype))
    return group.all_reduce_sum(parts)


def meta_reference_logits(
    shards: Sequence[Mapping[str, torch.Tensor]],
    params: Mapping[str, Any],
    tokens: torch.Tensor,
    *,
    group: RankGroup | None = None,
    dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Logits of a Meta raw Llama checkpoint: ``shards[i]`` = ``consolidated.{i:02d}.pth`` dict,
    ``params`` = ``params.json``. ``dtype``: compute dtype (default: stored). ``progress(done,
    total)`` is called after the embedding, each layer and the head."""
    if params.get("use_scaled_rope"):
        raise UnsupportedNeoxFeature("Llama-3.1 scaled rope is not implemented by the reference forward")
    p = len(shards)
    group = group or SimulatedGroup(p)
    if group.tp != p:
        raise NeoxconvError(f"rank group has tp={group.tp} but there are {p} shards")
    dim, n_layers, n_heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
    n_kv = int(params.get("n_kv_heads") or n_heads)
    eps = float(params.get("norm_eps", 1e-5))
    theta = float(params.get("rope_theta", 10000.0))
    if n_heads % p or n_kv % p:
        raise NeoxconvError(f"{p} shards do not divide n_heads={n_heads} / n_kv_heads={n_kv}")
    d = dim // n_heads
    # The shards stay as given (stored dtype, where they are); each layer's tensors are moved and
    # cast to the compute dtype inside the loop, so peak memory is the stored model + one layer
    # in the compute dtype (not the whole model in fp32 when checking a bf16 checkpoint in fp32).
    local = [shards[r] for r in group.local_ranks]
    dtype = dtype or local[0]["tok_embeddings.weight"].dtype

    def cast(name: str) -> list[torch.Tensor]:
        return [st[name].to(group.device, dtype) for st in local]
    split = meta_embedding_split_dim(shards, dim)
    # first vocab row of each shard (equal chunks in Meta's files; computed, not assumed)
    starts = [0]
    for sh in shards[:-1]:
        starts.append(starts[-1] + sh["tok_embeddings.weight"].shape[0])
    s = tokens.shape[1]
    mask = ops.causal_mask(s, None, "hf", group.device)
    tokens = tokens.to(group.device)

    with torch.no_grad():
        tick = progress or (lambda _done, _total: None)
        xs = _embed(group, tokens, cast("tok_embeddings.weight"), split, starts)
        tick(1, n_layers + 2)
        for i in range(n_layers):
            pre = f"layers.{i}."
            names = [k for k in local[0] if k.startswith(pre)]
            layer = [dict(zip(names, ts)) for ts in zip(*(cast(k) for k in names))]
            a_in = group.copy_to_ranks([_rms(x, st[pre + "attention_norm.weight"], eps) for x, st in zip(xs, layer)])
            parts = []
            for a, st in zip(a_in, layer):
                b = a.shape[0]
                q = F.linear(a, st[pre + "attention.wq.weight"]).view(b, s, -1, d).transpose(1, 2)
                k = F.linear(a, st[pre + "attention.wk.weight"]).view(b, s, -1, d).transpose(1, 2)
                v = F.linear(a, st[pre + "attention.wv.weight"]).view(b, s, -1, d).transpose(1, 2)
                q, k = ops.apply_interleaved_rotary(q, theta, dtype), ops.apply_interleaved_rotary(k, theta, dtype)
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
                ctx = ops.attention(q, k, v, mask).transpose(1, 2).reshape(b, s, -1)
                parts.append(F.linear(ctx, st[pre + "attention.wo.weight"]))
            hs = [x + y for x, y in zip(xs, group.all_reduce_sum(parts))]
            f_in = group.copy_to_ranks([_rms(h, st[pre + "ffn_norm.weight"], eps) for h, st in zip(hs, layer)])
            parts = []
            for f, st in zip(f_in, layer):
                gate = F.silu(F.linear(f, st[pre + "feed_forward.w1.weight"]))
                up = F.linear(f, st[pre + "feed_forward.w3.weight"])
                parts.append(F.linear(gate * up, st[pre + "feed_forward.w2.weight"]))
            xs = [h + y for h, y in zip(hs, group.all_reduce_sum(parts))]
            del layer
            tick(i + 2, n_layers + 2)
        normed = group.copy_to_ranks([_rms(x, w, eps) for x, w in zip(xs, cast("norm.weight"))])
        logits = group.all_gather_cat([F.linear(h, w) for h, w in zip(normed, cast("output.weight"))], dim=-1)
        tick(n_layers + 2, n_layers + 2)
    return logits.float()
