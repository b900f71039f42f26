"""NeoX stored names per schema, and how one rank's stored tensors hold canonical ones.

Per transformer layer (neox-formats.md §2.1), one TP rank stores, in file order:

| canonical (layers.{i}.) | current schema                   | legacy schema                 | legacy, gated MLP   |
|-------------------------|----------------------------------|-------------------------------|---------------------|
| attn_norm               | input_layernorm.*                | same                          | same                |
| mlp_norm                | post_attention_layernorm.*       | same                          | same                |
| attn.q, attn.k, attn.v  | attention.query_key_value.* (1)  | same                          | same                |
| (rotary buffer)         | -                                | attention.rotary_emb.inv_freq | same                |
| attn.o                  | attention.dense.*                | same                          | same                |
| mlp.up (+ mlp.gate)     | mlp.linear1.* (2)                | mlp.dense_h_to_4h.*           | mlp.w3 / mlp.w1 (3) |
| mlp.down                | mlp.linear2.*                    | mlp.dense_4h_to_h.*           | mlp.w2              |

(1) fused per rank in the checkpoint's QKV layout (roles.FusedQKV); (2) gated: [up_r ; gate_r]
per rank (roles.GATED_MLP); (3) up and gate, no biases. Norms store `weight`/`bias` for
LayerNorm and `scale` for RMSNorm. Spec index 0 stores `word_embeddings.weight`, L+3 `norm.*`,
L+4 `final_linear.weight` (untied models).

These tables name tensors and declare NeoX's two fusings; the TP role of every other tensor is
the one the model's family declares (archs/), bound by `NeoxNames.of`.
"""

from __future__ import annotations

from dataclasses import dataclass

from neoxconv import archs
from neoxconv.roles import GATED_MLP, Context, FusedQKV, Role
from neoxconv.table import Entry, merge_group, with_roles

ROTARY_BUFFER = "attention.rotary_emb.inv_freq"

# The order a layer's canonical tensors are handed out in. It is the tensor order of HF exports
# (kept from 0.1.0: changing it changes exported files, not numbers).
LAYER_ORDER = ("attn_norm.weight", "attn_norm.bias", "mlp_norm.weight", "mlp_norm.bias",
               "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
               "attn.q.bias", "attn.k.bias", "attn.v.bias", "attn.o.bias",
               "mlp.up.weight", "mlp.gate.weight", "mlp.down.weight", "mlp.up.bias", "mlp.gate.bias", "mlp.down.bias")

# The MLP per (schema, gated): stored name -> canonical leaves it holds (two: gated, fused).
MLP = {
    ("current", False): {"mlp.linear1": ("mlp.up",), "mlp.linear2": ("mlp.down",)},
    ("current", True): {"mlp.linear1": ("mlp.up", "mlp.gate"), "mlp.linear2": ("mlp.down",)},
    ("legacy", False): {"mlp.dense_h_to_4h": ("mlp.up",), "mlp.dense_4h_to_h": ("mlp.down",)},
    ("legacy", True): {"mlp.w3": ("mlp.up",), "mlp.w1": ("mlp.gate",), "mlp.w2": ("mlp.down",)},
}


def holds_no_weights(stored: str) -> bool:
    """The rotary buffer (recomputed from the config) and Transformer Engine state."""
    return stored == ROTARY_BUFFER or stored.endswith("._extra_state")


def _norm(stored: str, canonical: str, norm: str) -> list[Entry]:
    if norm == "rmsnorm":  # RMSNorm has no bias and calls its weight `scale`
        return [Entry(f"{stored}.scale", (f"{canonical}.weight",))]
    return [Entry(f"{stored}.{p}", (f"{canonical}.{p}",)) for p in ("weight", "bias")]


def _linear(stored: str, canonical: tuple[str, ...], fused: Role | None = None) -> list[Entry]:
    """Weight and bias of a linear layer of layer {i}; `fused` when it holds several tensors."""
    return [Entry(f"{stored}.{p}", tuple(f"layers.{{i}}.{c}.{p}" for c in canonical), fused) for p in ("weight", "bias")]


def layer_entries(schema: str, gated: bool, norm: str, qkv_layout: str) -> list[Entry]:
    """One rank's stored tensors of layer {i}, in file order (roles of single tensors unbound)."""
    out = _norm("input_layernorm", "layers.{i}.attn_norm", norm) + _norm("post_attention_layernorm",
                                                                          "layers.{i}.mlp_norm", norm)
    out += _linear("attention.query_key_value", ("attn.q", "attn.k", "attn.v"), FusedQKV(layout=qkv_layout))
    if schema == "legacy":
        out.append(Entry(ROTARY_BUFFER, ()))
    out += _linear("attention.dense", ("attn.o",))
    for stored, canonical in MLP[(schema, gated)].items():
        out += _linear(stored, canonical, GATED_MLP if len(canonical) > 1 else None)
    return out


@dataclass(frozen=True)
class NeoxNames:
    """The stored tensors of one NeoX checkpoint per spec index, with the family's roles bound."""

    embed: list[Entry]
    layer: list[Entry]  # names of layer {i}
    final: list[Entry]
    head: list[Entry]

    @classmethod
    def of(cls, family: str, schema: str, gated: bool, norm: str, qkv_layout: str) -> "NeoxNames":
        def bind(rows: list[Entry]) -> list[Entry]:
            return with_roles(rows, lambda c: archs.role_of(c, family), f"{family} model in NeoX {schema} names")

        return cls(embed=bind([Entry("word_embeddings.weight", ("embed.weight",))]),
                   layer=bind(layer_entries(schema, gated, norm, qkv_layout)),
                   final=bind(_norm("norm", "final_norm", norm)),
                   head=bind([Entry("final_linear.weight", ("lm_head.weight",))]))

    def layer_at(self, i: int) -> list[Entry]:
        return [e.at(i) for e in self.layer]


def rank_to_layer(spec, stored: dict, tp: int, schema: str, qkv_layout: str) -> dict:
    """One rank's canonical pieces of a layer (leaf names, not merged over ranks).

    `spec` needs norm, heads, kv_heads and gated (a ModelSpec or any object with those). Used
    by train-check, which gathers gradients rank by rank; reading and writing go through
    roles over all ranks at once (table.merge_group / split_group).
    """
    rows = [e.at(0) for e in layer_entries(schema, spec.gated, spec.norm, qkv_layout)]
    # One rank holds heads/tp heads, each tensor whole: every role's merge of one part.
    rows = with_roles(rows, archs.role_of, f"NeoX {schema} schema")
    ctx = Context(heads=spec.heads // tp, kv_heads=spec.kv_heads // tp)
    pieces = {k.removeprefix("layers.0."): v for k, v in merge_group(rows, [stored], ctx).items()}
    return in_layer_order(pieces)


def in_layer_order(pieces: dict) -> dict:
    """A layer's canonical tensors (leaf names) in LAYER_ORDER; leaves it does not list go last."""
    rank = {leaf: n for n, leaf in enumerate(LAYER_ORDER)}
    return dict(sorted(pieces.items(), key=lambda kv: rank.get(kv[0], len(rank))))
