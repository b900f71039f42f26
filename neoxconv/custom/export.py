"""The custom-code export: write the model's code and config into a Hugging Face directory.

``configuration_neox.py`` and ``modeling_neox.py`` in this package are templates copied verbatim
(byte for byte) into the export; ``config.json`` gets an ``auto_map`` pointing at them, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads the model. The weights
are written by the converter under the names of ``HF_NAMES``. The semantics of every config field
are specified in docs/custom-export.md.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

from neoxconv.errors import NeoxconvError

TEMPLATE_DIR = Path(__file__).parent
TEMPLATE_FILES = ("configuration_neox.py", "modeling_neox.py")
ARCHITECTURE = "NeoXCustomForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_neox.NeoXCustomConfig",
    "AutoModel": "modeling_neox.NeoXCustomModel",
    "AutoModelForCausalLM": "modeling_neox.NeoXCustomForCausalLM",
}

#: HF tensor name pattern -> neoxconv canonical name pattern ({i} layer, {p} weight/bias).
#: New canonical names (not in tensormap.py yet): embed.positions.weight, layers.{i}.attn.qk_norm.{p}.
#: Norm weights: ScaleNorm's single gain g is a ``weight`` of shape [1]; the non-parametric
#: LayerNorm has none.
HF_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.embed_positions.weight": "embed.positions.weight",
    "model.layers.{i}.input_layernorm.{p}": "layers.{i}.attn_norm.{p}",
    "model.layers.{i}.post_attention_layernorm.{p}": "layers.{i}.mlp_norm.{p}",
    "model.layers.{i}.self_attn.q_proj.{p}": "layers.{i}.attn.q.{p}",
    "model.layers.{i}.self_attn.k_proj.{p}": "layers.{i}.attn.k.{p}",
    "model.layers.{i}.self_attn.v_proj.{p}": "layers.{i}.attn.v.{p}",
    "model.layers.{i}.self_attn.o_proj.{p}": "layers.{i}.attn.o.{p}",
    "model.layers.{i}.self_attn.qk_norm.{p}": "layers.{i}.attn.qk_norm.{p}",
    "model.layers.{i}.mlp.up_proj.{p}": "layers.{i}.mlp.up.{p}",
    "model.layers.{i}.mlp.gate_proj.{p}": "layers.{i}.mlp.gate.{p}",
    "model.layers.{i}.mlp.down_proj.{p}": "layers.{i}.mlp.down.{p}",
    "model.norm.{p}": "final_norm.{p}",
    "lm_head.weight": "lm_head.weight",
}


def custom_config(config_dict: dict) -> NeoXCustomConfig:
    """The validated config; a bad value is a one-line NeoxconvError."""
    from neoxconv.custom.configuration_neox import NeoXCustomConfig  # transformers: imported when used

    try:
        return NeoXCustomConfig(**config_dict)
    except (ValueError, TypeError) as e:
        raise NeoxconvError(f"custom GPT-NeoX export: {e}") from None


def config_json(config_dict: dict) -> dict:
    """config.json's content: every NeoX field explicit (not only those that differ from the
    defaults), the HF fields that differ from theirs, and the auto_map."""
    cfg = custom_config({**config_dict, "auto_map": AUTO_MAP, "architectures": [ARCHITECTURE]})
    fields = [n for n in inspect.signature(type(cfg).__init__).parameters if n not in ("self", "kwargs")]
    content = {**cfg.to_diff_dict(), **{name: getattr(cfg, name) for name in fields}}
    return json.loads(json.dumps(content))


def write_custom_code(out_dir: str | Path, config_dict: dict) -> dict:
    """Copy the two template files into ``out_dir`` and write its config.json; returns the config.

    A later ``model.save_pretrained(out_dir)`` rewrites config.json from the model's config, which
    keeps the ``auto_map`` only if that config was built from this function's result."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config_json(config_dict)
    copy_code(out)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def copy_code(out_dir: str | Path) -> None:
    """The two code files, byte for byte (the converter writes config.json itself)."""
    for name in TEMPLATE_FILES:
        shutil.copyfile(TEMPLATE_DIR / name, Path(out_dir) / name)


def is_neoxconv_code(model_dir: str | Path) -> bool:
    """Whether a directory's code files are byte for byte the ones this neoxconv writes (so running
    them runs neoxconv's own code, not code from elsewhere)."""
    return all((Path(model_dir) / name).is_file()
               and (Path(model_dir) / name).read_bytes() == (TEMPLATE_DIR / name).read_bytes()
               for name in TEMPLATE_FILES)


#: NeoX activation (gelu by its variant) -> the HF ``hidden_act`` that computes it bit for bit in fp32.
#: GPTNeoX applies it to a plain MLP, Llama/Mistral to the gate of a gated MLP: act(gate) * up.
STOCK_HIDDEN_ACT = {
    # NeoX's swish is its own kernel x * sigmoid(x), not HF's silu op: the custom export keeps it
    "gptneox": {"gelu/erf": "gelu", "gelu/tanh": "gelu_fast", "relu": "relu", "silu": "silu"},
    "llama": {"swiglu": "silu", "geglu": "gelu", "reglu": "relu", "glu": "sigmoid", "bilinear": "linear"},
}


