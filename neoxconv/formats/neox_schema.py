"""NeoX stored names per schema, and how one rank's stored tensors hold canonical ones.

Per transformer layer (neox-formats.md §2.1; docs/custom-export.md §2.3), one TP rank stores:

| canonical (layers.{i}.) | current schema                   | legacy schema                 | legacy, gated MLP   |
|-------------------------|----------------------------------|-------------------------------|---------------------|
| attn_norm               | input_layernorm.* (n)            | same                          | same                |
| mlp_norm                | post_attention_layernorm.* (n)   | same                          | same                |
| attn.q, attn.k, attn.v  | attention.query_key_value.* (1)  | same                          | same                |
| attn.qk_norm            | attention.qk_layernorm.* (n, 4)  | -                             | -                   |
| (rotary buffer)         | -                                | attention.rotary_emb.inv_freq | same                |
| attn.o                  | attention.dense.*                | same                          | same                |
| mlp.up (+ mlp.gate)     | mlp.linear1.* (2)                | mlp.dense_h_to_4h.*           | mlp.w3 / mlp.w1 (3) |
| mlp.down                | mlp.linear2.*                    | mlp.dense_4h_to_h.*           | mlp.w2              |

(n) by norm: LayerNorm `weight`, `bias`; RMSNorm `scale`; ScaleNorm `g` [1] (canonical `weight`);
non-parametric LayerNorm nothing. (1) fused per rank in the checkpoint's QKV layout
(roles.FusedQKV); (2) gated: [up_r ; gate_r] per rank (roles.GATED_MLP); (3) up and gate, no
biases; (4) [heads/TP, head_dim] per rank, ScaleNorm one gain per rank (roles.RANK_SHARED_GAIN).
Spec index 0 stores `word_embeddings.weight` (+ `position_embeddings.weight` for learned
positions), L+3 `norm.*`, L+4 `final_linear.weight` (untied models).

Buffers NeoX saves (persistent, so NeoX's strict load needs them) that hold no weights: they are
recomputed from the config on write (`buffers`) and dropped on read after neox_spec checked them:
the legacy rotary `inv_freq`, ALiBi `attention.alibi_embed.slopes` (each rank its heads' slopes),
sinusoidal `position_embeddings.inv_freq` and the block layout `attention.sparse_attn.master_layout`
of local layers.

These tables name tensors and declare NeoX's own fusings; the TP role of every other tensor is
the one the model's family declares (archs/), bound by `NeoxNames.of`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from neoxconv import archs
from neoxconv.errors import NeoxconvError
from neoxconv.roles import GATED_MLP, RANK_SHARED_GAIN, Context, FusedQKV, Role
from neoxconv.table import Entry, merge_group, with_roles

ROTARY_BUFFER = "attention.rotary_emb.inv_freq"
ALIBI_BUFFER = "attention.alibi_embed.slopes"
LOCAL_LAYOUT = "attention.sparse_attn.master_layout"
SINUSOIDAL_BUFFER = "position_embeddings.inv_freq"
BUFFERS = (ROTARY_BUFFER, ALIBI_BUFFER, LOCAL_LAYOUT, SINUSOIDAL_BUFFER)

# The order a layer's canonical tensors are handed out in. It is the tensor order of HF exports
# (kept from 0.1.0: changing it changes exported files, not numbers).
LAYER_ORDER = ("attn_norm.weight", "attn_norm.bias", "mlp_norm.weight", "mlp_norm.bias",
               "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
               "attn.q.bias", "attn.k.bias", "attn.v.bias", "attn.o.bias", "attn.qk_norm.weight", "attn.qk_norm.bias",
               "mlp.up.weight", "mlp.gate.weight", "mlp.down.weight", "mlp.up.bias", "mlp.gate.bias", "mlp.down.bias")

# The MLP per (schema, gated): stored name -> canonical leaves it holds (two: gated, fused).
MLP = {
    ("current", False): {"mlp.linear1": ("mlp.up",), "mlp.linear2": ("mlp.down",)},
    ("current", True): {"mlp.linear1": ("mlp.up", "mlp.gate"), "mlp.linear2": ("mlp.down",)},
    ("legacy", False): {"mlp.dense_h_to_4h": ("mlp.up",), "mlp.dense_4h_to_h": ("mlp.down",)},
    ("legacy", True): {"mlp.w3": ("mlp.up",), "mlp.w1": ("mlp.gate",), "mlp.w2": ("mlp.down",)},
}


def holds_no_weights(stored: str) -> bool:
    """Buffers (recomputed from the config) and Transformer Engine state."""
    return stored in BUFFERS or stored.endswith("._extra_state")


def _norm(stored: str, canonical: str, norm: str) -> list[Entry]:
    if norm == "rmsnorm":  # RMSNorm has no bias and calls its weight `scale`
        return [Entry(f"{stored}.scale", (f"{canonical}.weight",))]
    if norm == "scalenorm":  # one gain g [1]
        return [Entry(f"{stored}.g", (f"{canonical}.weight",))]
    if norm == "non_parametric_layernorm":
        return []
    return [Entry(f"{stored}.{p}", (f"{canonical}.{p}",)) for p in ("weight", "bias")]


def _qk_norm(norm: str) -> list[Entry]:
    rows = _norm("attention.qk_layernorm", "layers.{i}.attn.qk_norm", norm)
    # ScaleNorm's g is one value per rank for that rank's heads; canonically one per head.
    return [Entry(e.name, e.canonical, RANK_SHARED_GAIN) for e in rows] if norm == "scalenorm" else rows


def _linear(stored: str, canonical: tuple[str, ...], fused: Role | None = None) -> list[Entry]:
    """Weight and bias of a linear layer of layer {i}; `fused` when it holds several tensors."""
    return [Entry(f"{stored}.{p}", tuple(f"layers.{{i}}.{c}.{p}" for c in canonical), fused)
            for p in ("weight", "bias")]


def layer_entries(spec, schema: str, qkv_layout: str, local: bool = False) -> list[Entry]:
    """One rank's stored tensors of layer {i} (roles of single tensors unbound). `spec` needs
    norm, gated, qk_norm and position (a ModelSpec or any object with those); `local`: the layer
    has block-sparse local attention."""
    out = _norm("input_layernorm", "layers.{i}.attn_norm", spec.norm)
    out += _norm("post_attention_layernorm", "layers.{i}.mlp_norm", spec.norm)
    out += _linear("attention.query_key_value", ("attn.q", "attn.k", "attn.v"), FusedQKV(layout=qkv_layout))
    if spec.qk_norm:
        out += _qk_norm(spec.norm)
    if schema == "legacy":
        out.append(Entry(ROTARY_BUFFER, ()))
    if spec.position == "alibi":
        out.append(Entry(ALIBI_BUFFER, ()))
    if local:
        out.append(Entry(LOCAL_LAYOUT, ()))
    out += _linear("attention.dense", ("attn.o",))
    for stored, canonical in MLP[(schema, spec.gated)].items():
        out += _linear(stored, canonical, GATED_MLP if len(canonical) > 1 else None)
    return out


def embed_entries(spec) -> list[Entry]:
    out = [Entry("word_embeddings.weight", ("embed.weight",))]
    if spec.position == "learned":  # a plain nn.Embedding, the same on every rank
        out.append(Entry("position_embeddings.weight", ("embed.positions.weight",)))
    if spec.position == "sinusoidal":
        out.append(Entry(SINUSOIDAL_BUFFER, ()))
    return out


def check_buildable(spec, schema: str) -> None:
    """Refuse a model NeoX cannot build (it would fail at start-up or compute something else).
    The legacy names (NeoX before 2024-09) are written for the models neoxconv 0.1 knew."""
    if spec.local_layers and spec.gqa:
        raise NeoxconvError("NeoX has no grouped-query attention on sparse (local) layers (transformer.py asserts it)")
    if spec.local_layers and spec.max_positions % spec.local_block:
        raise NeoxconvError(f"local attention needs seq_length {spec.max_positions} to be a multiple of its block size "
                            f"{spec.local_block} (DeepSpeed's sparse layout)")
    flash = "flash" in spec.attention_types
    if spec.qk_norm and spec.gqa and flash and spec.norm in ("layernorm", "non_parametric_layernorm"):
        # flash layers do not repeat K to the query heads before the QK-norm of shape [heads/TP, d]
        raise NeoxconvError(f"NeoX fails on QK {spec.norm} with grouped-query attention on flash layers")
    if schema != "legacy":
        return
    features = [what for what, used in (
        (f"{spec.norm}", spec.norm not in ("layernorm", "rmsnorm")),
        (f"the {spec.activation} activation", spec.activation not in ("gelu", "gelu_tanh", "relu", "swiglu")),
        (f"{spec.position} positions", spec.position != "rotary"), ("QK-norm", spec.qk_norm),
        ("local attention", bool(spec.local_layers)), ("gpt_j_tied", spec.parallel_norms_tied)) if used]
    if features:
        raise NeoxconvError(f"the legacy NeoX schema is written for rotary LayerNorm/RMSNorm models with GELU, ReLU "
                            f"or SwiGLU only; this model has {', '.join(features)}: use --neox-schema current")


@dataclass(frozen=True)
class NeoxNames:
    """The stored tensors of one NeoX checkpoint per spec index, with the family's roles bound."""

    embed: list[Entry]
    layer: list[Entry]  # names of layer {i}
    final: list[Entry]
    head: list[Entry]
    local_layer: list[Entry]  # names of a layer {i} with local attention
    local_layers: frozenset[int] = frozenset()

    @classmethod
    def of(cls, spec, schema: str, qkv_layout: str) -> "NeoxNames":
        check_buildable(spec, schema)

        def bind(rows: list[Entry]) -> list[Entry]:
            return with_roles(rows, lambda c: archs.role_of(c, spec.family),
                              f"{spec.family} model in NeoX {schema} names")

        return cls(embed=bind(embed_entries(spec)),
                   layer=bind(layer_entries(spec, schema, qkv_layout)),
                   final=bind(_norm("norm", "final_norm", spec.norm)),
                   head=bind([Entry("final_linear.weight", ("lm_head.weight",))]),
                   local_layer=bind(layer_entries(spec, schema, qkv_layout, local=True)),
                   local_layers=frozenset(spec.local_layers))

    def layer_at(self, i: int) -> list[Entry]:
        return [e.at(i) for e in (self.local_layer if i in self.local_layers else self.layer)]


