"""Writing a NeoX YAML config: one complete file that rebuilds a ModelSpec for finetuning.

The converter's side. Reading and merging the YAMLs stored beside a checkpoint is storage and
lives in `formats/neox_args.py` (used by `neox_files` and the independent reference).
"""

from __future__ import annotations

import yaml

from neoxconv import __version__
from neoxconv.spec import ModelSpec

# ModelSpec activation -> NeoX `activation` (GELU variants by bias_gelu_fusion / onnx_safe)
NEOX_ACTIVATION = {"gelu_tanh": "gelu", "gelu_onnx": "gelu"}
EPS_KEY = {"layernorm": "layernorm_epsilon", "non_parametric_layernorm": "layernorm_epsilon",
           "rmsnorm": "rms_norm_epsilon", "scalenorm": "scalenorm_epsilon"}


def attention_config(types: tuple[str, ...]) -> list:
    """NeoX's [[types], count] items for the per-layer types, consecutive equal types as one item."""
    out: list = []
    for t in types:
        if out and out[-1][0] == [t]:
            out[-1][1] += 1
        else:
            out.append([[t], 1])
    return out


# NeoX versions a legacy-schema YAML is meant for (gpt-neox git history). NeoX builds
# `NeoXArgs(**config)`, so a key that a version does not know is a TypeError at start-up.
LEGACY_FIRST = "299b68cd (2023-05-02, LLaMA support: mlp_type, use_bias_in_attn_linear)"
LEGACY_GQA_FIRST = "f36aed7f (2024-02-22: num_kv_heads, intermediate_size, sliding_window_width)"
LEGACY_SAVE_FREQS = "e109bf5e (2024-03-04: rotary_save_freqs_buffer, inv_freq no longer saved by default)"
LEGACY_LAST = "0d4bdb96^ (2024-09-07; 0d4bdb96 renamed the MLP, adbf5d6f added use_bias_in_mlp/mlp_multiple_of)"


