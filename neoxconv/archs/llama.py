"""Llama: HF LlamaForCausalLM <-> canonical.

RMSNorm (weight only), a gated MLP down(act(gate(x)) * up(x)) (SwiGLU: `hidden_act` silu; NeoX's
other gated activations as HF_ACT says), rotate-half rotary on the whole head (no permutation to or
from NeoX, §4.4), grouped-query attention through `num_key_value_heads`. Optional biases:
`attention_bias` (q, k, v and o) and `mlp_bias` (gate, up, down) -- read from the tensors present, written back as flags.

What neoxconv refuses instead of silently changing numerics:
- `head_dim` different from hidden_size / num_attention_heads (NeoX and the canonical form
  derive the head size from the hidden size);
- RoPE scaling (`rope_type` other than "default", e.g. Llama 3.1's "llama3"): NeoX has none;
- partial rotary and activations other than those of HF_ACT.

Config: transformers 5 nests the rotary base in `rope_parameters`; 4.x reads the top-level
`rope_theta`. Both are written so either version loads the same model.
"""

from __future__ import annotations

from neoxconv.archs.base import Arch, first, rope_fields
from neoxconv.errors import DamagedInput, NeoxconvError
from neoxconv.roles import COLUMN, REPLICATED, ROW, ROW_BIAS, VOCAB
from neoxconv.spec import ModelSpec
from neoxconv.table import entries
from neoxconv.window import way_out

L = "model.layers.{i}."  # HF prefix of layer i (canonical: "layers.{i}.")

TENSORS = entries(
    # HF name                                canonical name                  TP role
    ("model.embed_tokens.weight",            "embed.weight",                 VOCAB),
    (L + "input_layernorm.weight",           "layers.{i}.attn_norm.weight",  REPLICATED),
    (L + "self_attn.q_proj.weight",          "layers.{i}.attn.q.weight",     COLUMN),
    (L + "self_attn.q_proj.bias",            "layers.{i}.attn.q.bias",       COLUMN),
    (L + "self_attn.k_proj.weight",          "layers.{i}.attn.k.weight",     COLUMN),
    (L + "self_attn.k_proj.bias",            "layers.{i}.attn.k.bias",       COLUMN),
    (L + "self_attn.v_proj.weight",          "layers.{i}.attn.v.weight",     COLUMN),
    (L + "self_attn.v_proj.bias",            "layers.{i}.attn.v.bias",       COLUMN),
    (L + "self_attn.o_proj.weight",          "layers.{i}.attn.o.weight",     ROW),
    (L + "self_attn.o_proj.bias",            "layers.{i}.attn.o.bias",       ROW_BIAS),
    (L + "post_attention_layernorm.weight",  "layers.{i}.mlp_norm.weight",   REPLICATED),
    (L + "mlp.gate_proj.weight",             "layers.{i}.mlp.gate.weight",   COLUMN),
    (L + "mlp.gate_proj.bias",               "layers.{i}.mlp.gate.bias",     COLUMN),
    (L + "mlp.up_proj.weight",               "layers.{i}.mlp.up.weight",     COLUMN),
    (L + "mlp.up_proj.bias",                 "layers.{i}.mlp.up.bias",       COLUMN),
    (L + "mlp.down_proj.weight",             "layers.{i}.mlp.down.weight",   ROW),
    (L + "mlp.down_proj.bias",               "layers.{i}.mlp.down.bias",     ROW_BIAS),
    ("model.norm.weight",                    "final_norm.weight",            REPLICATED),
    ("lm_head.weight",                       "lm_head.weight",               VOCAB),  # absent when tied
)

# Old transformers saved the rotary buffer; it carries no weights.
IGNORED = (r".*\.rotary_emb\.inv_freq",)

# NeoX's gated activations -> the HF `hidden_act` applied to the gate (the same function bit for bit
# in fp32: tests/test_custom_model.py). NeoX geglu is exact erf GELU whatever bias_gelu_fusion says.
HF_ACT = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu", "glu": "sigmoid", "bilinear": "linear"}
FROM_HF_ACT = {hf: neox for neox, hf in HF_ACT.items()}

HF_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048}