def stock_family(config_dict: dict) -> str | None:
    """The stock HF family that computes exactly this model ("gptneox", "llama", "mistral"), else None.

    Exact means the same formula per op (tested bit-exact in fp32 in tests/test_custom_model.py).
    HF GPTNeoX has no GQA, gated MLP or window; Llama/Mistral have no partial rotary, LayerNorm or
    parallel residual; Mistral has no biases; none has QK-norm, ALiBi, learned/sinusoidal
    positions, local attention, ScaleNorm, non-parametric LayerNorm or the pre-2025 RMSNorm.
    """
    c = custom_config(config_dict)
    if c.position_embedding != "rotary" or c.qk_norm or not set(c.attention_types) <= {"global", "flash"}:
        return None
    if c.norm == "layernorm":
        act = f"gelu/{c.gelu_variant}" if c.activation == "gelu" else c.activation
        # NeoX drops the attention output under gpt_j_residual without MLP biases; gpt_j_tied
        # keeps an unused norm that a stock model cannot carry back to NeoX.
        residual_ok = not c.parallel_residual or (c.mlp_bias and not c.parallel_norms_tied)
        exact = (act in STOCK_HIDDEN_ACT["gptneox"] and residual_ok and c.sliding_window_width is None
                 and c.num_key_value_heads == c.num_attention_heads)
        return "gptneox" if exact else None
    llama_like = (c.norm == "rmsnorm" and c.rmsnorm_eps_inside_sqrt and c.activation in STOCK_HIDDEN_ACT["llama"]
                  and c.rotary_pct == 1 and not c.parallel_residual)
    if not llama_like:
        return None
    if c.sliding_window_width is None:
        return "llama"
    return "mistral" if not (c.attention_bias or c.mlp_bias) else None


def neox_features(config_dict: dict) -> list[str]:
    """Human-readable list of the NeoX features this model uses (for the model card)."""
    c = custom_config(config_dict)
    norm = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm", "scalenorm": "ScaleNorm",
            "non_parametric_layernorm": "non-parametric LayerNorm"}[c.norm]
    if c.norm == "rmsnorm":
        norm += (" (eps inside the square root)" if c.rmsnorm_eps_inside_sqrt
                 else " (eps added to the RMS, NeoX before 2025-05)")
    pos = {"rotary": f"rotary on {c.rotary_dims} of {c.head_dim} dims per head (base {c.rotary_base:g})",
           "alibi": "ALiBi", "learned": f"learned position embeddings ({c.max_position_embeddings} rows)",
           "sinusoidal": "sinusoidal position embeddings", "none": "no position embeddings"}[c.position_embedding]
    act = c.activation
    if act == "gelu":
        act += {"erf": " (exact erf)", "tanh": " (tanh approximation, bias_gelu_fusion)",
                "erf_onnx": " (onnx_safe erf)"}[c.gelu_variant]
    heads = (f"multi-head attention, {c.num_attention_heads} heads" if c.num_key_value_heads == c.num_attention_heads
             else f"grouped-query attention, {c.num_attention_heads} query / {c.num_key_value_heads} key-value heads")
    features = [
        f"norm: {norm}, eps {c.norm_eps:g}",
        f"positions: {pos}",
        f"MLP: {act}{' (gated)' if c.gated else ''}, width {c.intermediate_size}",
        f"biases: attention {'yes' if c.attention_bias else 'no'}, MLP {'yes' if c.mlp_bias else 'no'}",
        "residual: " + ("sequential" if not c.parallel_residual else "parallel (GPT-J)"
                        + (", one norm shared (gpt_j_tied)" if c.parallel_norms_tied else ", two norms")),
        heads,
        f"word embeddings: {'tied to' if c.tie_word_embeddings else 'separate from'} the output layer",
    ]
    if c.parallel_residual and not c.mlp_bias:
        features.append("NeoX quirk kept: without MLP biases the GPT-J residual drops the attention output")
    if c.qk_norm:
        features.append(f"QK normalisation over {c.qk_norm_group_heads} head(s) x head_dim")
    counts = {kind: c.attention_types.count(kind) for kind in ("global", "flash", "local") if kind in c.attention_types}
    features.append("attention per layer: " + ", ".join(f"{k} x{n}" for k, n in counts.items()))
    if "local" in counts:
        features.append(f"local attention: blocks of {c.local_block_size}, this and the "
                        f"{c.local_window_blocks // 2} previous block(s)")
    if c.sliding_window_width is not None:
        features.append(f"sliding window: each token sees itself and {c.sliding_window_width} earlier tokens")
    return features


def model_card_section(config_dict: dict) -> str:
    """Markdown for the model card: how to load the custom code and what it implements."""
    from neoxconv.custom.configuration_neox import CUSTOM_CODE_VERSION

    lines = [
        "## Custom code",
        "",
        "No stock Hugging Face class computes this GPT-NeoX architecture, so the model ships its own code "
        f"(`configuration_neox.py`, `modeling_neox.py`, version {CUSTOM_CODE_VERSION}, written by neoxconv; "
        "torch and transformers only). Loading it runs that code, so it needs `trust_remote_code=True` "
        "(`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`; `AutoTokenizer` too, as "
        "transformers 5 reads config.json to find the tokenizer, which itself is a stock class). "
        "It supports `generate()` with a KV cache and padded batches.",
        "",
        "GPT-NeoX features it implements:",
        "",
    ]
    lines += [f"- {f}" for f in neox_features(config_dict)]
    return "\n".join(lines) + "\n"
