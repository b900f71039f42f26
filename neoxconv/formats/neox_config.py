"""NeoX YAML configs: read and merge several files; write one complete file.

NeoX replaces '-' by '_' in top-level keys, so both spellings mean the same key (§5.1).
Values that disagree across files are an error naming both files. PyYAML reads `1e-5` (no
dot) as a string (T12): numeric-looking strings are turned into numbers.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from neoxconv import __version__
from neoxconv.errors import NeoxconvError
from neoxconv.spec import ModelSpec

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _fix_number(value):
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        v = float(value)
        return int(v) if v.is_integer() and "e" not in value.lower() and "." not in value else v
    return value


def normalise(raw: dict, where: Path) -> dict:
    out: dict = {}
    for key, value in raw.items():
        k = str(key).replace("-", "_")
        if k in out and out[k] != value:
            raise NeoxconvError(f"{where}: key {key!r} given twice with different values ({out[k]!r} vs {value!r})")
        out[k] = _fix_number(value)
    return out


# Keys that must hold numbers (or nothing): a string there is refused by name, not met later
# as a crash in int()/float().
INT_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "model_parallel_size",
            "pipe_parallel_size", "max_position_embeddings", "seq_length", "make_vocab_size_divisible_by",
            "intermediate_size", "mlp_multiple_of", "sliding_window_width", "moe_num_experts")
FLOAT_KEYS = ("rotary_pct", "rotary_emb_base", "layernorm_epsilon", "rms_norm_epsilon")


# ... and of those, the ones that count something that cannot be zero.
POSITIVE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "model_parallel_size",
                 "max_position_embeddings", "seq_length", "make_vocab_size_divisible_by", "intermediate_size",
                 "mlp_multiple_of", "rotary_pct", "rotary_emb_base")


def _check_types(merged: dict, origin: dict[str, Path]) -> None:
    for keys, kinds, what in ((INT_KEYS, (int,), "an integer"), (FLOAT_KEYS, (int, float), "a number")):
        for k in keys:
            v = merged.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, kinds)):
                raise NeoxconvError(f"{origin[k]}: {k.replace('_', '-')} must be {what}, got {v!r}")
            if v is not None and (v < 0 or (v == 0 and k in POSITIVE_KEYS)):
                need = "positive" if k in POSITIVE_KEYS else "at least 0"
                raise NeoxconvError(f"{origin[k]}: {k.replace('_', '-')} must be {need}, got {v!r}")


def read_configs(files: list[Path]) -> tuple[dict, list[Path]]:
    """Merge NeoX YAML files; conflicting values are an error naming both files."""
    merged: dict = {}
    origin: dict[str, Path] = {}
    for f in files:
        try:
            raw = yaml.safe_load(Path(f).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise NeoxconvError(f"{f}: config file not found") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise NeoxconvError(f"{f}: invalid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise NeoxconvError(f"{f}: a NeoX config must be a YAML mapping")
        for k, v in normalise(raw, Path(f)).items():
            if k in merged and merged[k] != v:
                raise NeoxconvError(f"{f}: {k} = {v!r} conflicts with {merged[k]!r} in {origin[k]}")
            merged[k] = v
            origin.setdefault(k, Path(f))
    _check_types(merged, origin)
    # A key set to null is a key not given (NeoX's defaults are mostly None): `num-layers:` with
    # nothing after it then reads as missing, never as int(None).
    return {k: v for k, v in merged.items() if v is not None}, list(files)


def find_config_files(tag_dir: Path) -> list[Path]:
    """YAMLs NeoX copied into global_stepN/configs/, or <save>/configs/ (the 20B release)."""
    for d in (tag_dir / "configs", tag_dir.parent / "configs"):
        if d.is_dir():
            files = sorted(p for p in d.iterdir() if p.suffix in (".yml", ".yaml"))
            if files:
                return files
    return []


NEOX_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu", "relu": "relu", "silu": "swiglu"}


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
        "pos_emb": "rotary",
        "rotary_pct": spec.rotary_pct,
        "rotary_emb_base": int(spec.rotary_base) if float(spec.rotary_base).is_integer() else spec.rotary_base,
        "norm": spec.norm,
    })
    if spec.norm == "layernorm":
        cfg["layernorm_epsilon"] = spec.norm_eps
    else:
        cfg["rms_norm_epsilon"] = spec.norm_eps
    cfg.update({
        "gpt_j_residual": spec.parallel_residual,
        "gpt_j_tied": False,
        "no_weight_tying": not spec.tied,
        "activation": NEOX_ACTIVATION[spec.activation],
        "bias_gelu_fusion": spec.activation == "gelu_tanh",
        "use_bias_in_attn_linear": spec.attn_bias,
    })
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
        cfg["attention_config"] = [[["flash"], spec.layers]]  # as NeoX's configs/mistral: flash computes SWA without a mask
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
