"""ModelSpec: everything that shapes a model's weights or its numerics, independent of format.

Readers fill it from config files AND tensor shapes; where they disagree, the shapes win
(neox-formats.md T10). Writers derive every config file they write from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from neoxconv.errors import NeoxconvError

NORMS = ("layernorm", "rmsnorm")
# gelu: exact erf GELU. gelu_tanh: the tanh approximation (NeoX `bias_gelu_fusion`).
# silu: SwiGLU, a gated MLP act(gate) * up.
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
GATED = {"silu"}


@dataclass(frozen=True)
class ModelSpec:
    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab_rows: int  # rows of the embedding as held in the canonical map (may include padding)
    vocab_size: int  # real vocabulary (tokenizer) size, <= vocab_rows
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"
    rotary_pct: float = 1.0
    rotary_base: float = 10000.0
    parallel_residual: bool = False
    tied: bool = False
    attn_bias: bool = True
    mlp_bias: bool = True
    max_positions: int = 2048
    sliding_window: int | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        from neoxconv.archs import FAMILIES  # the registry (no torch, no cycle)

        if self.family not in FAMILIES:
            raise NeoxconvError(f"unknown model family {self.family!r} (known: {', '.join(FAMILIES)})")
        if self.norm not in NORMS:
            raise NeoxconvError(f"unsupported norm {self.norm!r} (supported: {', '.join(NORMS)})")
        if self.activation not in ACTIVATIONS:
            raise NeoxconvError(f"unsupported activation {self.activation!r}")
        if self.hidden % self.heads:
            raise NeoxconvError(f"hidden size {self.hidden} is not divisible by {self.heads} attention heads")
        if self.heads % self.kv_heads:
            raise NeoxconvError(f"{self.heads} attention heads are not divisible by {self.kv_heads} KV heads")
        if self.vocab_size > self.vocab_rows:
            raise NeoxconvError(f"vocabulary size {self.vocab_size} exceeds the {self.vocab_rows} embedding rows")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def gated(self) -> bool:
        return self.activation in GATED

    @property
    def rotary_dims(self) -> int:
        """Rotated dims per head: int(d * pct) when pct < 1 (NeoX and HF agree, §4.4)."""
        return int(self.head_dim * self.rotary_pct) if self.rotary_pct < 1 else self.head_dim

    @property
    def gqa(self) -> bool:
        return self.kv_heads != self.heads

    def replace(self, **changes) -> "ModelSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check_tp(self, tp: int) -> None:
        """Refuse a TP degree that cannot split this model, naming the constraint."""
        if tp < 1:
            raise NeoxconvError(f"--tp must be at least 1, got {tp}")
        for what, n in (("attention heads", self.heads), ("KV heads", self.kv_heads),
                        ("MLP intermediate size", self.intermediate)):
            if n % tp:
                raise NeoxconvError(f"--tp {tp} does not divide the {n} {what}")
