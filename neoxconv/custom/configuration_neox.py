"""Configuration of a GPT-NeoX dense transformer exported to Hugging Face as custom code.

Written by neoxconv and copied verbatim into the export next to ``modeling_neox.py``; it depends
on ``transformers`` only. Every field names the GPT-NeoX argument (``neox_args.py``) it comes from;
the exact numerics of each value are specified in neoxconv's ``docs/custom-export.md``.
"""

from transformers import PretrainedConfig

CUSTOM_CODE_VERSION = "1.0"

NORMS = ("layernorm", "rmsnorm", "non_parametric_layernorm", "scalenorm")
POSITION_EMBEDDINGS = ("rotary", "alibi", "learned", "sinusoidal", "none")
PLAIN_ACTIVATIONS = ("gelu", "relu", "softsign", "swish", "mish", "silu")
GATED_ACTIVATIONS = ("geglu", "reglu", "swiglu", "bilinear", "glu")
GELU_VARIANTS = ("erf", "tanh", "erf_onnx")
ATTENTION_TYPES = ("global", "flash", "local")


def _one_of(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


class NeoXCustomConfig(PretrainedConfig):
    """GPT-NeoX model configuration (NeoX argument in brackets).

    Sizes: ``vocab_size`` (embedding rows, padding included), ``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads`` [num_kv_heads; None = MHA],
    ``intermediate_size`` (the MLP inner width F: rows of ``up_proj``; for gated activations the
    width of each of ``up_proj`` and ``gate_proj``), ``max_position_embeddings`` (rows of the learned
    position table).

    Norms: ``norm`` [norm], ``norm_eps`` [layernorm_epsilon / rms_norm_epsilon / scalenorm_epsilon,
    by norm], ``rmsnorm_eps_inside_sqrt`` (True: current NeoX x*rsqrt(mean(x^2)+eps); False: NeoX
    before 2025-05, x/(rms(x)+eps)).

    Positions: ``position_embedding`` [pos_emb], ``rotary_pct`` and ``rotary_base``
    [rotary_pct, rotary_emb_base], ``position_embedding_offset`` [opt_pos_emb_offset],
    ``position_embedding_multiplier`` [mup_rp_embedding_mult].

    MLP: ``activation`` [activation], ``gelu_variant`` for ``activation="gelu"``: "erf" (exact),
    "tanh" [bias_gelu_fusion], "erf_onnx" [onnx_safe]; ``mlp_bias`` [use_bias_in_mlp].

    Attention: ``attention_bias`` [use_bias_in_attn_linear], ``qk_norm`` [use_qk_layernorm] with
    ``qk_norm_group_heads`` (how many consecutive query heads one normalisation spans: NeoX
    normalises [heads per TP rank, head_dim] together for LayerNorm-kind norms),
    ``attention_types`` [attention_config, expanded: one of global/flash/local per layer],
    ``sliding_window_width`` [sliding_window_width: a query sees itself and W earlier tokens],
    ``local_block_size`` and ``local_window_blocks`` [sparsity_config block and
    num_local_blocks / num_sliding_window_blocks of "local" layers].

    Residual: ``parallel_residual`` [gpt_j_residual], ``parallel_norms_tied`` [gpt_j_tied].
    Output: ``tie_word_embeddings`` [not no_weight_tying].
    """

    model_type = "neox_custom"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size=50304,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=None,
        intermediate_size=3072,
        max_position_embeddings=2048,
        norm="layernorm",
        norm_eps=1e-5,
        rmsnorm_eps_inside_sqrt=True,
        position_embedding="rotary",
        rotary_pct=1.0,
        rotary_base=10000.0,
        position_embedding_offset=0,
        position_embedding_multiplier=1.0,
        activation="gelu",
        gelu_variant="erf",
        attention_bias=True,
        mlp_bias=True,
        qk_norm=False,
        qk_norm_group_heads=1,
        attention_types=None,
        sliding_window_width=None,
        local_block_size=16,
        local_window_blocks=4,
        parallel_residual=False,
        parallel_norms_tied=False,
        tie_word_embeddings=True,
        initializer_range=0.02,
        use_cache=True,
        custom_code_version=CUSTOM_CODE_VERSION,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.norm = norm
        self.norm_eps = float(norm_eps)
        self.rmsnorm_eps_inside_sqrt = bool(rmsnorm_eps_inside_sqrt)
        self.position_embedding = position_embedding
        self.rotary_pct = float(rotary_pct)
        self.rotary_base = float(rotary_base)
        self.position_embedding_offset = int(position_embedding_offset)
        self.position_embedding_multiplier = float(position_embedding_multiplier)
        self.activation = activation
        self.gelu_variant = gelu_variant
        self.attention_bias = bool(attention_bias)
        self.mlp_bias = bool(mlp_bias)
        self.qk_norm = bool(qk_norm)
        self.qk_norm_group_heads = int(qk_norm_group_heads)
        self.attention_types = list(attention_types or ["global"] * num_hidden_layers)
        self.sliding_window_width = None if sliding_window_width is None else int(sliding_window_width)
        self.local_block_size = int(local_block_size)
        self.local_window_blocks = int(local_window_blocks)
        self.parallel_residual = bool(parallel_residual)
        self.parallel_norms_tied = bool(parallel_norms_tied)
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.custom_code_version = custom_code_version
        self._validate()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def gated(self):
        return self.activation in GATED_ACTIVATIONS

    @property
    def rotary_dims(self):
        """Rotated dims per head: all when rotary_pct == 1, else int(head_dim * pct) (NeoX)."""
        return self.head_dim if self.rotary_pct == 1 else int(self.head_dim * self.rotary_pct)

    def _validate(self):
        _one_of("norm", self.norm, NORMS)
        _one_of("position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
        _one_of("activation", self.activation, PLAIN_ACTIVATIONS + GATED_ACTIVATIONS)
        _one_of("gelu_variant", self.gelu_variant, GELU_VARIANTS)
        for kind in self.attention_types:
            _one_of("attention_types entry", kind, ATTENTION_TYPES)
        n, kv = self.num_attention_heads, self.num_key_value_heads
        checks = [
            (self.hidden_size % n == 0, f"hidden_size {self.hidden_size} is not divisible by {n} heads"),
            (n % kv == 0, f"{n} attention heads are not divisible by {kv} key/value heads"),
            (len(self.attention_types) == self.num_hidden_layers,
             f"attention_types has {len(self.attention_types)} entries for {self.num_hidden_layers} layers"),
            (0 < self.rotary_pct <= 1, f"rotary_pct {self.rotary_pct} is not in (0, 1]"),
            (self.position_embedding != "rotary" or (self.rotary_dims > 0 and self.rotary_dims % 2 == 0),
             f"rotary dims {self.rotary_dims} must be even and positive"),
            (n % self.qk_norm_group_heads == 0, f"qk_norm_group_heads {self.qk_norm_group_heads} does not divide {n}"),
            (self.norm != "scalenorm" or self.qk_norm_group_heads == 1,
             "qk_norm_group_heads must be 1 for scalenorm (it normalises each head; its gains are per head)"),
            (not (self.qk_norm and self.norm == "rmsnorm" and not self.rmsnorm_eps_inside_sqrt),
             "qk_norm with the pre-2025 NeoX RMSNorm is not a NeoX configuration (it fails there)"),
            (self.sliding_window_width is None or self.sliding_window_width >= 0, "sliding_window_width < 0"),
            (self.local_block_size > 0 and self.local_window_blocks > 0, "local attention block sizes must be > 0"),
            (not (self.parallel_norms_tied and not self.parallel_residual),
             "parallel_norms_tied (gpt_j_tied) needs parallel_residual (gpt_j_residual)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
