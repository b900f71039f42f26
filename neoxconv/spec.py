"""ModelSpec: everything that shapes a model's weights or its numerics, independent of format.

Readers fill it from config files AND tensor shapes; where they disagree, the shapes win
(neox-formats.md T10). Writers derive every config file they write from it. The values are GPT-NeoX's
own (docs/custom-export.md specifies what each computes); a stock HF family holds a subset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from neoxconv.errors import NeoxconvError

# NeoX `norm`; eps placement as current NeoX (RMSNorm: x * rsqrt(mean(x^2) + eps), since 2025-05).
NORMS = ("layernorm", "rmsnorm", "non_parametric_layernorm", "scalenorm")
# NeoX `activation`, with GELU split by variant: gelu = exact erf GELU, gelu_tanh = `bias_gelu_fusion`,
# gelu_onnx = `onnx_safe` (erf with 1.41421). Gated ones compute act(gate) * up.
PLAIN_ACTIVATIONS = ("gelu", "gelu_tanh", "gelu_onnx", "relu", "softsign", "swish", "mish", "silu")
GATED_ACTIVATIONS = ("swiglu", "geglu", "reglu", "glu", "bilinear")
ACTIVATIONS = PLAIN_ACTIVATIONS + GATED_ACTIVATIONS
GATED = set(GATED_ACTIVATIONS)
POSITIONS = ("rotary", "alibi", "learned", "sinusoidal", "none")  # NeoX `pos_emb`
ATTENTION_TYPES = ("global", "flash", "local")  # NeoX `attention_config` entries (dense ones)


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
    sliding_window: int | None = None  # HF convention: keys a query sees, itself included (NeoX W + 1)
    dtype: str = "float32"
    position: str = "rotary"
    position_offset: int = 0  # learned: NeoX opt_pos_emb_offset
    position_multiplier: float = 1.0  # learned/sinusoidal: NeoX mup_rp_embedding_mult
    qk_norm: bool = False  # NeoX use_qk_layernorm
    # Heads one QK-norm normalises together: NeoX builds norm([heads per TP rank, head_dim]),
    # which LayerNorm (and fused RMSNorm) reduce over both dims: heads // TP of training.
    qk_norm_group: int = 1
    attention_types: tuple[str, ...] = ()  # per layer; () = all global (filled in)
    local_block: int = 16  # local layers: sparsity_config block
    local_blocks: int = 4  # local layers: num_local_blocks (this block and blocks // 2 before it)
    parallel_norms_tied: bool = False  # gpt_j_tied: the GPT-J residual's MLP uses input_layernorm

    def __post_init__(self) -> None:
        from neoxconv.archs import FAMILIES  # the registry (no torch, no cycle)

        if not self.attention_types:
            object.__setattr__(self, "attention_types", ("global",) * self.layers)
        object.__setattr__(self, "attention_types", tuple(self.attention_types))
        if self.family not in FAMILIES:
            raise NeoxconvError(f"unknown model family {self.family!r} (known: {', '.join(FAMILIES)})")
        for what, value, allowed in (("norm", self.norm, NORMS), ("activation", self.activation, ACTIVATIONS),
                                     ("position embedding", self.position, POSITIONS)):
            if value not in allowed:
                raise NeoxconvError(f"unsupported {what} {value!r} (supported: {', '.join(allowed)})")
        bad = sorted(set(self.attention_types) - set(ATTENTION_TYPES))
        if bad or len(self.attention_types) != self.layers:
            raise NeoxconvError(f"attention types {list(self.attention_types)} are not one of "
                                f"{', '.join(ATTENTION_TYPES)} for each of the {self.layers} layers")
        if self.hidden % self.heads:
            raise NeoxconvError(f"hidden size {self.hidden} is not divisible by {self.heads} attention heads")
        if self.heads % self.kv_heads:
            raise NeoxconvError(f"{self.heads} attention heads are not divisible by {self.kv_heads} KV heads")
        if self.vocab_size > self.vocab_rows:
            raise NeoxconvError(f"vocabulary size {self.vocab_size} exceeds the {self.vocab_rows} embedding rows")
        if self.qk_norm_group < 1 or self.heads % self.qk_norm_group:
            raise NeoxconvError(f"QK-norm group of {self.qk_norm_group} heads does not divide {self.heads} heads")
        if self.parallel_norms_tied and not self.parallel_residual:
            raise NeoxconvError("gpt_j_tied (one norm for attention and MLP) needs gpt_j_residual")

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

    @property
    def local_layers(self) -> tuple[int, ...]:
        """Layers with NeoX's block-sparse `local` attention (`global` and `flash` compute the same)."""
        return tuple(i for i, t in enumerate(self.attention_types) if t == "local")

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
        if self.qk_norm_group > 1 and tp != self.heads // self.qk_norm_group:
            # NeoX's QK-norm normalises all heads of one TP rank together: the model computes what
            # it was trained to only at the training TP (docs/custom-export.md §4).
            raise NeoxconvError(f"this model's QK {self.norm} normalises {self.qk_norm_group} heads together, as NeoX "
                                f"trained it at TP {self.heads // self.qk_norm_group}; at --tp {tp} NeoX would "
                                f"compute a different model: use --tp {self.heads // self.qk_norm_group}")
