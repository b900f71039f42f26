"""A NeoX checkpoint's config and tensor shapes -> ModelSpec (shapes win, T10).

GPT-NeoX's dense transformer is the specification (docs/custom-export.md §3): every norm,
position embedding, activation, bias flag, residual kind, QK-norm and per-layer attention type
it computes is read; what it computes that neoxconv does not (doc §5) is refused here, naming the
feature. Buffers NeoX saves (ALiBi slopes, the sinusoidal inv_freq, the local block layout) are
checked against their formula: a checkpoint whose buffers say otherwise was not made by the NeoX
this reads. The HF family, which NeoX does not record, is the first registered one whose class
computes the model exactly (archs.family_for; `custom` otherwise), unless neoxconv.json or
--arch names it.
"""

from __future__ import annotations

import torch

from neoxconv import archs
from neoxconv.errors import DamagedInput, NeoxconvError
from neoxconv.formats import neox_schema as schema_names
from neoxconv.formats.neox_files import NeoxFiles, detect_schema, qkv_layout_for
from neoxconv.spec import ModelSpec

SPARSE_TYPES = ("sparse_fixed", "sparse_variable", "bigbird", "bslongformer")
NOT_ATTENTION = ("gmlp", "amlp", "mamba", "rwkv")
NORM_EPS = {"layernorm": ("layernorm_epsilon", 1e-5), "non_parametric_layernorm": ("layernorm_epsilon", 1e-5),
            "rmsnorm": ("rms_norm_epsilon", 1e-8), "scalenorm": ("scalenorm_epsilon", 1e-8)}
# NeoX `activation` -> ModelSpec activation (GELU by its variant: see _activation)
PLAIN = ("relu", "softsign", "swish", "mish", "silu")
TE_MODULES = ("te_columnparallel", "te_rowparallel", "te_layernorm_mlp", "te_mha", "te_fp8_mha")
GATED = ("swiglu", "geglu", "reglu", "glu", "bilinear")


def _flag(a: dict, key: str) -> bool:
    v = a.get(key)
    if isinstance(v, dict):
        v = v.get("enabled", False)
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def refuse_unsupported(a: dict, where) -> None:
    """What GPT-NeoX computes that neoxconv does not export (docs/custom-export.md §5)."""
    refusals = [
        (a.get("pos_emb") == "rpe", "pos_emb: rpe (T5 relative position bias, one module shared by all layers)"),
        (_flag(a, "use_mup"), "use_mup (muP: attention scale 1/d on non-flash layers, output and embedding "
                              "multipliers)"),
        (int(a.get("moe_num_experts") or 1) > 1, f"moe_num_experts: {a.get('moe_num_experts')} (mixture of experts)"),
        (_flag(a, "soft_prompt_tuning"), "soft_prompt_tuning (trained soft tokens shift the layer indices)"),
        (str(a.get("norm", "")).startswith("te_"), f"norm: {a.get('norm')} (Transformer Engine modules)"),
        (a.get("train_impl") == "rm", "train_impl: rm (a reward model with an rm_linear head, not a causal LM)"),
        (a.get("output_layer_parallelism") == "row", "output_layer_parallelism: row (NeoX itself exits on it)"),
        (_flag(a, "onnx_safe") and _flag(a, "bias_gelu_fusion"), "onnx_safe with bias_gelu_fusion (NeoX refuses "
                                                                 "the combination)"),
    ]
    te = [k for k in TE_MODULES if _flag(a, k)]
    refusals.append((bool(te), f"{', '.join(te)} (Transformer Engine modules)"))
    for refused, what in refusals:
        if refused:
            raise NeoxconvError(f"{where}: {what} is not supported")


