"""NeoX YAML configs as stored beside a checkpoint: find them, read and merge them.

Storage only (what `neox_files` and the independent reference need): no ModelSpec, no writing.
The converter writes YAMLs with `formats/neox_config.py`.

NeoX replaces '-' by '_' in top-level keys, so both spellings mean the same key (§5.1).
Values that disagree across files are an error naming both files. PyYAML reads `1e-5` (no
dot) as a string (T12): numeric-looking strings are turned into numbers.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from neoxconv.errors import NeoxconvError

__all__ = ["find_config_files", "normalise", "read_configs"]

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _fix_number(value):
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        v = float(value)
        return int(v) if v.is_integer() and "e" not in value.lower() and "." not in value else v
    return value


def normalise(raw: dict, where: Path) -> dict:
    """Underscore keys, numbers from numeric-looking strings; a key given twice differently is an error."""
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
