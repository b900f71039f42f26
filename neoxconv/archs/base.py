"""An architecture = a table of HF names <-> canonical names plus two config functions.

Patterns use `{i}` for the layer index and `{p}` for the parameter kind (weight / bias).
The only fused HF tensor we know is GPTNeoX's interleaved `query_key_value`, named by
`fused_qkv`; everything else is a rename.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from neoxconv.fusing import fuse_qkv, split_qkv
from neoxconv.spec import ModelSpec


def _compile(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(rx + "$")


@dataclass(frozen=True)
class Arch:
    family: str
    architecture: str  # HF class name written to config.json "architectures"
    model_type: str
    names: dict[str, str]  # HF pattern -> canonical pattern
    spec_from_config: Callable[[dict, dict[str, tuple]], ModelSpec]
    config_from_spec: Callable[[ModelSpec], dict]
    fused_qkv: str | None = None  # HF pattern of a fused, head-interleaved QKV tensor
    read_aliases: dict[str, str] = field(default_factory=dict)  # other HF names accepted on read
    ignored: tuple[str, ...] = ()  # regexes of HF buffers that carry no weights
    hf_activations: dict[str, str] = field(default_factory=dict)  # HF hidden_act -> ModelSpec activation

    # -- name mapping -------------------------------------------------------------------------
    def _rules(self) -> list[tuple[re.Pattern, str]]:
        rules = [(_compile(h), c) for h, c in self.names.items()]
        rules += [(_compile(h), self.names[target]) for h, target in self.read_aliases.items()]
        return rules

    def is_ignored(self, hf_name: str) -> bool:
        return any(re.fullmatch(rx, hf_name) for rx in self.ignored)

    def canonical_name(self, hf_name: str) -> str | None:
        """Canonical name for a plain-renamed HF tensor; None for the fused QKV; KeyError if unknown."""
        if self.fused_qkv and _compile(self.fused_qkv).match(hf_name):
            return None
        for rx, canon in self._rules():
            m = rx.match(hf_name)
            if m:
                return canon.format(**m.groupdict())
        raise KeyError(hf_name)

    def to_canonical(self, spec_heads: tuple[int, int], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        heads, kv = spec_heads
        out: dict[str, torch.Tensor] = {}
        fused = _compile(self.fused_qkv) if self.fused_qkv else None
        for name, t in tensors.items():
            if self.is_ignored(name):
                continue
            m = fused.match(name) if fused else None
            if m:
                for part, x in zip("qkv", split_qkv(t, heads, kv, "mha_interleaved")):
                    out[f"layers.{m['i']}.attn.{part}.{m['p']}"] = x
            else:
                out[self.canonical_name(name)] = t
        return out

    def from_canonical(self, spec: ModelSpec, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inverse = [(_compile(c), h) for h, c in self.names.items()]
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            m = re.match(r"layers\.(\d+)\.attn\.([qkv])\.(weight|bias)$", name)
            if self.fused_qkv and m:
                if m[2] != "q":
                    continue
                i, p = m[1], m[3]
                q, k, v = (tensors[f"layers.{i}.attn.{x}.{p}"] for x in "qkv")
                out[self.fused_qkv.format(i=i, p=p)] = fuse_qkv(q, k, v, spec.heads, spec.kv_heads, "mha_interleaved")
                continue
            for rx, hf in inverse:
                mm = rx.match(name)
                if mm:
                    out[hf.format(**mm.groupdict())] = t
                    break
            else:
                raise KeyError(f"{self.family}: no HF name for canonical tensor {name}")
        return out


def first(cfg: dict, *keys, default=None):
    """The first present, non-None value among keys (config files spell things several ways)."""
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def rope_fields(cfg: dict) -> dict:
    """transformers 5 nests rope settings in `rope_parameters`; 4.x used top-level keys."""
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return rp if isinstance(rp, dict) else {}
