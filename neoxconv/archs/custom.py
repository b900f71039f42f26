"""Custom: every dense GPT-NeoX model, as a Hugging Face model with its own code (neoxconv/custom).

The HF side is `NeoXCustomForCausalLM` (model_type `neox_custom`), whose config.json names every
NeoX feature explicitly (docs/custom-export.md §2.2) and whose tensors are unfused and TP-merged
under the names of `custom.export.HF_NAMES`. A NeoX checkpoint exports here when no stock class
computes it exactly (archs.family_for: no stock family's config_from_spec accepts it; the custom
package's own rule, `custom.export.stock_family`, agrees: tests/test_custom_export.py), or with
`--arch custom`.

Reading an export never executes its code: config.json is read as JSON.
"""

from __future__ import annotations

from neoxconv.archs.base import Arch
from neoxconv.custom.export import ARCHITECTURE, HF_NAMES, config_json
from neoxconv.errors import NeoxconvError
from neoxconv.roles import COLUMN, REPLICATED, ROW, ROW_BIAS, VOCAB
from neoxconv.spec import ModelSpec
from neoxconv.table import Entry

MODEL_TYPE = "neox_custom"

# The TP role of every canonical tensor (patterns of HF_NAMES' values: {p} = weight or bias).
ROLES = {
    "embed.weight": VOCAB,
    "embed.positions.weight": REPLICATED,  # a plain nn.Embedding on every rank (W 88-94)
    "layers.{i}.attn_norm.{p}": REPLICATED,
    "layers.{i}.mlp_norm.{p}": REPLICATED,
    "layers.{i}.attn.q.{p}": COLUMN,
    "layers.{i}.attn.k.{p}": COLUMN,
    "layers.{i}.attn.v.{p}": COLUMN,
    "layers.{i}.attn.o.weight": ROW,
    "layers.{i}.attn.o.bias": ROW_BIAS,
    # [heads, head_dim] (ScaleNorm: [heads], one gain per head): rank r holds its heads' rows
    "layers.{i}.attn.qk_norm.{p}": COLUMN,
    "layers.{i}.mlp.up.{p}": COLUMN,
    "layers.{i}.mlp.gate.{p}": COLUMN,
    "layers.{i}.mlp.down.weight": ROW,
    "layers.{i}.mlp.down.bias": ROW_BIAS,
    "final_norm.{p}": REPLICATED,
    "lm_head.weight": VOCAB,
}


def _table() -> tuple[Entry, ...]:
    rows = []
    for hf, canonical in HF_NAMES.items():
        for p in ("weight", "bias") if "{p}" in hf else ("",):
            name, canon = hf.replace("{p}", p), canonical.replace("{p}", p)
            rows.append(Entry(name, (canon,), ROLES[canon] if canon in ROLES else ROLES[canonical]))
    return tuple(rows)


TENSORS = _table()

# NeoX activation (spec name) <-> the custom config's activation and gelu_variant
GELU_VARIANTS = {"gelu": "erf", "gelu_tanh": "tanh", "gelu_onnx": "erf_onnx"}


def config_from_spec(spec: ModelSpec) -> dict:
    """config.json of the custom export (validated by the config class, with its auto_map)."""
    act, variant = ("gelu", GELU_VARIANTS[spec.activation]) if spec.activation in GELU_VARIANTS \
        else (spec.activation, "erf")
    return config_json({
        "vocab_size": spec.vocab_rows,
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "intermediate_size": spec.intermediate,
        "max_position_embeddings": spec.max_positions,
        "norm": spec.norm,
        "norm_eps": spec.norm_eps,
        "rmsnorm_eps_inside_sqrt": True,
        "position_embedding": spec.position,
        "rotary_pct": spec.rotary_pct,
        "rotary_base": spec.rotary_base,
        "position_embedding_offset": spec.position_offset,
        "position_embedding_multiplier": spec.position_multiplier,
        "activation": act,
        "gelu_variant": variant,
        "attention_bias": spec.attn_bias,
        "mlp_bias": spec.mlp_bias,
        "qk_norm": spec.qk_norm,
        "qk_norm_group_heads": spec.qk_norm_group,
        "attention_types": list(spec.attention_types),
        # NeoX W (a query sees itself and W earlier keys) = HF sliding_window W + 1
        "sliding_window_width": None if spec.sliding_window is None else spec.sliding_window - 1,
        "local_block_size": spec.local_block,
        "local_window_blocks": spec.local_blocks,
        "parallel_residual": spec.parallel_residual,
        "parallel_norms_tied": spec.parallel_norms_tied,
        "tie_word_embeddings": spec.tied,
        "architectures": [ARCHITECTURE],
    })


def spec_from_config(cfg: dict, shapes: dict[str, tuple]) -> ModelSpec:
    """ModelSpec from a custom export's config.json (read as JSON); sizes from the shapes (T10)."""
    from neoxconv.custom.export import custom_config

    where = "config.json"
    c = custom_config({k: v for k, v in cfg.items() if k not in ("auto_map", "architectures", "model_type")})
    if not c.rmsnorm_eps_inside_sqrt and c.norm == "rmsnorm":
        raise NeoxconvError(f"{where}: rmsnorm_eps_inside_sqrt false (NeoX's RMSNorm before 2025-05) has no NeoX "
                            "config key; neoxconv reads and writes the current RMSNorm only")
    vocab_rows, hidden = shapes["embed.weight"]
    d = hidden // c.num_attention_heads
    kv = shapes["layers.0.attn.k.weight"][0] // d
    if kv != c.num_key_value_heads:
        raise NeoxconvError(f"{where}: num_key_value_heads {c.num_key_value_heads} disagrees with k_proj's "
                            f"{shapes['layers.0.attn.k.weight'][0]} rows ({kv} KV heads of size {d})")
    activation = c.activation if c.activation != "gelu" else {v: k for k, v in GELU_VARIANTS.items()}[c.gelu_variant]
    window = c.sliding_window_width
    return ModelSpec(
        family="custom",
        hidden=hidden,
        layers=c.num_hidden_layers,
        heads=c.num_attention_heads,
        kv_heads=kv,
        intermediate=shapes["layers.0.mlp.up.weight"][0],
        vocab_rows=vocab_rows,
        vocab_size=vocab_rows,
        norm=c.norm,
        norm_eps=c.norm_eps,
        activation=activation,
        rotary_pct=c.rotary_pct,
        rotary_base=c.rotary_base,
        parallel_residual=c.parallel_residual,
        tied="lm_head.weight" not in shapes,
        attn_bias="layers.0.attn.q.bias" in shapes,
        mlp_bias="layers.0.mlp.up.bias" in shapes,
        max_positions=shapes.get("embed.positions.weight", (c.max_position_embeddings,))[0],
        sliding_window=None if window is None else window + 1,
        position=c.position_embedding,
        position_offset=c.position_embedding_offset,
        position_multiplier=c.position_embedding_multiplier,
        qk_norm=c.qk_norm,
        qk_norm_group=c.qk_norm_group_heads,
        attention_types=tuple(c.attention_types),
        local_block=c.local_block_size,
        local_blocks=c.local_window_blocks,
        parallel_norms_tied=c.parallel_norms_tied,
    )


ARCH = Arch(
    family="custom",
    architecture=ARCHITECTURE,
    model_type=MODEL_TYPE,
    tensors=TENSORS,
    spec_from_config=spec_from_config,
    config_from_spec=config_from_spec,
)