def attention_types(args: dict, layers: int, where="") -> tuple[str, ...]:
    """Per-layer attention types from NeoX's `attention_config` ([[types], count] items, each
    pattern repeated `count` times, or "all" to fill; default global everywhere; NeoX's
    expand_attention_types). Sparse layouts and non-attention layers are refused by name."""
    config = args.get("attention_config") or [[["global"], layers]]
    if all(isinstance(x, str) for x in config):
        types = list(config)
    else:
        types = []
        for item in config:
            pattern, count = item
            pattern = [pattern] if isinstance(pattern, str) else list(pattern)
            if count == "all":
                types = pattern * (layers // len(pattern))
                break
            types += pattern * int(count)
    for t in types:
        if t in SPARSE_TYPES:
            raise NeoxconvError(f"{where}: attention_config uses {t} attention, block-sparse with global/random blocks "
                                "(DeepSpeed), which neoxconv does not export (supported: global, flash, local)")
        if t in NOT_ATTENTION:
            raise NeoxconvError(f"{where}: attention_config uses {t} layers, which are not attention layers; neoxconv "
                                "exports dense transformers (supported: global, flash, local)")
        if t not in ("global", "flash", "local"):
            raise NeoxconvError(f"{where}: attention_config uses {t!r} attention, which NeoX does not know")
    if len(types) != layers:
        raise NeoxconvError(f"{where}: attention_config gives {len(types)} layer types for {layers} layers")
    return tuple(types)


def hf_sliding_window(args: dict, layers: int, where) -> int | None:
    """HF `sliding_window` (keys a query sees) for a NeoX config.

    NeoX trains every layer with `sliding_window_width` W: global layers through the attention
    mask (megatron/utils.py get_attn_mask: triu(tril(1), diagonal=-W)), flash layers through
    flash-attn's window_size=(W, -1), local layers through the sparse softmax's mask. All let a
    query see itself and W earlier keys, W + 1 keys; transformers' `sliding_window` counts the
    query itself, so NeoX W <-> HF W + 1.
    """
    attention_types(args, layers, where)
    width = args.get("sliding_window_width")
    if not width:
        return None
    return int(width) + 1


def _activation(a: dict, act: str, where) -> str:
    if act == "gelu":
        return "gelu_tanh" if _flag(a, "bias_gelu_fusion") else "gelu_onnx" if _flag(a, "onnx_safe") else "gelu"
    if act not in PLAIN + GATED:
        raise NeoxconvError(f"{where}: activation {act!r} is not a NeoX activation (known: gelu, "
                            f"{', '.join(PLAIN + GATED)})")
    return act


def _norm_kind(a: dict, layer: dict, where) -> str:
    """The norm the stored tensors show (shapes win); the YAML's when a layer stores none."""
    declared = a.get("norm", "layernorm")
    if declared not in NORM_EPS:
        raise NeoxconvError(f"{where}: norm {declared!r} is not a NeoX norm (known: {', '.join(NORM_EPS)})")
    for suffix, kind in ((".scale", "rmsnorm"), (".g", "scalenorm"), (".weight", "layernorm")):
        if f"input_layernorm{suffix}" in layer:
            if "norm" in a and declared != kind:
                raise NeoxconvError(f"{where}: norm {declared!r} in the config, but the layers store {kind} tensors "
                                    f"(input_layernorm{suffix})")
            return kind
    return declared


def _positions(a: dict, emb: dict, layer: dict, where) -> str:
    """The position embedding the stored tensors show; the YAML's when they show none (NeoX's
    default, learned, stores a table: a YAML without pos_emb and without a table is rotary, as
    neoxconv 0.1 read it)."""
    stored = [kind for kind, has in (("learned", "position_embeddings.weight" in emb),
                                     ("sinusoidal", schema_names.SINUSOIDAL_BUFFER in emb),
                                     ("alibi", schema_names.ALIBI_BUFFER in layer)) if has]
    declared = a.get("pos_emb")
    if declared not in (None, "rotary", "alibi", "learned", "sinusoidal", "none"):
        raise NeoxconvError(f"{where}: pos_emb {declared!r} is not a NeoX position embedding")
    if stored and declared not in (None, stored[0]):
        raise NeoxconvError(f"{where}: pos_emb is {declared!r}, but the checkpoint stores {stored[0]} position tensors")
    if declared in ("learned", "sinusoidal") and not stored:
        raise NeoxconvError(f"{where}: pos_emb is {declared!r}, but the embedding stores no position_embeddings tensor")
    return stored[0] if stored else declared or "rotary"


def check_buffers(nf: NeoxFiles, spec: ModelSpec) -> None:
    """NeoX's saved buffers must be what its code computes for this config (then they are dropped)."""
    tp = nf.tp

    def check(idx: int, name: str, expected) -> None:
        for r, st in enumerate(nf.rank_states(idx)):
            t = st.get(name)
            want = expected(r, t.dtype) if t is not None else None
            if t is None or t.shape != want.shape or not torch.equal(t, want):
                raise NeoxconvError(f"{nf.file_for(idx, r)}: buffer {nf.stored_name(idx, name)} "
                                    f"{'is missing' if t is None else 'differs from what NeoX computes'} for this "
                                    f"config ({spec.position} positions, {spec.heads} heads, TP {tp}, "
                                    f"local block {spec.local_block} x {spec.local_blocks})")

    if spec.position == "sinusoidal":
        check(0, schema_names.SINUSOIDAL_BUFFER, lambda r, dt: schema_names.sinusoidal_inv_freq(spec.hidden, dt))
    if spec.position == "alibi":
        check(2, schema_names.ALIBI_BUFFER, lambda r, dt: schema_names.alibi_rank_slopes(spec.heads, tp, r, dt))
    if spec.local_layers:
        idx = spec.local_layers[0] + 2
        blocks = nf.rank_states(idx)[0][schema_names.LOCAL_LAYOUT].shape[-1]
        seq = nf.args.get("seq_length")
        if seq and int(seq) != blocks * spec.local_block:
            raise NeoxconvError(f"{nf.file_for(idx)}: the local block layout has {blocks} blocks, but seq_length {seq} "
                                f"/ block {spec.local_block} gives {int(seq) // spec.local_block}")
        check(idx, schema_names.LOCAL_LAYOUT,
              lambda r, dt: schema_names.local_layout(spec.heads // tp, blocks, spec.local_blocks))


def spec_from_neox(nf: NeoxFiles, family: str | None, qkv_layout: str | None, vocab_size: int | None,
                   recorded_layout: str | None = None) -> tuple[ModelSpec, str, str]:
    a = nf.args
    where = nf.tag_dir
    refuse_unsupported(a, where)
    if "num_attention_heads" not in a:
        raise NeoxconvError(f"{where}: num_attention_heads is unknown: no NeoX YAML in configs/; pass --config FILE")
    emb = nf.records(0)[0]  # names, shapes and dtypes from the file headers
    tp = nf.tp
    layer = nf.records(2)[0]
    schema = detect_schema(set(layer), str(nf.file_for(2)))
    act_name = a.get("activation", "gelu")
    if "mlp.w1.weight" in layer:  # LLaMAParallelMLP (`mlp_type: llama`): w2(act(w1 x) * w3 x)
        # Legacy Llama YAMLs say `activation: silu` (gated by mlp_type, not by the name).
        if act_name not in ("silu", "swish", "swiglu"):
            raise NeoxconvError(f"{where}: legacy Llama MLP (mlp.w1/w3) with activation {act_name!r}; only "
                                "silu is supported")
        act_name = "swiglu"
    activation = _activation(a, act_name, where)
    norm = _norm_kind(a, layer, where)
    position = _positions(a, emb, layer, where)
    types = attention_types(a, nf.num_layers, where)
    vocab_rows = emb["word_embeddings.weight"].shape[0] * tp
    hidden = emb["word_embeddings.weight"].shape[1]
    heads = int(a["num_attention_heads"])
    kv = int(a.get("num_kv_heads") or heads)
    d = hidden // heads
    qkv_rows = layer["attention.query_key_value.weight"].shape[0] * tp
    if qkv_rows != (heads + 2 * kv) * d:
        raise DamagedInput(f"{nf.file_for(2)}: query_key_value has {qkv_rows} rows over {tp} rank(s); "
                           f"{heads} heads / {kv} KV heads of size {d} need {(heads + 2 * kv) * d}")
    layout = qkv_layout_for(heads, kv, schema, declared=qkv_layout, recorded=recorded_layout, where=where)
    down = layer.get("mlp.linear2.weight", layer.get("mlp.dense_4h_to_h.weight", layer.get("mlp.w2.weight")))
    gated = activation in GATED
    if gated and "mlp.linear1.weight" in layer and layer["mlp.linear1.weight"].shape[0] != 2 * down.shape[1]:
        # current ParallelMLP rounds F1 and F2 separately; they can disagree (§5.3 edge case)
        raise DamagedInput(f"{nf.file_for(2)}: gated mlp.linear1 has {layer['mlp.linear1.weight'].shape[0]} rows per "
                           f"rank, not twice mlp.linear2's {down.shape[1]} columns")
    qk_norm = _flag(a, "use_qk_layernorm")
    # QK-norm over [heads per rank, head_dim]: LayerNorm kinds (and apex's fused RMSNorm) reduce
    # over both dims, NeoX's RMSNorm and ScaleNorm over head_dim only (doc §4).
    spans_heads = norm in ("layernorm", "non_parametric_layernorm") or (norm == "rmsnorm"
                                                                       and _flag(a, "rmsnorm_fusion"))
    parallel = _flag(a, "gpt_j_residual")
    eps_key, eps_default = NORM_EPS[norm]
    window = hf_sliding_window(a, nf.num_layers, where)
    sparsity = a.get("sparsity_config") or {}
    spec = ModelSpec(
        family="custom",
        hidden=hidden,
        layers=nf.num_layers,
        heads=heads,
        kv_heads=kv,
        intermediate=down.shape[1] * tp,
        vocab_rows=vocab_rows,
        vocab_size=min(vocab_size or vocab_rows, vocab_rows),
        norm=norm,
        norm_eps=float(a.get(eps_key, eps_default)),
        activation=activation,
        rotary_pct=float(a.get("rotary_pct", 1.0)),
        rotary_base=float(a.get("rotary_emb_base", 10000)),
        parallel_residual=parallel,
        tied=(nf.num_layers + 4) not in nf.indices,
        attn_bias="attention.query_key_value.bias" in layer,
        mlp_bias=any(k.startswith("mlp.") and k.endswith(".bias") for k in layer),
        max_positions=int(emb["position_embeddings.weight"].shape[0] if position == "learned"
                          else a.get("max_position_embeddings") or a.get("seq_length") or 2048),
        sliding_window=window,
        dtype=str(emb["word_embeddings.weight"].dtype).removeprefix("torch."),
        position=position,
        # the offset moves learned positions only; the multiplier scales learned and sinusoidal ones
        position_offset=int(a.get("opt_pos_emb_offset") or 0) if position == "learned" else 0,
        position_multiplier=float(a.get("mup_rp_embedding_mult", 1.0)) if position in ("learned", "sinusoidal")
        else 1.0,
        qk_norm=qk_norm,
        qk_norm_group=heads // tp if qk_norm and spans_heads else 1,
        attention_types=types,
        local_block=int(sparsity.get("block", 16)),
        local_blocks=int(sparsity.get("num_local_blocks", sparsity.get("num_sliding_window_blocks", 4))),
        parallel_norms_tied=parallel and _flag(a, "gpt_j_tied"),
    )
    schema_names.check_buildable(spec, schema)
    check_buffers(nf, spec)
    spec = spec.replace(family=family or archs.family_for(spec))
    return spec, schema, layout


def tokenizer_size(nf: NeoxFiles) -> int | None:
    """The real vocabulary size from the tokenizer the NeoX config names (None when it has none)."""
    from neoxconv.tokenizer import find_neox_tokenizer
    from neoxconv.tokenizer import tokenizer_size as size_of

    path = find_neox_tokenizer(nf.args, nf.tag_dir)
    return size_of(path) if path else None
