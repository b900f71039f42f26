"""GPTNeoX (GPT-NeoX-20B, Pythia): HF GPTNeoXForCausalLM <-> canonical.

Activation: NeoX `gelu` is exact erf GELU unless `bias_gelu_fusion: true`, which computes the
tanh approximation x*0.5*(1+tanh(0.79788456*x*(1+0.044715*x^2))) (activations.py). HF's
`gelu_fast` is that same formula (0.7978845608), so tanh-GELU models export as `gelu_fast`;
exact ones as `gelu`. Reading HF, `gelu_new`, `gelu_fast` and `gelu_pytorch_tanh` all mean tanh.

HF GPTNeoX always has MLP biases; a NeoX model without them exports zero biases (same numerics).
"""

from __future__ import annotations

from neoxconv.archs.base import Arch, first, rope_fields
from neoxconv.errors import NeoxconvError
from neoxconv.roles import COLUMN, REPLICATED, ROW, ROW_BIAS, VOCAB, FusedQKV
from neoxconv.spec import ModelSpec
from neoxconv.table import entries
from neoxconv.window import way_out

L = "gpt_neox.layers.{i}."  # HF prefix of layer i (canonical: "layers.{i}.")
# Q, K and V in one tensor, per head [q_h; k_h; v_h] (neox-formats.md §4.1)
QKV = FusedQKV(layout="mha_interleaved")

TENSORS = entries(
    # HF name                                canonical name                     TP role
    ("gpt_neox.embed_in.weight",             "embed.weight",                    VOCAB),
    (L + "input_layernorm.weight",           "layers.{i}.attn_norm.weight",     REPLICATED),
    (L + "input_layernorm.bias",             "layers.{i}.attn_norm.bias",       REPLICATED),
    (L + "post_attention_layernorm.weight",  "layers.{i}.mlp_norm.weight",      REPLICATED),
    (L + "post_attention_layernorm.bias",    "layers.{i}.mlp_norm.bias",        REPLICATED),
    (L + "attention.query_key_value.weight", ("layers.{i}.attn.q.weight", "layers.{i}.attn.k.weight",
                                              "layers.{i}.attn.v.weight"),      QKV),
    (L + "attention.query_key_value.bias",   ("layers.{i}.attn.q.bias", "layers.{i}.attn.k.bias",
                                              "layers.{i}.attn.v.bias"),        QKV),
    (L + "attention.dense.weight",           "layers.{i}.attn.o.weight",        ROW),
    (L + "attention.dense.bias",             "layers.{i}.attn.o.bias",          ROW_BIAS),
    (L + "mlp.dense_h_to_4h.weight",         "layers.{i}.mlp.up.weight",        COLUMN),
    (L + "mlp.dense_h_to_4h.bias",           "layers.{i}.mlp.up.bias",          COLUMN),
    (L + "mlp.dense_4h_to_h.weight",         "layers.{i}.mlp.down.weight",      ROW),
    (L + "mlp.dense_4h_to_h.bias",           "layers.{i}.mlp.down.bias",        ROW_BIAS),
    ("gpt_neox.final_layer_norm.weight",     "final_norm.weight",               REPLICATED),
    ("gpt_neox.final_layer_norm.bias",       "final_norm.bias",                 REPLICATED),
    # transformers 4.x names the head embed_out, 5.x lm_head (both are read: read_aliases)
    ("embed_out.weight",                     "lm_head.weight",                  VOCAB),
)

HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_fast", "relu": "relu", "silu": "silu"}
FROM_HF_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu"}


def spec_from_config(cfg: dict, shapes: dict[str, tuple]) -> ModelSpec:
    act = cfg.get("hidden_act", "gelu")
    if act not in FROM_HF_ACT:
        raise NeoxconvError(f"config.json: unsupported hidden_act {act!r} for GPTNeoX")
    rope = rope_fields(cfg)
    vocab_rows, hidden = shapes["embed.weight"]
    layers = 1 + max(int(n.split(".")[1]) for n in shapes if n.startswith("layers."))
    return ModelSpec(
        family="gptneox",
        hidden=hidden,
        layers=layers,
        heads=cfg["num_attention_heads"],
        kv_heads=cfg["num_attention_heads"],
        intermediate=shapes["layers.0.mlp.up.weight"][0],
        vocab_rows=vocab_rows,
        vocab_size=vocab_rows,
        norm="layernorm",
        norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        activation=FROM_HF_ACT[act],
        # HF GPTNeoX defaults to 0.25 when the key is missing (T9).
        rotary_pct=float(first(rope, "partial_rotary_factor", default=first(cfg, "rotary_pct", "partial_rotary_factor", default=0.25))),
        rotary_base=float(first(rope, "rope_theta", default=first(cfg, "rotary_emb_base", "rope_theta", default=10000))),
        parallel_residual=bool(cfg.get("use_parallel_residual", True)),
        tied="lm_head.weight" not in shapes,
        attn_bias="layers.0.attn.q.bias" in shapes,
        mlp_bias=True,
        max_positions=int(cfg.get("max_position_embeddings", 2048)),
    )


def config_from_spec(spec: ModelSpec) -> dict:
    if spec.gated or spec.norm != "layernorm" or spec.gqa:
        raise NeoxconvError("HF GPTNeoX cannot hold a gated MLP, RMSNorm or grouped-query attention; export as llama")
    if spec.activation not in HF_ACT or spec.position != "rotary" or spec.qk_norm or spec.local_layers \
            or spec.parallel_norms_tied or (spec.parallel_residual and not spec.mlp_bias):
        raise NeoxconvError(f"HF GPTNeoX cannot hold this model ({spec.activation}, {spec.position} positions"
                            f"{', QK-norm' if spec.qk_norm else ''}{', local attention' if spec.local_layers else ''}"
                            f"{', gpt_j_tied' if spec.parallel_norms_tied else ''}); export as custom")
    if spec.sliding_window:
        raise NeoxconvError(way_out(spec, "GPTNeoX"))
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": spec.vocab_rows,
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "intermediate_size": spec.intermediate,
        "hidden_act": HF_ACT[spec.activation],
        "max_position_embeddings": spec.max_positions,
        "layer_norm_eps": spec.norm_eps,
        "use_parallel_residual": spec.parallel_residual,
        "tie_word_embeddings": spec.tied,
        "attention_bias": spec.attn_bias,
        # transformers 5 reads rope_parameters; 4.x reads the top-level keys (and would
        # silently fall back to rotary_pct 0.25 without them).
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rotary_base,
                            "partial_rotary_factor": spec.rotary_pct},
        "rotary_pct": spec.rotary_pct,
        "rotary_emb_base": spec.rotary_base,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }


ARCH = Arch(
    family="gptneox",
    architecture="GPTNeoXForCausalLM",
    model_type="gpt_neox",
    tensors=TENSORS,
    spec_from_config=spec_from_config,
    config_from_spec=config_from_spec,
    always_biased=("mlp.up", "mlp.down"),  # HF GPTNeoX always has MLP biases: zeros for a bias-free model
    read_aliases={"lm_head.weight": "embed_out.weight"},
    ignored=(r".*\.rotary_emb\.inv_freq", r".*\.attention\.(masked_)?bias"),
    hf_activations=FROM_HF_ACT,
)