# ---------------------------------------------------------------------------------------------
# buffers, computed as NeoX does (docs/custom-export.md §3.1, §3.3)


def rotary_inv_freq(spec, dtype: torch.dtype) -> torch.Tensor:
    """NeoX's rotary buffer 1/base^(2i/r), computed in fp32, then cast (§4.4)."""
    r = spec.rotary_dims
    return (1.0 / (spec.rotary_base ** (torch.arange(0, r, 2, dtype=torch.float32) / r))).to(dtype)


def sinusoidal_inv_freq(hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """SinusoidalPositionalEmbedding's buffer 1/10000^(2i/h), fp32, cast with the model."""
    return (1.0 / (10000 ** (torch.arange(0, hidden, 2).float() / hidden))).to(dtype)


def alibi_slopes(n: int) -> list[float]:
    """AliBi._get_slopes: 2^(-8i/n) for a power of two n, else the closest lower power's slopes
    followed by every other slope of twice that many, first n - p of them."""
    if math.log2(n).is_integer():
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]
    p = 2 ** math.floor(math.log2(n))
    return alibi_slopes(p) + alibi_slopes(2 * p)[0::2][: n - p]


def alibi_rank_slopes(heads: int, tp: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """The persistent `slopes` buffer of TP rank `rank`: its heads' slopes (fp32, cast with the model)."""
    per = heads // tp
    return torch.tensor(alibi_slopes(heads), dtype=torch.float32)[rank * per:(rank + 1) * per].to(dtype)


def local_layout(heads_per_rank: int, blocks: int, window_blocks: int) -> torch.Tensor:
    """DeepSpeed LocalSlidingWindowSparsityConfig(attention="unidirectional").make_layout: query
    block r attends key blocks max(0, r - window_blocks // 2) .. r, the same for every head."""
    row = torch.arange(blocks)[:, None]
    col = torch.arange(blocks)[None, :]
    one = ((col <= row) & (col >= row - window_blocks // 2)).to(torch.int64)
    return one.expand(heads_per_rank, blocks, blocks).clone()


def buffers(spec, schema: str, tp: int, dtype: torch.dtype, group) -> dict[str, list[torch.Tensor]] | None:
    """The buffers TP ranks 0..tp-1 store in `group` ("embed", a layer index, "final")."""
    out: dict[str, list[torch.Tensor]] = {}
    if group == "embed" and spec.position == "sinusoidal":
        out[SINUSOIDAL_BUFFER] = [sinusoidal_inv_freq(spec.hidden, dtype)] * tp
    if isinstance(group, int):
        if schema == "legacy":
            out[ROTARY_BUFFER] = [rotary_inv_freq(spec, dtype)] * tp
        if spec.position == "alibi":
            out[ALIBI_BUFFER] = [alibi_rank_slopes(spec.heads, tp, r, dtype) for r in range(tp)]
        if group in spec.local_layers:
            layout = local_layout(spec.heads // tp, spec.max_positions // spec.local_block, spec.local_blocks)
            out[LOCAL_LAYOUT] = [layout] * tp
    return out or None


def rank_to_layer(spec, stored: dict, tp: int, schema: str, qkv_layout: str) -> dict:
    """One rank's canonical pieces of a layer (leaf names, not merged over ranks).

    `spec` needs what layer_entries needs, heads and kv_heads (a ModelSpec or any object with
    those). Used by train-check, which gathers gradients rank by rank; reading and writing go
    through roles over all ranks at once (table.merge_group / split_group).
    """
    rows = [e.at(0) for e in layer_entries(spec, schema, qkv_layout)]
    # One rank holds heads/tp heads, each tensor whole: every role's merge of one part.
    rows = with_roles(rows, archs.role_of, f"NeoX {schema} schema")
    ctx = Context(heads=spec.heads // tp, kv_heads=spec.kv_heads // tp)
    pieces = {k.removeprefix("layers.0."): v for k, v in merge_group(rows, [stored], ctx).items()}
    return in_layer_order(pieces)


def in_layer_order(pieces: dict) -> dict:
    """A layer's canonical tensors (leaf names) in LAYER_ORDER; leaves it does not list go last."""
    rank = {leaf: n for n, leaf in enumerate(LAYER_ORDER)}
    return dict(sorted(pieces.items(), key=lambda kv: rank.get(kv[0], len(rank))))