def legacy_llama_ff(hidden: int, multiple_of: int = 256) -> int:
    """LLaMAParallelMLP's width when the YAML has no intermediate_size (NeoX 2023-05 .. 2024-09)."""
    ff = int(2 * hidden * 4 / 3)
    return multiple_of * ((ff + multiple_of - 1) // multiple_of)


def legacy_needs_2024_02(spec: ModelSpec) -> bool:
    """True when a legacy YAML needs keys that NeoX only has since f36aed7f (2024-02-22)."""
    return bool(spec.gqa or spec.sliding_window or (spec.gated and spec.intermediate != legacy_llama_ff(spec.hidden)))


def neox_yaml(spec: ModelSpec, *, tp: int, pp: int, layout: str, vocab_multiple: int, schema: str,
              dtype: str, extra: dict | None = None, source: str = "") -> str:
    """One complete NeoX YAML that rebuilds exactly these shapes and numerics for finetuning.

    ``schema="current"``: NeoX since adbf5d6f (2024-09-10; ``use_bias_in_mlp``,
    ``mlp_multiple_of``, ``intermediate_size`` meaning 3x the gated width), up to the present.

    ``schema="legacy"``: NeoX from 299b68cd (2023-05-02) up to 0d4bdb96^ (2024-09-07), the
    versions that use the names ``mlp.dense_h_to_4h`` / ``mlp.w1..w3`` and a persistent rotary
    ``inv_freq``. Only keys every NeoXArgs of that range accepts are written, except keys the
    model cannot do without:

    * ``num_kv_heads`` (GQA), ``sliding_window_width`` (Mistral) and ``intermediate_size`` (a
      gated MLP whose width is not LLaMAParallelMLP's default ``256*ceil(int(8h/3)/256)``) exist
      only since f36aed7f (2024-02-22); such a model cannot be built by older NeoX anyway, and
      the YAML header then names f36aed7f as the first version;
    * ``use_bias_in_mlp`` and ``mlp_multiple_of`` (adbf5d6f, 2024-09-10) are never written: the
      legacy classic MLP always has biases and is always 4h wide (``intermediate_size`` is
      ignored by it, so it is not written either), the legacy Llama MLP never has biases;
    * ``mlp_type: llama`` (a str field since 299b68cd, removed at adbf5d6f) selects the gated
      w1/w2/w3 MLP;
    * ``rotary_save_freqs_buffer`` (e109bf5e, 2024-03-04) is unknown before e109bf5e, but NeoX
      e109bf5e..0d4bdb96^ needs it set to true to load the stored ``inv_freq`` buffers (strict
      load). It is written as a commented-out line with that instruction.
    """
    legacy = schema == "legacy"
    cfg: dict = {
        "pipe_parallel_size": pp if layout == "pipeline" else 0,
        "model_parallel_size": tp,
        "num_layers": spec.layers,
        "hidden_size": spec.hidden,
        "num_attention_heads": spec.heads,
    }
    if spec.gqa:
        cfg["num_kv_heads"] = spec.kv_heads
    cfg.update({
        "seq_length": spec.max_positions,
        "max_position_embeddings": spec.max_positions,
        "pos_emb": spec.position,
        "rotary_pct": spec.rotary_pct,
        "rotary_emb_base": int(spec.rotary_base) if float(spec.rotary_base).is_integer() else spec.rotary_base,
        "norm": spec.norm,
    })
    if spec.position == "learned" and spec.position_offset:
        cfg["opt_pos_emb_offset"] = spec.position_offset
    if spec.position in ("learned", "sinusoidal") and spec.position_multiplier != 1.0:
        cfg["mup_rp_embedding_mult"] = spec.position_multiplier
    cfg[EPS_KEY[spec.norm]] = spec.norm_eps
    cfg.update({
        "gpt_j_residual": spec.parallel_residual,
        "gpt_j_tied": spec.parallel_norms_tied,
        "no_weight_tying": not spec.tied,
        "activation": NEOX_ACTIVATION.get(spec.activation, spec.activation),
        "bias_gelu_fusion": spec.activation == "gelu_tanh",
        "use_bias_in_attn_linear": spec.attn_bias,
    })
    if spec.activation == "gelu_onnx":
        cfg["onnx_safe"] = True
    if spec.qk_norm:
        cfg["use_qk_layernorm"] = True
        if spec.norm == "rmsnorm" and spec.qk_norm_group > 1:
            cfg["rmsnorm_fusion"] = True  # apex's RMSNorm normalises [heads per rank, head_dim] together
    if not legacy:
        cfg["use_bias_in_mlp"] = spec.mlp_bias
        # Current ParallelMLP: gated F1 = int(I*2/3), F2 = F1//2, rounded to mlp_multiple_of (§5.3).
        # I = 3*F gives F1 = 2F, F2 = F exactly with mlp_multiple_of 1.
        cfg["intermediate_size"] = 3 * spec.intermediate if spec.gated else spec.intermediate
        cfg["mlp_multiple_of"] = 1
    elif spec.gated:
        # Legacy LLaMAParallelMLP (w1/w2/w3): selected by mlp_type, gated by it, activation
        # named silu; intermediate_size is the HF value, needed only when it differs from the
        # class's default width (NeoX before 2024-09, §5.3).
        if spec.intermediate != legacy_llama_ff(spec.hidden):
            cfg["intermediate_size"] = spec.intermediate
        cfg["mlp_type"] = "llama"
        cfg["activation"] = "silu"
    cfg["make_vocab_size_divisible_by"] = vocab_multiple
    if spec.sliding_window:
        cfg["sliding_window_width"] = spec.sliding_window
    if set(spec.attention_types) != {"global"}:
        cfg["attention_config"] = attention_config(spec.attention_types)
    elif spec.sliding_window and spec.family != "custom":  # (a custom export records its layer types)
        cfg["attention_config"] = [[["flash"], spec.layers]]  # as NeoX's configs/mistral: flash computes SWA without a mask
    if spec.local_layers:
        cfg["sparsity_config"] = {"block": spec.local_block, "num_local_blocks": spec.local_blocks}
    if dtype == "float16":
        cfg["precision"] = "fp16"
        cfg["fp16"] = {"enabled": True}
    elif dtype == "bfloat16":
        cfg["precision"] = "bfloat16"
        cfg["bf16"] = {"enabled": True}
    else:
        cfg["precision"] = "fp32"
    # A converted checkpoint has no optimizer or RNG state: load it as a finetune start.
    cfg["finetune"] = True
    cfg["no_load_optim"] = True
    cfg["no_load_rng"] = True
    if extra:
        cfg.update(extra)
    if legacy:
        first = LEGACY_GQA_FIRST if legacy_needs_2024_02(spec) else LEGACY_FIRST
        target = f"# Target: GPT-NeoX {first} .. {LEGACY_LAST}.\n"
    else:
        target = "# Target: GPT-NeoX adbf5d6f (2024-09-10) or later.\n"
    header = (f"# GPT-NeoX config written by neoxconv {__version__}{' from ' + source if source else ''}.\n"
              f"# Layout: {layout}, TP={tp}, PP={cfg['pipe_parallel_size']}, names: {schema} schema.\n"
              + target +
              "# Merge your data/optimizer/training settings into this file; keep the model keys.\n")
    body = yaml.safe_dump({k.replace("_", "-"): v for k, v in cfg.items()}, sort_keys=False, default_flow_style=False)
    if legacy:
        body += ("# NeoX e109bf5e (2024-03-04) .. 0d4bdb96^ (2024-09-07) only: the checkpoint stores the rotary\n"
                 "# inv_freq buffers, which those versions load only with the next line uncommented (older\n"
                 "# NeoX rejects the key):\n"
                 "# rotary-save-freqs-buffer: true\n")
    return header + body
