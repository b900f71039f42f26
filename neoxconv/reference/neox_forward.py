"""NeoX-semantics reference forward on per-TP-rank tensors exactly as stored on disk.

This module computes logits the way GPT-NeoX's own forward uses its per-rank tensors
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

Deliberate deviation from NeoX: with ``gpt_j_residual`` and *no* MLP bias, current NeoX code
(``transformer.py`` L1093-1113 @ ea7aefd8) sets ``output = mlp_output`` and drops the attention
output; the reference implements the intended ``x + allreduce(attn + mlp)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import NeoxconvError
from . import ops
from .neox_semantics import GATED_ACTIVATIONS, NeoxSemantics, UnsupportedNeoxFeature
from .ranks import RankGroup, SimulatedGroup

__all__ = [
    "ReferenceOptions",
    "NeoxShardSource",
    "InMemoryShardSource",
    "NeoxReferenceModel",
    "neox_reference_logits",
    "spec_indices",
]

RankStates = list[dict[str, torch.Tensor]]

#: keys that may appear in a stored layer but do not enter the forward
_IGNORED_SUFFIXES = ("attention.rotary_emb.inv_freq", "_extra_state")


class NeoxShardSource(Protocol):
    """What the reference needs from a NeoX checkpoint reader (duck-typed)."""

    tp: int
    num_layers: int
    args: dict
    qkv_layout: str

    def rank_states(self, spec_idx: int) -> list[dict[str, torch.Tensor]]: ...


@dataclass
class InMemoryShardSource:
    """A :class:`NeoxShardSource` over ready dicts: ``layers[spec_idx][rank] -> {name: tensor}``."""

    tp: int
    num_layers: int
    args: dict
    qkv_layout: str
    layers: dict[int, list[dict[str, torch.Tensor]]] = field(default_factory=dict)

    def rank_states(self, spec_idx: int) -> list[dict[str, torch.Tensor]]:
        try:
            return self.layers[spec_idx]
        except KeyError:
            raise NeoxconvError(f"no pipeline spec index {spec_idx} in this checkpoint") from None


def spec_indices(num_layers: int, tied: bool) -> dict[str, Any]:
    """Pipeline spec indices (§1.3): embed 0, layers 2..L+1, final norm L+3, head L+4 (untied)."""
    return {
        "embed": 0,
        "layers": [i + 2 for i in range(num_layers)],
        "final_norm": num_layers + 3,
        "head": 0 if tied else num_layers + 4,
    }


# --------------------------------------------------------------------------------------------
# Per-rank building blocks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceOptions:
    """Choices where NeoX and HF semantics knowingly differ (neox-formats.md T17).

    * ``sliding_window_convention``: ``"neox_flash"`` (default; what NeoX computes: W+1 keys) or
      ``"hf"`` (W keys, HF's masks), see :func:`.ops.causal_mask`.
    * ``rmsnorm_style``: ``"current"`` (x·rsqrt(mean(x²)+eps), NeoX since 2025-05) or
      ``"legacy"`` (x/(rms+eps), older NeoX).
    * ``replicated``: ``"own"`` (default; NeoX: every rank uses its own copy of the replicated
      norms and sequential-residual row biases, and adds its own part of the gpt_j row biases) or
      ``"mean"``: exactly what a merged export holds (``neoxconv.reshard.merge``, §3.2): the
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
class _Run:
    """Everything fixed for one forward call."""

    group: RankGroup
    sem: NeoxSemantics
    dtype: torch.dtype
    head_dim: int
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor  #: the mask of layers without their own entry in ``layer_masks``
    opts: ReferenceOptions
    layer_masks: tuple[torch.Tensor, ...] = ()  #: per layer (per-layer attention masks)

    def mask_for(self, layer: int | None) -> torch.Tensor:
        if layer is None or not self.layer_masks:
            return self.mask
        return self.layer_masks[layer]


def _norm(run: _Run, x: torch.Tensor, st: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    scale = st.get(f"{prefix}.scale")
    weight = st.get(f"{prefix}.weight")
    if run.sem.norm == "rmsnorm":
        if scale is None:
            raise NeoxconvError(f"config says rmsnorm but '{prefix}.scale' is missing (found: {_keys(st, prefix)})")
        if run.opts.rmsnorm_style == "legacy":
            return ops.rms_norm_neox_legacy(x, scale, run.sem.norm_eps)
        return ops.rms_norm_neox(x, scale, run.sem.norm_eps)
    if weight is None:
        raise NeoxconvError(f"config says layernorm but '{prefix}.weight' is missing (found: {_keys(st, prefix)})")
    return ops.layer_norm(x, weight, st.get(f"{prefix}.bias"), run.sem.norm_eps)


def _keys(st: Mapping[str, Any], prefix: str) -> list[str]:
    return sorted(k for k in st if k.startswith(prefix))


def _split_qkv(run: _Run, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _attention_partial(run: _Run, x: torch.Tensor, st: Mapping[str, torch.Tensor],
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """One rank's attention: its QKV slice, its heads, its columns of ``attention.dense`` (no bias)."""
    qkv = F.linear(x, _req(st, "attention.query_key_value.weight"), st.get("attention.query_key_value.bias"))
    q, k, v = _split_qkv(run, qkv)
    q = ops.apply_rotate_half(q, run.cos, run.sin)
    k = ops.apply_rotate_half(k, run.cos, run.sin)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # local q head j uses local kv head j // groups (§4.2)
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    ctx = ops.attention(q, k, v, run.mask if mask is None else mask)  # [b, np, s, d]
    b, np_, s, d = ctx.shape
    ctx = ctx.transpose(1, 2).reshape(b, s, np_ * d)
    return F.linear(ctx, _req(st, "attention.dense.weight"))


_MLP_SCHEMAS = (
    # (input weight, output weight) for the non-Llama schemas
    ("mlp.linear1", "mlp.linear2"),
    ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
)


def _mlp_partial(
    run: _Run, x: torch.Tensor, st: Mapping[str, torch.Tensor]
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
                h = ops.activation_fn(sem.activation, sem.bias_gelu_fusion)(h)
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


def _embed(run: _Run, tokens: torch.Tensor, states: RankStates) -> list[torch.Tensor]:
    parts = []
    for r, st in zip(run.group.local_ranks, states):
        if "position_embeddings.weight" in st:
            raise UnsupportedNeoxFeature("learned position embeddings are not supported (rotary only)")
        w = _req(st, "word_embeddings.weight")
        rows = w.shape[0]
        local = tokens - r * rows
        inside = (local >= 0) & (local < rows)
        e = F.embedding(local.clamp(0, rows - 1), w) * inside.unsqueeze(-1).to(w.dtype)
        parts.append(e)
    return run.group.all_reduce_sum(parts)


def _layer(run: _Run, xs: list[torch.Tensor], states: RankStates, layer: int | None = None) -> list[torch.Tensor]:
    """One transformer layer on every local rank; ``layer`` (0-based) selects its attention mask."""
    g, sem = run.group, run.sem
    mask = run.mask_for(layer)
    n1 = [_norm(run, x, st, "input_layernorm") for x, st in zip(xs, states)]
    if sem.gpt_j_residual:
        n2 = n1 if sem.gpt_j_tied else [_norm(run, x, st, "post_attention_layernorm") for x, st in zip(xs, states)]
        a_in, m_in = g.copy_to_ranks(n1), g.copy_to_ranks(n2)
        parts = []
        for a, m, st in zip(a_in, m_in, states):
            attn = _with_bias(_attention_partial(run, a, st, mask), st.get("attention.dense.bias"))
            mlp, mlp_bias = _mlp_partial(run, m, st)
            parts.append(attn + _with_bias(mlp, mlp_bias))
        return [x + y for x, y in zip(xs, g.all_reduce_sum(parts))]
    a_in = g.copy_to_ranks(n1)
    attn = g.all_reduce_sum([_attention_partial(run, a, st, mask) for a, st in zip(a_in, states)])
    hs = [x + _with_bias(y, st.get("attention.dense.bias")) for x, y, st in zip(xs, attn, states)]
    m_in = g.copy_to_ranks([_norm(run, h, st, "post_attention_layernorm") for h, st in zip(hs, states)])
    mlp_out = [_mlp_partial(run, m, st) for m, st in zip(m_in, states)]
    ys = g.all_reduce_sum([y for y, _ in mlp_out])
    return [h + _with_bias(y, b) for h, y, (_, b) in zip(hs, ys, mlp_out)]


def _logits(run: _Run, xs: list[torch.Tensor], norm_states: RankStates, head_states: RankStates) -> torch.Tensor:
    normed = run.group.copy_to_ranks([_norm(run, x, st, "norm") for x, st in zip(xs, norm_states)])
    name = "word_embeddings.weight" if run.sem.tied_embeddings else "final_linear.weight"
    parts = [F.linear(h, _req(st, name)) for h, st in zip(normed, head_states)]
    return run.group.all_gather_cat(parts, dim=-1).float()


def _check_keys(states: RankStates, spec_idx: int) -> None:
    known_prefixes = ("input_layernorm.", "post_attention_layernorm.", "attention.query_key_value.",
                      "attention.dense.", "mlp.")
    for st in states:
        bad = [k for k in st if not k.startswith(known_prefixes) and not k.endswith(_IGNORED_SUFFIXES)]
        if bad:
            raise UnsupportedNeoxFeature(f"spec index {spec_idx}: tensors the reference cannot use: {bad}")


# --------------------------------------------------------------------------------------------
# Driver shared by the streaming function and the nn.Module
# --------------------------------------------------------------------------------------------

Fetch = Callable[[int], RankStates]


def _forward(
    group: RankGroup,
    sem: NeoxSemantics,
    num_layers: int,
    tokens: torch.Tensor,
    fetch: Fetch,
    dtype: torch.dtype | None,
    opts: ReferenceOptions,
) -> torch.Tensor:
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    sem.validate_tp(group.tp)
    idx = spec_indices(num_layers, sem.tied_embeddings)
    tokens = tokens.to(group.device)

    emb_states = fetch(idx["embed"])
    emb_w = emb_states[0]["word_embeddings.weight"]
    dtype = dtype or emb_w.dtype
    hidden = emb_w.shape[1]
    if sem.hidden_size is not None and sem.hidden_size != hidden:
        raise NeoxconvError(f"config hidden_size {sem.hidden_size} != embedding width {hidden}")
    head_dim = sem.head_dim(hidden)
    cos, sin = ops.rotary_cos_sin(tokens.shape[1], sem.rotary_dims(head_dim), sem.rotary_base, dtype, group.device)
    masks: dict[int | None, torch.Tensor] = {}

    def mask_of(window: int | None) -> torch.Tensor:
        if window not in masks:
            masks[window] = ops.causal_mask(tokens.shape[1], window, opts.sliding_window_convention, group.device)
        return masks[window]

    layer_masks = tuple(mask_of(sem.layer_window(i)) for i in range(num_layers)) if sem.layer_windows else ()
    run = _Run(group, sem, dtype, head_dim, cos, sin, mask_of(sem.sliding_window), opts, layer_masks)

    xs = _embed(run, tokens, emb_states)
    for layer, spec_idx in enumerate(idx["layers"]):
        states = fetch(spec_idx)
        _check_keys(states, spec_idx)
        xs = _layer(run, xs, states, layer)
    head_states = emb_states if sem.tied_embeddings else fetch(idx["head"])
    return _logits(run, xs, fetch(idx["final_norm"]), head_states)


_NORM_PREFIXES = ("input_layernorm.", "post_attention_layernorm.", "norm.")
_ROW_BIASES = ("attention.dense.bias", "mlp.linear2.bias", "mlp.dense_4h_to_h.bias")


def _replicated(
    group: RankGroup,
    sem: NeoxSemantics,
    opts: ReferenceOptions,
    states: RankStates,
    stored: Mapping[str, torch.dtype] | None = None,
) -> RankStates:
    """``replicated="mean"``: replace what an export merges by exactly what it holds.

    * replicated tensors (norms; row biases unless gpt_j_residual): the mean of the rank copies;
    * gpt_j_residual row biases (per-rank parts of one bias, T5): their total, held by rank 0
      (the other ranks get zeros, so the all-reduce adds it once).

    Both are computed in float64 (across ranks: a float64 all-reduce) and rounded once to the
    STORED dtype (``stored[name]``, default the tensor's own dtype), as ``reshard.merge`` does,
    then cast to the tensors' (compute) dtype. ``"own"``: ``states`` unchanged.
    """
    if opts.replicated == "own":
        return states
    stored = stored or {}
    means = [k for k in states[0] if k.startswith(_NORM_PREFIXES) or (k in _ROW_BIASES and not sem.gpt_j_residual)]
    sums = [k for k in states[0] if k in _ROW_BIASES and sem.gpt_j_residual]
    out = [dict(st) for st in states]
    for k in means + sums:
        like = states[0][k]
        total = group.all_reduce_sum([st[k].double() for st in states])[0]
        merged = total / group.tp if k in means else total
        merged = merged.to(stored.get(k, like.dtype)).to(like.dtype)
        for r, st in zip(group.local_ranks, out):
            st[k] = merged if k in means or r == 0 else torch.zeros_like(like)
    return out


def _select_local(group: RankGroup, states: RankStates, tp: int, spec_idx: int) -> RankStates:
    if len(states) != tp:
        raise NeoxconvError(f"spec index {spec_idx}: {len(states)} rank files, expected tp={tp} (T4)")
    return [states[r] for r in group.local_ranks]


def _cast(states: RankStates, dtype: torch.dtype | None, device: torch.device) -> RankStates:
    return [
        {k: (v.to(device=device, dtype=dtype) if dtype is not None and v.is_floating_point() else v.to(device))
         for k, v in st.items()}
        for st in states
    ]


def _default_group(source: NeoxShardSource, group: RankGroup | None) -> RankGroup:
    group = group or SimulatedGroup(source.tp)
    if group.tp != source.tp:
        raise NeoxconvError(f"rank group has tp={group.tp} but the checkpoint has tp={source.tp}")
    return group


def neox_reference_logits(
    source: NeoxShardSource,
    tokens: torch.Tensor,
    *,
    group: RankGroup | None = None,
    dtype: torch.dtype | None = None,
    options: ReferenceOptions | None = None,
    **option_kwargs: str,
) -> torch.Tensor:
    """Logits [b, s, V_pad] (fp32) of the NeoX checkpoint ``source`` for ``tokens`` [b, s].

    Streams one pipeline spec index at a time (peak memory ≈ one layer on all local ranks).
    ``dtype``: compute dtype; default the stored dtype (upcasting fp16/bf16 weights to fp32 is
    exact and gives the tightest parity). ``group``: default a :class:`SimulatedGroup` over all
    ``source.tp`` ranks. ``options`` or keyword arguments (``sliding_window_convention``,
    ``rmsnorm_style``, ``replicated``): see :class:`ReferenceOptions`.
    """
    opts = options or ReferenceOptions(**option_kwargs)
    group = _default_group(source, group)
    sem = NeoxSemantics.from_args(source.args, source.qkv_layout, source.num_layers)

    def fetch(spec_idx: int) -> RankStates:
        local = _select_local(group, source.rank_states(spec_idx), source.tp, spec_idx)
        # merged values (replicated="mean") are rounded to the stored dtype before the cast
        local = _replicated(group, sem, opts, _cast(local, None, group.device))
        return _cast(local, dtype, group.device)

    with torch.no_grad():
        return _forward(group, sem, source.num_layers, tokens, fetch, dtype, opts)


# --------------------------------------------------------------------------------------------
# nn.Module holding the per-rank tensors as parameters (for training steps)
# --------------------------------------------------------------------------------------------


def _param_key(name: str) -> str:
    return name.replace(".", "__")


def _neox_name(key: str) -> str:
    return key.replace("__", ".")


class NeoxReferenceModel(nn.Module):
    """The same forward, holding every local rank's stored tensors as ``nn.Parameter`` s.

    Parameters keep their NeoX names per (spec index, rank): see :meth:`rank_state`. With
    ``requires_grad=True`` a backward pass gives Megatron-exact gradients in both backends
    (see :mod:`.ranks`), so a TP training step can be built on it.
    """

    def __init__(
        self,
        source: NeoxShardSource,
        *,
        group: RankGroup | None = None,
        dtype: torch.dtype | None = None,
        requires_grad: bool = False,
        options: ReferenceOptions | None = None,
        **option_kwargs: str,
    ):
        super().__init__()
        self.group = _default_group(source, group)
        self.semantics = NeoxSemantics.from_args(source.args, source.qkv_layout, source.num_layers)
        self.semantics.validate_tp(self.group.tp)
        self.num_layers = source.num_layers
        self.options = options or ReferenceOptions(**option_kwargs)
        idx = spec_indices(source.num_layers, self.semantics.tied_embeddings)
        wanted = [idx["embed"], *idx["layers"], idx["final_norm"]]
        if not self.semantics.tied_embeddings:
            wanted.append(idx["head"])
        self.spec_idx = tuple(wanted)
        self.slots = nn.ModuleDict()
        self._stored_dtypes: dict[int, dict[str, torch.dtype]] = {}
        for spec_idx in wanted:
            local = _select_local(self.group, source.rank_states(spec_idx), source.tp, spec_idx)
            self._stored_dtypes[spec_idx] = {k: v.dtype for k, v in local[0].items()}
            for r, st in zip(self.group.local_ranks, _cast(local, dtype, self.group.device)):
                grad = requires_grad
                self.slots[f"s{spec_idx}_r{r}"] = nn.ParameterDict(
                    {
                        _param_key(k): nn.Parameter(v.detach().clone(), requires_grad=grad and v.is_floating_point())
                        for k, v in st.items()
                    }
                )
        self.dtype = dtype

    def rank_state(self, spec_idx: int, rank: int) -> dict[str, torch.Tensor]:
        """The parameters of one (spec index, rank) under their NeoX names."""
        slot = self.slots[f"s{spec_idx}_r{rank}"]
        return {_neox_name(k): v for k, v in slot.items()}

    def _fetch(self, spec_idx: int) -> RankStates:
        return [self.rank_state(spec_idx, r) for r in self.group.local_ranks]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full padded-vocab logits [b, s, V_pad] in fp32 (replicated on every rank)."""
        def fetch(spec_idx: int) -> RankStates:
            return _replicated(self.group, self.semantics, self.options, self._fetch(spec_idx),
                               self._stored_dtypes.get(spec_idx))

        return _forward(self.group, self.semantics, self.num_layers, tokens, fetch, self.dtype, self.options)
