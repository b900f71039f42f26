"""NeoX semantics on per-TP-rank tensors exactly as stored on disk: the building blocks of one rank.

These blocks compute logits the way GPT-NeoX's own forward uses its per-rank tensors
(NX ``megatron/model/transformer.py``, ``megatron/mpu/layers.py``), written from
``docs/neox-formats.md`` and NeoX's source, with **no converter code**: no un-fusing into a
canonical form, no merging or resharding. Every rank reads its own fused tensors; the ranks are
joined only by the collectives of :mod:`.ranks`. A converter that writes a wrong layout therefore
makes this forward disagree with the converted HF model.

Semantics (section numbers refer to neox-formats.md):

* **Spec indices** (§1.3, T1): embedding at 0, layer ``i`` at ``i + 2``, final norm at ``L + 3``,
  untied LM head ``final_linear`` at ``L + 4``; tied models take logits from index 0's weight.
* **Embedding** is vocab-parallel (§3): rank ``r`` holds rows ``[r·V/p, (r+1)·V/p)``, looks up
  the tokens in its range, zeros the rest; the per-rank results are all-reduced.
* **Norms** are replicated, and each rank applies *its own copy* (what NeoX does; the copies of a
  real checkpoint may differ slightly, §3.2, T6; ``replicated="mean"`` uses exactly what an HF
  export holds instead, see :class:`ReferenceOptions`). LayerNorm with bias; RMSNorm current style
  ``x·rsqrt(mean(x²)+eps)·scale`` in fp32 (or the pre-2025-05 ``x/(rms+eps)``, T17, on request).
* **QKV** (§4): ``mha_interleaved`` per rank viewed [np, 3·d] and cut in thirds;
  ``gqa_blocked`` per rank [Q_r (np·d); K_r (kvp·d); V_r (kvp·d)]; ``gqa_fakehead`` per rank
  viewed [np, d + 2g], g = d·kvp/np. Local query head j uses local KV head j // (np/kvp).
  NeoX uses the MHA path whenever num_kv_heads is unset or equals the head count (T8).
* **Rotary** (§4.4, T9): rotate-half on the first int(d·rotary_pct) dims (all of d if pct == 1),
  cos/sin built in fp32 and cast to the compute dtype. A stored ``inv_freq`` is ignored.
* **Attention**: causal, scaled by 1/sqrt(d), softmax in fp32. Sliding window (Mistral, §2.3):
  ``sliding_window_convention="neox_flash"`` (default) is what NeoX computes: flash-attn's
  ``window_size=(W, -1)``, a query sees itself and W earlier keys (W+1); ``"hf"`` lets it see
  itself and W-1 earlier keys, as HF's masks with ``sliding_window: W`` do (transformers
  4.38-5.23). NeoX's default is checked because a conversion must reproduce it: NeoX
  ``sliding_window_width: W`` is HF ``sliding_window: W+1``. NeoX applies the window on every
  layer: ``"global"`` layers through the attention mask training builds
  (``get_attn_mask``: ``triu(diagonal=-W)``, the same W+1 keys), ``"flash"`` layers through
  flash's window (:attr:`.NeoxSemantics.layer_windows`).
* **MLP**: ``mlp.linear1``/``mlp.linear2`` (current), legacy ``mlp.dense_h_to_4h``/
  ``mlp.dense_4h_to_h``, or legacy Llama ``mlp.w1`` (gate), ``mlp.w3`` (up), ``mlp.w2`` (down)
  (§2.1). Gated activations: each rank's ``linear1`` output is [x_r ; gate_r], output
  act(gate)·x (§3, T7). GELU is exact (``F.gelu``) unless ``bias_gelu_fusion`` (tanh form).
* **Row-parallel layers** (§3.1, T5): ``attention.dense`` and the MLP output produce per-rank
  partial sums. ``gpt_j_residual: true``: each rank adds *its own* row biases to its partials
  and a single all-reduce follows: ``x + allreduce(attn_r + b_attn_r + mlp_r + b_mlp_r)`` with
  attn on ``input_layernorm(x)`` and mlp on ``post_attention_layernorm(x)`` (``input_layernorm``
  for both with ``gpt_j_tied``). Otherwise: attention all-reduced, then the bias added once per
  replica (each rank its own copy, which a correct checkpoint keeps identical), residual,
  ``post_attention_layernorm``, MLP, all-reduce, bias, residual.
* **Logits**: final norm (own copy per rank), ``final_linear`` (or the tied word embeddings) per
  rank, gathered over the vocab: the full padded vocabulary [b, s, V_pad], returned in fp32.

* **Norms** (docs/custom-export.md §3.2): LayerNorm (``weight``, ``bias``), RMSNorm (``scale``),
  ScaleNorm (``g``: x / clamp(‖x‖, eps) · g), non-parametric LayerNorm (no tensors).
* **Positions** (§3.1): rotary (above); ``learned``: ``position_embeddings.weight`` (each rank its
  own copy) at position + ``opt_pos_emb_offset``, times ``mup_rp_embedding_mult``; ``sinusoidal``:
  [sin, cos] of arange(s) ⊗ the stored ``inv_freq`` (in its dtype), times the multiplier; ``alibi``:
  each rank adds -(i - j)·slope of its heads (the stored ``slopes`` buffer, as NeoX loads it) to the
  scores of global/flash layers, not local ones; ``none``.
* **QK-norm** (§3.3, §4): one module of shape [heads per rank, head dim] normalises q, then k
  (repeated to the query heads first under GQA), before rotary; LayerNorm kinds over both dims
  (the TP-dependent extent), RMSNorm over the head dim (both with ``rmsnorm_fusion``), ScaleNorm
  over the head dim with the rank's one gain.
* **Local layers**: DeepSpeed's block-sparse attention: a query sees the keys its block may attend
  by the stored ``master_layout`` (or, without it, this block and ``num_local_blocks // 2`` before
  it), causally and within the window; no ALiBi.

NeoX's quirk is reproduced: with ``gpt_j_residual`` and *no* MLP bias, NeoX (``transformer.py``
L1093-1113 @ ea7aefd8) sets ``output = mlp_output``: the attention output is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import NeoxconvError
from . import ops
from .neox_semantics import GATED_ACTIVATIONS, NeoxSemantics, UnsupportedNeoxFeature
from .ranks import RankGroup

__all__ = [
    "IGNORED_SUFFIXES",
    "RankStates",
    "ReferenceOptions",
    "Run",
    "attention_partial",
    "check_keys",
    "embed",
    "final_norm",
    "head_partials",
    "layer",
    "make_run",
    "mlp_partial",
    "norm",
]

RankStates = list[dict[str, torch.Tensor]]

#: keys that may appear in a stored layer but do not enter the forward
IGNORED_SUFFIXES = ("attention.rotary_emb.inv_freq", "_extra_state")
ALIBI_SLOPES = "attention.alibi_embed.slopes"
LOCAL_LAYOUT = "attention.sparse_attn.master_layout"
QK_NORM = "attention.qk_layernorm"


@dataclass(frozen=True)
class ReferenceOptions:
    """Choices where NeoX and HF semantics knowingly differ (neox-formats.md T17).

    * ``sliding_window_convention``: ``"neox_flash"`` (default; what NeoX computes: W+1 keys) or
      ``"hf"`` (W keys, HF's masks), see :func:`.ops.causal_mask`.
    * ``rmsnorm_style``: ``"current"`` (x·rsqrt(mean(x²)+eps), NeoX since 2025-05) or
      ``"legacy"`` (x/(rms+eps), older NeoX).
    * ``replicated``: ``"own"`` (default; NeoX: every rank uses its own copy of the replicated
      norms and sequential-residual row biases, and adds its own part of the gpt_j row biases) or
      ``"mean"``: exactly what a merged export holds (the converter's merge roles, §3.2): the
      mean of the replicated copies and, under ``gpt_j_residual``, the total of the per-rank row
      biases, each computed in float64 and rounded ONCE to the stored dtype (an fp16 export
      holds fp16(mean), fp16(sum)); the rounded total is added once (by rank 0; the other ranks
      add zeros) before the all-reduce. With ``"mean"`` a parity check isolates layout errors
      from the averaging gap of checkpoints whose copies drifted apart (e.g. 20B) and from the
      rounding of the merged values; compare both to measure that gap. ``"mean"`` is for parity
      checks, not training.
    """

    sliding_window_convention: str = "neox_flash"
    rmsnorm_style: str = "current"
    replicated: str = "own"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("sliding_window_convention", ("hf", "neox_flash")),
            ("rmsnorm_style", ("current", "legacy")),
            ("replicated", ("own", "mean")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Run:
    """Everything fixed for one forward call."""

    group: RankGroup
    sem: NeoxSemantics
    dtype: torch.dtype
    head_dim: int
    cos: torch.Tensor | None  #: rotary tables (None: not rotary)
    sin: torch.Tensor | None
    mask: torch.Tensor  #: the mask of layers without their own entry in ``layer_masks``
    opts: ReferenceOptions
    layer_masks: tuple[torch.Tensor, ...] = ()  #: per layer (per-layer attention masks)

    def mask_for(self, layer: int | None) -> torch.Tensor:
        if layer is None or not self.layer_masks:
            return self.mask
        return self.layer_masks[layer]


def make_run(group: RankGroup, sem: NeoxSemantics, seq_len: int, hidden: int, dtype: torch.dtype,
             opts: ReferenceOptions, num_layers: int) -> Run:
    """Rotary tables and attention masks for one forward of ``seq_len`` tokens."""
    if sem.hidden_size is not None and sem.hidden_size != hidden:
        raise NeoxconvError(f"config hidden_size {sem.hidden_size} != embedding width {hidden}")
    head_dim = sem.head_dim(hidden)
    cos = sin = None
    if sem.pos_emb == "rotary":
        cos, sin = ops.rotary_cos_sin(seq_len, sem.rotary_dims(head_dim), sem.rotary_base, dtype, group.device)
    masks: dict[int | None, torch.Tensor] = {}

    def mask_of(window: int | None) -> torch.Tensor:
        if window not in masks:
            masks[window] = ops.causal_mask(seq_len, window, opts.sliding_window_convention, group.device)
        return masks[window]

    layer_masks = tuple(mask_of(sem.layer_window(i)) for i in range(num_layers)) if sem.layer_windows else ()
    return Run(group, sem, dtype, head_dim, cos, sin, mask_of(sem.sliding_window), opts, layer_masks)


def _norm_param(st: Mapping[str, torch.Tensor], prefix: str, name: str, kind: str) -> torch.Tensor:
    t = st.get(f"{prefix}.{name}")
    if t is None:
        raise NeoxconvError(f"config says {kind} but '{prefix}.{name}' is missing (found: {_keys(st, prefix)})")
    return t


def norm(run: Run, x: torch.Tensor, st: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    kind, eps = run.sem.norm, run.sem.norm_eps
    if kind == "rmsnorm":
        scale = _norm_param(st, prefix, "scale", kind)
        if run.opts.rmsnorm_style == "legacy":
            return ops.rms_norm_neox_legacy(x, scale, eps)
        return ops.rms_norm_neox(x, scale, eps)
    if kind == "scalenorm":
        return ops.scale_norm(x, _norm_param(st, prefix, "g", kind), eps)
    if kind == "non_parametric_layernorm":
        return ops.layer_norm(x, None, None, eps)
    return ops.layer_norm(x, _norm_param(st, prefix, "weight", kind), st.get(f"{prefix}.bias"), eps)


def qk_norm(run: Run, x: torch.Tensor, st: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """NeoX's QK-norm on one rank's heads x [b, np, s, d]: one module of shape [np, d] (§3.3, §4)."""
    kind, eps = run.sem.norm, run.sem.norm_eps
    y = x.transpose(1, 2)  # [b, s, np, d]: the module sees [..., np, d]
    if kind in ("layernorm", "non_parametric_layernorm"):  # torch LayerNorm([np, d]): over both dims
        weight = _norm_param(st, QK_NORM, "weight", kind) if kind == "layernorm" else None
        y = ops.layer_norm(y, weight, st.get(f"{QK_NORM}.bias"), eps, dims=2)
    elif kind == "rmsnorm":  # NeoX's RMSNorm: over the head dim; apex's fused one over both
        y = ops.rms_norm_neox(y, _norm_param(st, QK_NORM, "scale", kind), eps, dims=2 if run.sem.qk_norm_fused else 1)
    else:  # ScaleNorm: over the head dim, this rank's one gain
        y = ops.scale_norm(y, _norm_param(st, QK_NORM, "g", kind), eps)
    return y.transpose(1, 2)


def _keys(st: Mapping[str, Any], prefix: str) -> list[str]:
    return sorted(k for k in st if k.startswith(prefix))


def split_qkv(run: Run, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-rank fused QKV output [b, s, rows] -> q [b, np, s, d], k/v [b, kvp, s, d] (§4.1-4.3)."""
    sem, d, tp = run.sem, run.head_dim, run.group.tp
    np_, kvp = sem.num_heads // tp, sem.num_kv_heads // tp
    b, s, rows = qkv.shape
    expected = (np_ + 2 * kvp) * d
    if rows != expected:
        raise NeoxconvError(
            f"query_key_value has {rows} rows per rank, expected {expected} "
            f"(heads/rank {np_}, kv heads/rank {kvp}, head dim {d})"
        )
    layout = sem.qkv_layout
    if layout == "mha_interleaved":
        q, k, v = qkv.view(b, s, np_, 3 * d).split(d, dim=-1)
    elif layout == "gqa_blocked":
        q, k, v = qkv.split((np_ * d, kvp * d, kvp * d), dim=-1)
        q, k, v = q.reshape(b, s, np_, d), k.reshape(b, s, kvp, d), v.reshape(b, s, kvp, d)
    elif layout == "gqa_fakehead":
        if (d * kvp) % np_:
            raise NeoxconvError(
                f"gqa_fakehead needs head_dim*kv_heads/rank ({d}*{kvp}) divisible by heads/rank ({np_})"
            )
        g = d * kvp // np_
        q, k, v = qkv.view(b, s, np_, d + 2 * g).split((d, g, g), dim=-1)
        k, v = k.reshape(b, s, kvp, d), v.reshape(b, s, kvp, d)
    else:  # pragma: no cover - validated in NeoxSemantics
        raise AssertionError(layout)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _local_mask(run: Run, st: Mapping[str, torch.Tensor], mask: torch.Tensor, seq: int, heads: int) -> torch.Tensor:
    """A local layer's mask [np, s, s]: ``mask`` within the blocks DeepSpeed's layout keeps (the
    stored ``master_layout`` [np, nb, nb], or without it this block and blocks // 2 before it)."""
    block, blocks = run.sem.local_block, -(-seq // run.sem.local_block)
    layout = st.get(LOCAL_LAYOUT)
    if layout is None:
        i = torch.arange(blocks, device=mask.device)
        one = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - run.sem.local_blocks // 2)
        layout = one.expand(heads, blocks, blocks)
    elif layout.shape[-1] < blocks:
        raise NeoxconvError(f"local attention: {seq} tokens need {blocks} blocks of {block}, the stored layout has "
                            f"{layout.shape[-1]} (NeoX's seq_length)")
    return mask & ops.local_mask(seq, block, layout[:, :blocks, :blocks], mask.device)


def _alibi(run: Run, st: Mapping[str, torch.Tensor], rank: int, heads: int, seq: int) -> torch.Tensor:
    """This rank's ALiBi bias [np, s, s]: its stored slopes (what NeoX loads), else the formula's slice."""
    slopes = st.get(ALIBI_SLOPES)
    if slopes is None:
        slopes = torch.tensor(ops.alibi_slopes(run.sem.num_heads), device=run.group.device)[
            rank * heads:(rank + 1) * heads]
    return ops.alibi_bias(seq, slopes, run.dtype)


def attention_partial(run: Run, x: torch.Tensor, st: Mapping[str, torch.Tensor],
                      mask: torch.Tensor | None = None, rank: int = 0, layer_type: str = "global") -> torch.Tensor:
    """One rank's attention: its QKV slice, its heads, its columns of ``attention.dense`` (no bias)."""
    qkv = F.linear(x, _req(st, "attention.query_key_value.weight"), st.get("attention.query_key_value.bias"))
    q, k, v = split_qkv(run, qkv)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # local q head j uses local kv head j // groups (§4.2); NeoX repeats before the QK-norm
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if run.sem.qk_norm:
        q, k = qk_norm(run, q, st), qk_norm(run, k, st)
    if run.cos is not None:
        q = ops.apply_rotate_half(q, run.cos, run.sin)
        k = ops.apply_rotate_half(k, run.cos, run.sin)
    mask = run.mask if mask is None else mask
    seq, heads = q.shape[2], q.shape[1]
    bias = None
    if layer_type == "local":  # DeepSpeed's sparse path: the block layout, no ALiBi
        mask = _local_mask(run, st, mask, seq, heads)
    elif run.sem.pos_emb == "alibi":
        bias = _alibi(run, st, rank, heads, seq)
    ctx = ops.attention(q, k, v, mask, bias)  # [b, np, s, d]
    b, np_, s, d = ctx.shape
    ctx = ctx.transpose(1, 2).reshape(b, s, np_ * d)
    return F.linear(ctx, _req(st, "attention.dense.weight"))


_MLP_SCHEMAS = (
    # (input weight, output weight) for the non-Llama schemas
    ("mlp.linear1", "mlp.linear2"),
    ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
)


def mlp_partial(
    run: Run, x: torch.Tensor, st: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One rank's MLP partial output (no row bias) and that rank's row bias (or None)."""
    sem = run.sem
    for w_in, w_out in _MLP_SCHEMAS:
        if f"{w_in}.weight" in st:
            h = F.linear(x, st[f"{w_in}.weight"], st.get(f"{w_in}.bias"))
            if sem.gated:  # [x_r ; gate_r] per rank, act on the gate half (T7)
                up, gate = h.chunk(2, dim=-1)
                h = ops.activation_fn(GATED_ACTIVATIONS[sem.activation])(gate) * up
            else:
                h = ops.activation_fn(sem.activation, sem.bias_gelu_fusion, sem.onnx_safe)(h)
            return F.linear(h, _req(st, f"{w_out}.weight")), st.get(f"{w_out}.bias")
    if "mlp.w1.weight" in st:  # legacy LLaMAParallelMLP: w2(act(w1 x) * w3 x), no biases
        base = GATED_ACTIVATIONS.get(sem.activation, sem.activation)
        act = ops.activation_fn(base, sem.bias_gelu_fusion)
        h = act(F.linear(x, st["mlp.w1.weight"])) * F.linear(x, _req(st, "mlp.w3.weight"))
        return F.linear(h, _req(st, "mlp.w2.weight")), None
    raise NeoxconvError(f"no MLP weights found in layer (keys: {sorted(st)})")


def _req(st: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return st[name]
    except KeyError:
        raise NeoxconvError(f"missing tensor '{name}' (have: {sorted(st)})") from None


def _with_bias(t: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return t if b is None else t + b


def embed(run: Run, tokens: torch.Tensor, states: RankStates) -> list[torch.Tensor]:
    parts = []
    sem = run.sem
    for r, st in zip(run.group.local_ranks, states):
        if ("position_embeddings.weight" in st) != (sem.pos_emb == "learned"):
            has = "stores" if "position_embeddings.weight" in st else "lacks"
            raise NeoxconvError(f"pos_emb is {sem.pos_emb!r}, but the embedding {has} position_embeddings.weight")
        w = _req(st, "word_embeddings.weight")
        rows = w.shape[0]
        local = tokens - r * rows
        inside = (local >= 0) & (local < rows)
        e = F.embedding(local.clamp(0, rows - 1), w) * inside.unsqueeze(-1).to(w.dtype)
        parts.append(e)
    xs = run.group.all_reduce_sum(parts)
    if sem.pos_emb not in ("learned", "sinusoidal"):
        return xs
    seq = tokens.shape[1]
    out = []
    for x, st in zip(xs, states):  # NeoX adds the (serial) position embedding after the all-reduce
        if sem.pos_emb == "learned":
            pos = torch.arange(seq, device=tokens.device) + sem.pos_offset
            table = F.embedding(pos, st["position_embeddings.weight"])
        else:
            inv_freq = st.get("position_embeddings.inv_freq")
            if inv_freq is None:
                h = x.shape[-1]
                inv_freq = (1.0 / (10000 ** (torch.arange(0, h, 2, device=x.device).float() / h))).to(run.dtype)
            table = ops.sinusoidal_positions(seq, inv_freq)
        out.append(x + table.mul_(sem.pos_mult))
    return out


def layer(run: Run, xs: list[torch.Tensor], states: RankStates, index: int | None = None) -> list[torch.Tensor]:
    """One transformer layer on every local rank; ``index`` (0-based) selects its attention mask."""
    g, sem = run.group, run.sem
    mask = run.mask_for(index)
    kind = sem.layer_type(index) if index is not None else "global"
    n1 = [norm(run, x, st, "input_layernorm") for x, st in zip(xs, states)]
    if sem.gpt_j_residual:
        n2 = n1 if sem.gpt_j_tied else [norm(run, x, st, "post_attention_layernorm") for x, st in zip(xs, states)]
        a_in, m_in = g.copy_to_ranks(n1), g.copy_to_ranks(n2)
        parts = []
        for r, a, m, st in zip(g.local_ranks, a_in, m_in, states):
            attn = _with_bias(attention_partial(run, a, st, mask, r, kind), st.get("attention.dense.bias"))
            mlp, mlp_bias = mlp_partial(run, m, st)
            # NeoX without an MLP bias returns the MLP output alone: the attention output is dropped
            parts.append(mlp if mlp_bias is None else attn + (mlp + mlp_bias))
        return [x + y for x, y in zip(xs, g.all_reduce_sum(parts))]
    a_in = g.copy_to_ranks(n1)
    attn = g.all_reduce_sum([attention_partial(run, a, st, mask, r, kind)
                             for r, a, st in zip(g.local_ranks, a_in, states)])
    hs = [x + _with_bias(y, st.get("attention.dense.bias")) for x, y, st in zip(xs, attn, states)]
    m_in = g.copy_to_ranks([norm(run, h, st, "post_attention_layernorm") for h, st in zip(hs, states)])
    mlp_out = [mlp_partial(run, m, st) for m, st in zip(m_in, states)]
    ys = g.all_reduce_sum([y for y, _ in mlp_out])
    return [h + _with_bias(y, b) for h, y, (_, b) in zip(hs, ys, mlp_out)]


def final_norm(run: Run, xs: list[torch.Tensor], states: RankStates) -> list[torch.Tensor]:
    """The final norm, each rank with its own copy (spec index L+3)."""
    return [norm(run, x, st, "norm") for x, st in zip(xs, states)]


def head_partials(run: Run, normed: list[torch.Tensor], states: RankStates) -> list[torch.Tensor]:
    """Vocab-parallel logits: rank r's columns [b, s, V_pad/p] of ``final_linear`` (or of the tied
    word embeddings), column-parallel without the gather."""
    name = "word_embeddings.weight" if run.sem.tied_embeddings else "final_linear.weight"
    return [F.linear(h, _req(st, name)) for h, st in zip(run.group.copy_to_ranks(normed), states)]


def check_keys(states: RankStates, spec_idx: int) -> None:
    known_prefixes = ("input_layernorm.", "post_attention_layernorm.", "attention.query_key_value.",
                      "attention.dense.", "mlp.", f"{QK_NORM}.", ALIBI_SLOPES, LOCAL_LAYOUT)
    for st in states:
        bad = [k for k in st if not k.startswith(known_prefixes) and not k.endswith(IGNORED_SUFFIXES)]
        if bad:
            raise UnsupportedNeoxFeature(f"spec index {spec_idx}: tensors the reference cannot use: {bad}")


