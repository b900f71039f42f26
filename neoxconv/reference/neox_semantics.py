"""NeoX config -> the handful of facts that decide what the NeoX forward computes.

Defaults are NeoX's own (``megatron/neox_arguments/neox_args.py``; neox-formats.md §5.2, trap
T12), never a converter's: rotary_pct 1.0, rotary_emb_base 10000, norm layernorm,
layernorm_epsilon 1e-5, rms_norm_epsilon 1e-8, gpt_j_residual False, gpt_j_tied False,
activation gelu, bias_gelu_fusion False, no_weight_tying False (tied), num_kv_heads None (MHA),
sliding_window_width None, attention_config ``[[["global"], num_layers]]``.

Sliding window: NeoX trains every layer with ``sliding_window_width`` W: ``"global"`` layers
through the attention mask that ``megatron/training.py`` ``_get_batch`` builds
(``get_ltor_masks_and_position_ids`` -> ``torch.triu(mask, diagonal=-W)``), ``"flash"`` layers
through flash-attn's ``window_size=(W, -1)``: a query sees itself and W earlier keys on both
(:attr:`NeoxSemantics.layer_windows`).

Every dense feature of NeoX's transformer is resolved here (docs/custom-export.md §3): the four
norms (with the eps ``get_norm`` picks), every position embedding (``pos_emb``; absent: rotary, as
0.1 read YAMLs without it), every activation and GELU variant, QK-norm, ``gpt_j_tied`` and per-layer
``global``/``flash``/``local`` attention with DeepSpeed's local block layout. Features that change
the forward but that the reference does not implement (T5 relative bias, muP, MoE, soft prompts,
sparse layouts, non-attention layers) raise :class:`UnsupportedNeoxFeature` instead of being
silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import NeoxconvError

__all__ = [
    "QKV_LAYOUTS",
    "GATED_ACTIVATIONS",
    "PLAIN_ACTIVATIONS",
    "NeoxSemantics",
    "SUPPORTED_ATTENTION",
    "UnsupportedNeoxFeature",
    "attention_types",
    "normalise_args",
]

QKV_LAYOUTS = ("mha_interleaved", "gqa_blocked", "gqa_fakehead")
#: gated activations: ``linear1`` holds [x ; gate] per rank, output = act(gate) * x (NX
#: ``transformer.py`` Gated_Activation; neox-formats.md §3, T7). Value = the base activation.
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu", "glu": "sigmoid", "bilinear": "identity"}
PLAIN_ACTIVATIONS = ("gelu", "relu", "silu", "swish", "softsign", "mish")
POSITIONS = ("rotary", "alibi", "learned", "sinusoidal", "none")
#: norm -> the epsilon key NeoX's ``get_norm`` reads for it, and its default
NORMS = {"layernorm": ("layernorm_epsilon", 1e-5), "te_layernorm": ("layernorm_epsilon", 1e-5),
         "non_parametric_layernorm": ("layernorm_epsilon", 1e-5), "rmsnorm": ("rms_norm_epsilon", 1e-8),
         "te_rmsnorm": ("rms_norm_epsilon", 1e-8), "scalenorm": ("scalenorm_epsilon", 1e-8)}


class UnsupportedNeoxFeature(NeoxconvError):
    """The checkpoint uses a NeoX feature the reference forward does not implement."""


def normalise_args(args: Mapping[str, Any] | None) -> dict[str, Any]:
    """Keys with ``-`` become ``_`` (NeoX accepts both spellings, §5.1)."""
    return {str(k).replace("-", "_"): v for k, v in (args or {}).items()}


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def _as_float(v: Any) -> float:
    # PyYAML reads "1e-5" as a string (§5.1).
    return float(v)


@dataclass(frozen=True)
class NeoxSemantics:
    """What a NeoX forward does, resolved from the config (with NeoX defaults)."""

    num_heads: int
    num_kv_heads: int  #: equals num_heads for MHA
    hidden_size: int | None  #: None: take it from the embedding shape
    rotary_pct: float
    rotary_base: float
    norm: str  #: "layernorm" | "rmsnorm" | "non_parametric_layernorm" | "scalenorm"
    norm_eps: float
    gpt_j_residual: bool
    gpt_j_tied: bool
    activation: str
    bias_gelu_fusion: bool
    tied_embeddings: bool
    sliding_window: int | None
    qkv_layout: str  #: the layout NeoX's forward actually uses (see from_args)
    declared_qkv_layout: str
    #: per layer: the sliding window NeoX applies (``sliding_window_width`` on every layer type).
    #: Empty: every layer uses :attr:`sliding_window`.
    layer_windows: tuple[int | None, ...] = ()
    pos_emb: str = "rotary"  #: rotary | alibi | learned | sinusoidal | none
    pos_offset: int = 0  #: ``opt_pos_emb_offset`` (learned)
    pos_mult: float = 1.0  #: ``mup_rp_embedding_mult`` (learned, sinusoidal)
    onnx_safe: bool = False  #: GELU as ``erf_gelu``
    qk_norm: bool = False  #: ``use_qk_layernorm``
    qk_norm_fused: bool = False  #: ``rmsnorm_fusion``: apex's RMSNorm, over [heads per rank, head dim]
    layer_types: tuple[str, ...] = ()  #: per layer: global | flash | local (empty: all global)
    local_block: int = 16  #: ``sparsity_config.block``
    local_blocks: int = 4  #: ``sparsity_config.num_local_blocks`` (or ``num_sliding_window_blocks``)

    def layer_type(self, layer: int) -> str:
        return self.layer_types[layer] if self.layer_types else "global"

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer`` (0-based), None for full causal attention."""
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads != self.num_heads

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    def head_dim(self, hidden: int) -> int:
        if hidden % self.num_heads:
            raise NeoxconvError(f"hidden_size {hidden} is not divisible by num_attention_heads {self.num_heads}")
        return hidden // self.num_heads

    def rotary_dims(self, head_dim: int) -> int:
        """NeoX: the whole head if rotary_pct == 1, else int(d * rotary_pct) (NX transformer.py; §4.4)."""
        if self.rotary_pct == 1:
            return head_dim
        return int(head_dim * self.rotary_pct)

    @classmethod
    def from_args(cls, args: Mapping[str, Any] | None, qkv_layout: str,
                  num_layers: int | None = None) -> NeoxSemantics:
        """Resolve ``args`` (NeoX config) with NeoX defaults.

        ``qkv_layout`` is what the source declares. NeoX takes the plain MHA code path (per-head
        interleaved QKV, §4.1) whenever ``num_kv_heads`` is unset or equal to the head count
        (§2.3, T8), whatever produced the file; the reference does the same, so an MHA checkpoint
        written in a GQA layout (bug B4 / the HF-Llama importer's MHA bug) is *detected*, not
        excused. For GQA the declared layout must be ``gqa_blocked`` or ``gqa_fakehead``.

        ``num_layers`` (default: the config's) expands a compact ``attention_config``.
        ``sliding_window`` is ``sliding_window_width`` (NeoX applies it on global and flash
        layers alike), else None; ``layer_windows`` has it per layer.
        """
        a = normalise_args(args)
        if qkv_layout not in QKV_LAYOUTS:
            raise NeoxconvError(f"unknown qkv_layout {qkv_layout!r}; expected one of {QKV_LAYOUTS}")
        if "num_attention_heads" not in a:
            raise NeoxconvError("NeoX config lacks num_attention_heads")
        n = int(a["num_attention_heads"])
        kv_raw = a.get("num_kv_heads")
        kv = n if kv_raw in (None, "", 0) else int(kv_raw)
        if n % kv:
            raise NeoxconvError(f"num_attention_heads {n} is not a multiple of num_kv_heads {kv}")
        if kv == n:
            layout = "mha_interleaved"
        else:
            if qkv_layout == "mha_interleaved":
                raise NeoxconvError(
                    "GQA model (num_kv_heads < num_attention_heads) declared with qkv_layout "
                    "'mha_interleaved'; NeoX stores GQA as 'gqa_blocked' (since 2024-11) or "
                    "'gqa_fakehead' (2024-02..2024-11)"
                )
            layout = qkv_layout

        _reject_unsupported(a)

        norm = str(a.get("norm", "layernorm"))
        if norm not in NORMS:
            raise UnsupportedNeoxFeature(f"norm {norm!r} is not supported by the reference forward")
        eps = _as_float(a.get(NORMS[norm][0], NORMS[norm][1]))
        norm = norm.removeprefix("te_")
        pos_emb = str(a.get("pos_emb") or "rotary")
        if pos_emb not in POSITIONS:
            raise UnsupportedNeoxFeature(f"pos_emb {pos_emb!r} is not supported by the reference forward")

        activation = str(a.get("activation", "gelu"))
        if activation not in GATED_ACTIVATIONS and activation not in PLAIN_ACTIVATIONS:
            raise UnsupportedNeoxFeature(f"activation {activation!r} is not supported")

        rotary_pct = _as_float(a.get("rotary_pct", 1.0))
        if not 0 < rotary_pct <= 1:
            raise NeoxconvError(f"rotary_pct must be in (0, 1], got {rotary_pct}")
        sw = a.get("sliding_window_width")
        sw = None if sw in (None, "", 0) else int(sw)
        layers = num_layers if num_layers is not None else a.get("num_layers")
        types = attention_types(a.get("attention_config"), None if layers is None else int(layers))
        # NeoX trains global layers with the window in the attention mask (megatron/utils.py
        # get_attn_mask: triu(diagonal=-W)), flash layers with window_size=(W, -1) and local layers
        # with that mask added in the sparse softmax: the same W + 1 keys on every layer type.
        layer_windows = tuple(sw for _ in types)
        if not any(w is not None for w in layer_windows):
            sw = None
        sparsity = a.get("sparsity_config") or {}
        if "local" in types and kv != n:
            raise NeoxconvError("local (sparse) attention with grouped-query attention: NeoX refuses it")
        hidden = a.get("hidden_size")
        return cls(
            num_heads=n,
            num_kv_heads=kv,
            hidden_size=None if hidden is None else int(hidden),
            rotary_pct=rotary_pct,
            rotary_base=_as_float(a.get("rotary_emb_base", 10000)),
            norm=norm,
            norm_eps=eps,
            gpt_j_residual=_as_bool(a.get("gpt_j_residual", False)),
            gpt_j_tied=_as_bool(a.get("gpt_j_tied", False)),
            activation=activation,
            bias_gelu_fusion=_as_bool(a.get("bias_gelu_fusion", False)),
            tied_embeddings=not _as_bool(a.get("no_weight_tying", False)),
            sliding_window=sw,
            qkv_layout=layout,
            declared_qkv_layout=qkv_layout,
            layer_windows=layer_windows if sw is not None else (),
            pos_emb=pos_emb,
            pos_offset=int(a.get("opt_pos_emb_offset") or 0),
            pos_mult=_as_float(a.get("mup_rp_embedding_mult", 1.0)),
            onnx_safe=_as_bool(a.get("onnx_safe", False)),
            qk_norm=_as_bool(a.get("use_qk_layernorm", False)),
            qk_norm_fused=_as_bool(a.get("rmsnorm_fusion", False)),
            layer_types=types,
            local_block=int(sparsity.get("block", 16)),
            local_blocks=int(sparsity.get("num_local_blocks", sparsity.get("num_sliding_window_blocks", 4))),
        )

    def validate_tp(self, tp: int) -> None:
        """NeoX splits heads and KV heads over ranks, never replicating them (§2.3)."""
        if self.num_heads % tp:
            raise NeoxconvError(f"tp={tp} does not divide num_attention_heads={self.num_heads}")
        if self.num_kv_heads % tp:
            raise NeoxconvError(f"tp={tp} does not divide num_kv_heads={self.num_kv_heads}")

    def describe(self) -> dict[str, Any]:
        """Plain dict for reports."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


#: attention types the reference implements (NeoX ``attention_config`` entries)
SUPPORTED_ATTENTION = ("global", "flash", "local")


def attention_types(config: Any, num_layers: int | None) -> tuple[str, ...]:
    """NeoX ``attention_config`` -> one attention type per layer, as NeoX's
    ``megatron/utils.py::expand_attention_types`` expands it (``[[["flash"], 2]]``,
    ``[[["global", "flash"], "all"]]`` or an already expanded list of strings). None/empty:
    NeoX's default, ``"global"`` for every layer. Types other than global/flash/local (sparse
    layouts, gmlp, mamba, rwkv, ...) raise :class:`UnsupportedNeoxFeature`."""
    if config in (None, "", []):
        if num_layers is None:
            return ()
        return ("global",) * num_layers
    if isinstance(config, str):
        import json

        try:
            config = json.loads(config)
        except ValueError:
            raise NeoxconvError(f"attention_config {config!r} is not a list") from None
    if not isinstance(config, (list, tuple)):
        raise NeoxconvError(f"attention_config must be a list, got {config!r}")
    if all(isinstance(t, str) for t in config):
        types = [str(t) for t in config]
    else:
        types = []
        for item in config:
            try:
                pattern, count = item
                pattern = [pattern] if isinstance(pattern, str) else [str(t) for t in pattern]
            except (TypeError, ValueError):
                raise NeoxconvError(f"attention_config entry {item!r} is not [[types...], count]") from None
            if count == "all":
                if num_layers is None or num_layers % len(pattern):
                    raise NeoxconvError(f"attention_config {item!r}: num_layers {num_layers} is not a multiple "
                                        f"of the pattern length {len(pattern)}")
                types = pattern * (num_layers // len(pattern))
                break  # NeoX returns here: "all" covers every layer
            types.extend(pattern * int(count))
    if num_layers is not None and len(types) != num_layers:
        raise NeoxconvError(f"attention_config expands to {len(types)} layer types, expected num_layers={num_layers}")
    bad = sorted(set(types) - set(SUPPORTED_ATTENTION))
    if bad:
        raise UnsupportedNeoxFeature(f"attention types {bad} (attention_config) are not supported by the reference "
                                     f"forward (only {', '.join(SUPPORTED_ATTENTION)})")
    return tuple(types)


def _reject_unsupported(a: Mapping[str, Any]) -> None:
    for key, what in (
        ("use_mup", "muP attention scaling"),
        ("soft_prompt_tuning", "soft prompt tuning (shifts layer indices)"),
    ):
        v = a.get(key)
        if isinstance(v, Mapping):
            v = v.get("enabled", False)
        if v and _as_bool(v):
            raise UnsupportedNeoxFeature(f"{what} is not supported by the reference forward")
    if int(a.get("moe_num_experts", 1) or 1) > 1:
        raise UnsupportedNeoxFeature("MoE layers are not supported by the reference forward")
