"""A model family = one table (HF name <-> canonical name <-> TP role) plus two config functions.

Table rows are `(HF name, canonical name, role)`; `{i}` is the layer index. A row whose HF
tensor fuses several canonical ones names them all and has a fused role (GPTNeoX's
`query_key_value`: `FusedQKV`). Hugging Face keeps whole tensors, so reading and writing HF is
the role's merge and split at p = 1.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from neoxconv.roles import Context, Role
from neoxconv.spec import ModelSpec
from neoxconv.table import Entry, Table


@dataclass(frozen=True)
class Arch:
    family: str
    architecture: str  # HF class name written to config.json "architectures"
    model_type: str
    tensors: tuple[Entry, ...]  # the table
    spec_from_config: Callable[[dict, dict[str, tuple]], ModelSpec]
    # config.json for the HF class; raises NeoxconvError for a model the class does not compute
    # exactly (which is how a NeoX checkpoint, recording no family, finds its family: archs.family_for).
    config_from_spec: Callable[[ModelSpec], dict]
    # Linear layers (canonical, e.g. "mlp.up") the HF class always builds with a bias: a model
    # without one is written with a zero bias (same numerics).
    always_biased: tuple[str, ...] = ()
    read_aliases: dict[str, str] = field(default_factory=dict)  # other HF names accepted on read -> table name
    ignored: tuple[str, ...] = ()  # regexes of HF buffers that carry no weights
    hf_activations: dict[str, str] = field(default_factory=dict)  # HF hidden_act -> ModelSpec activation

    @cached_property
    def table(self) -> Table:
        return Table(self.tensors)

    def role_of(self, canonical: str) -> Role:
        """The declared TP role of a canonical tensor (KeyError if this family has none)."""
        return self.table.role_of(canonical)

    def is_ignored(self, hf_name: str) -> bool:
        return any(re.fullmatch(rx, hf_name) for rx in self.ignored)

    def to_canonical(self, heads: tuple[int, int], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Canonical tensors from HF ones (heads = (heads, KV heads)); KeyError for an unknown name."""
        ctx = Context(heads=heads[0], kv_heads=heads[1])
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if self.is_ignored(name):
                continue
            entry = self.table.by_name(self.read_aliases.get(name, name))
            if entry is None:
                raise KeyError(name)
            out.update(zip(entry.canonical, entry.role.merge([t], ctx), strict=True))
        return out

    def from_canonical(self, spec: ModelSpec, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF tensors from canonical ones, in their order; vocab tensors get spec.vocab_rows rows.
        A fused tensor is written where its first member (q) comes."""
        ctx = Context.of(spec)
        tensors = self._with_zero_biases(tensors)
        out: dict[str, torch.Tensor] = {}
        for name in tensors:
            entry = self.table.by_canonical(name)
            if entry is None:
                raise KeyError(f"{self.family}: no HF name for canonical tensor {name}")
            if name == entry.canonical[0]:
                out[entry.name] = entry.role.split([tensors[c] for c in entry.canonical], 1, ctx)[0]
        return out

    def _with_zero_biases(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.always_biased:
            return tensors
        out = dict(tensors)
        for i in sorted({int(n.split(".")[1]) for n in tensors if n.startswith("layers.")}):
            for leaf in self.always_biased:
                w = tensors.get(f"layers.{i}.{leaf}.weight")
                if w is not None and f"layers.{i}.{leaf}.bias" not in tensors:
                    out[f"layers.{i}.{leaf}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
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