def spec_from_config(cfg: dict, shapes: dict[str, tuple], family: str = "llama",
                     defaults: dict = HF_DEFAULTS, **extra) -> ModelSpec:
    """ModelSpec from a Llama-style config.json; sizes come from the tensor shapes (T10)."""
    where = "config.json"
    act = cfg.get("hidden_act", "silu")
    if act not in FROM_HF_ACT:
        raise NeoxconvError(f"{where}: hidden_act {act!r} is not supported for {family} (supported: "
                            f"{', '.join(FROM_HF_ACT)})")
    vocab_rows, hidden = shapes["embed.weight"]
    heads = int(cfg["num_attention_heads"])
    if hidden % heads:
        raise NeoxconvError(f"{where}: hidden_size {hidden} is not divisible by {heads} attention heads")
    d = hidden // heads
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) != d:
        raise NeoxconvError(f"{where}: head_dim {head_dim} differs from hidden_size/num_attention_heads = "
                            f"{d}; only models with head_dim == hidden/heads are supported")
    q_rows, k_rows = shapes["layers.0.attn.q.weight"][0], shapes["layers.0.attn.k.weight"][0]
    if q_rows != hidden or k_rows % d:  # the sizes are read from layer 0: its damage is named as such
        raise DamagedInput(f"{where}: layer 0's q_proj has {q_rows} rows and k_proj {k_rows}, which "
                           f"{heads} heads of size {d} cannot give (a damaged layer 0, or head_dim is not "
                           f"{hidden}/{heads})")
    # KV heads from the shapes (T10); the config must agree when it says (its default differs
    # between classes: Llama = heads, Mistral = 8).
    kv = k_rows // d
    if cfg.get("num_key_value_heads") is not None and int(cfg["num_key_value_heads"]) != kv:
        raise DamagedInput(f"{where}: num_key_value_heads {cfg['num_key_value_heads']} disagrees with layer 0's "
                           f"k_proj, {k_rows} rows ({kv} KV heads of size {d})")
    rope = rope_fields(cfg)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise NeoxconvError(f"{where}: RoPE scaling {rope_type!r} is not supported (GPT-NeoX has no RoPE scaling)")
    partial = float(first(rope, "partial_rotary_factor", default=cfg.get("partial_rotary_factor", 1.0)))
    if partial != 1.0:
        raise NeoxconvError(f"{where}: partial_rotary_factor {partial} is not supported for {family}")
    layers = 1 + max(int(n.split(".")[1]) for n in shapes if n.startswith("layers."))
    return ModelSpec(
        family=family,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv,
        intermediate=shapes["layers.0.mlp.up.weight"][0],
        vocab_rows=vocab_rows,
        vocab_size=vocab_rows,
        norm="rmsnorm",
        norm_eps=float(cfg.get("rms_norm_eps", defaults["rms_norm_eps"])),
        activation=FROM_HF_ACT[act],
        rotary_pct=1.0,
        rotary_base=float(first(rope, "rope_theta", default=first(cfg, "rope_theta", default=defaults["rope_theta"]))),
        parallel_residual=False,
        tied="lm_head.weight" not in shapes,
        attn_bias="layers.0.attn.q.bias" in shapes,
        mlp_bias="layers.0.mlp.up.bias" in shapes,
        max_positions=int(cfg.get("max_position_embeddings") or defaults["max_position_embeddings"]),
        **extra,
    )


def check_llama_like(spec: ModelSpec, family: str) -> None:
    """What any Llama-style HF class needs from the model."""
    if spec.norm != "rmsnorm" or spec.activation not in HF_ACT:
        raise NeoxconvError(f"HF {family} needs RMSNorm and a gated MLP (this model has {spec.norm} and "
                            f"{spec.activation}); export as gptneox or custom")
    if spec.position != "rotary" or spec.qk_norm or spec.local_layers:
        raise NeoxconvError(f"HF {family} has rotary positions, dense attention and no QK-norm; export as custom")
    if spec.rotary_pct != 1.0:
        raise NeoxconvError(f"HF {family} rotates the whole head; this model has rotary_pct {spec.rotary_pct}")
    if spec.parallel_residual:
        raise NeoxconvError(f"HF {family} has no parallel (GPT-J) residual; export as gptneox")


def config_from_spec(spec: ModelSpec) -> dict:
    check_llama_like(spec, "llama")
    if spec.sliding_window:
        raise NeoxconvError(way_out(spec, "Llama"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **common_config(spec),
        "attention_bias": spec.attn_bias,
        "mlp_bias": spec.mlp_bias,
        "pretraining_tp": 1,
    }


def common_config(spec: ModelSpec) -> dict:
    """Fields Llama and Mistral share."""
    return {
        "vocab_size": spec.vocab_rows,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": HF_ACT[spec.activation],
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": spec.norm_eps,
        "tie_word_embeddings": spec.tied,
        # transformers 5 reads rope_parameters, 4.x the top-level rope_theta: write both.
        "rope_theta": spec.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rotary_base},
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }


ARCH = Arch(
    family="llama",
    architecture="LlamaForCausalLM",
    model_type="llama",
    tensors=TENSORS,
    spec_from_config=spec_from_config,
    config_from_spec=config_from_spec,
    ignored=IGNORED,
    hf_activations=FROM_HF_ACT,
)
