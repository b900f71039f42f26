"""A NeoX checkpoint's config and tensor shapes -> ModelSpec (shapes win, T10).

Also the NeoX config facts a reader needs beyond the spec: the per-layer attention types, the
sliding window as Hugging Face counts it, and the real vocabulary from the tokenizer. The HF
family, which NeoX does not record, is the first registered one that holds the model
(archs.family_for), unless neoxconv.json or --arch names it.
"""

from __future__ import annotations

from neoxconv import archs
from neoxconv.errors import DamagedInput, NeoxconvError
from neoxconv.formats.neox_files import NeoxFiles, detect_schema, qkv_layout_for
from neoxconv.spec import ModelSpec


def attention_types(args: dict, layers: int) -> list[str]:
    """Per-layer attention types from NeoX's `attention_config` ([[types], count] items, each
    pattern repeated `count` times, or "all" to fill; default global everywhere)."""
    config = args.get("attention_config") or [[["global"], layers]]
    if all(isinstance(x, str) for x in config):
        return list(config)
    out: list[str] = []
    for types, count in config:
        if count == "all":
            return list(types) * (layers // len(types))
        out += list(types) * int(count)
    return out


def hf_sliding_window(args: dict, layers: int, where) -> int | None:
    """HF `sliding_window` (keys a query sees) for a NeoX config.

    NeoX trains every layer with `sliding_window_width` W: global layers through the attention
    mask (megatron/utils.py get_attn_mask: triu(tril(1), diagonal=-W)), flash layers through
    flash-attn's window_size=(W, -1). Both let a query see itself and W earlier keys, W + 1
    keys; transformers' `sliding_window` counts the query itself, so NeoX W <-> HF W + 1.
    Attention types other than global and flash (sparse, gmlp, mamba, ...) are refused: no
    Hugging Face class computes them.
    """
    other = sorted({t for t in attention_types(args, layers) if t not in ("global", "flash")})
    if other:
        raise NeoxconvError(f"{where}: attention_config uses {', '.join(other)} attention, which no Hugging Face model "
                            "class computes (supported: global, flash)")
    width = args.get("sliding_window_width")
    if not width:
        return None
    return int(width) + 1


_ACT = {"gelu": "gelu", "relu": "relu", "swiglu": "silu"}


def spec_from_neox(nf: NeoxFiles, family: str | None, qkv_layout: str | None, vocab_size: int | None,
                   recorded_layout: str | None = None) -> tuple[ModelSpec, str, str]:
    a = nf.args
    where = nf.tag_dir
    emb = nf.records(0)  # shapes and names from the file headers
    if "position_embeddings.weight" in emb[0]:
        raise NeoxconvError(f"{nf.file_for(0)}: learned position embeddings are not supported (only rotary)")
    if a.get("pos_emb", "rotary") != "rotary":
        raise NeoxconvError(f"{where}: pos_emb {a['pos_emb']!r} is not supported (only rotary)")
    for key, bad in (("gpt_j_tied", True), ("use_qk_layernorm", True), ("use_mup", True)):
        if a.get(key) == bad:
            raise NeoxconvError(f"{where}: `{key}: {bad}` is not supported (Hugging Face has no equivalent)")
    if int(a.get("moe_num_experts") or 1) > 1:
        raise NeoxconvError(f"{where}: mixture-of-experts checkpoints are not supported")
    if "num_attention_heads" not in a:
        raise NeoxconvError(f"{where}: num_attention_heads is unknown: no NeoX YAML in configs/; pass --config FILE")
    tp = nf.tp
    layer = nf.records(2)[0]
    schema = detect_schema(set(layer), str(nf.file_for(2)))
    act_name = a.get("activation", "gelu")
    llama_legacy = "mlp.w1.weight" in layer  # LLaMAParallelMLP (`mlp_type: llama`): w2(act(w1 x) * w3 x)
    if llama_legacy:
        # Legacy Llama YAMLs say `activation: silu` (gated by mlp_type, not by the name).
        if act_name not in ("silu", "swish", "swiglu"):
            raise NeoxconvError(f"{where}: legacy Llama MLP (mlp.w1/w3) with activation {act_name!r}; only "
                                "silu is supported")
        act_name = "swiglu"
    if act_name not in _ACT:
        raise NeoxconvError(f"{where}: activation {act_name!r} is not supported (supported: {', '.join(_ACT)})")
    activation = _ACT[act_name]
    if activation == "gelu" and a.get("bias_gelu_fusion"):
        activation = "gelu_tanh"
    declared_norm = a.get("norm", "layernorm")
    if declared_norm not in ("layernorm", "rmsnorm"):
        raise NeoxconvError(f"{where}: norm {declared_norm!r} is not supported (supported: layernorm, rmsnorm)")
    norm_kind = "rmsnorm" if "input_layernorm.scale" in layer else "layernorm"
    vocab_rows = emb[0]["word_embeddings.weight"].shape[0] * tp
    hidden = emb[0]["word_embeddings.weight"].shape[1]
    heads = int(a["num_attention_heads"])
    kv = int(a.get("num_kv_heads") or heads)
    d = hidden // heads
    qkv_rows = layer["attention.query_key_value.weight"].shape[0] * tp
    if qkv_rows != (heads + 2 * kv) * d:
        raise DamagedInput(f"{nf.file_for(2)}: query_key_value has {qkv_rows} rows over {tp} rank(s); "
                           f"{heads} heads / {kv} KV heads of size {d} need {(heads + 2 * kv) * d}")
    layout = qkv_layout_for(heads, kv, schema, declared=qkv_layout, recorded=recorded_layout, where=where)
    down = layer.get("mlp.linear2.weight", layer.get("mlp.dense_4h_to_h.weight", layer.get("mlp.w2.weight")))
    gated = act_name == "swiglu"
    if gated and "mlp.linear1.weight" in layer and layer["mlp.linear1.weight"].shape[0] != 2 * down.shape[1]:
        # current ParallelMLP rounds F1 and F2 separately; they can disagree (§5.3 edge case)
        raise DamagedInput(f"{nf.file_for(2)}: gated mlp.linear1 has {layer['mlp.linear1.weight'].shape[0]} rows per "
                           f"rank, not twice mlp.linear2's {down.shape[1]} columns")
    rms = norm_kind == "rmsnorm"
    has_mlp_bias = any(k.startswith("mlp.") and k.endswith(".bias") for k in layer)
    if a.get("gpt_j_residual") and not has_mlp_bias:
        # NeoX's GPT-J path without an MLP bias returns mlp_output alone (transformer.py, since
        # e37ad2f0): such a model was trained without its attention output, which no HF model
        # computes. Refuse rather than export a different network.
        raise NeoxconvError(f"{where}: gpt_j_residual without MLP biases: NeoX computes these layers without their "
                            "attention output (a NeoX quirk), which Hugging Face models cannot reproduce")
    window = hf_sliding_window(a, nf.num_layers, where)
    fam = family or archs.family_for(gated=gated, rmsnorm=rms, sliding_window=bool(window))
    tied = (nf.num_layers + 4) not in nf.indices
    eps = float(a.get("rms_norm_epsilon", 1e-8)) if rms else float(a.get("layernorm_epsilon", 1e-5))
    spec = ModelSpec(
        family=fam,
        hidden=hidden,
        layers=nf.num_layers,
        heads=heads,
        kv_heads=kv,
        intermediate=down.shape[1] * tp,
        vocab_rows=vocab_rows,
        vocab_size=min(vocab_size or vocab_rows, vocab_rows),
        norm=norm_kind,
        norm_eps=eps,
        activation=activation,
        rotary_pct=float(a.get("rotary_pct", 1.0)),
        rotary_base=float(a.get("rotary_emb_base", 10000)),
        parallel_residual=bool(a.get("gpt_j_residual", False)),
        tied=tied,
        attn_bias="attention.query_key_value.bias" in layer,
        mlp_bias=any(k.startswith("mlp.") and k.endswith(".bias") for k in layer),
        max_positions=int(a.get("max_position_embeddings") or a.get("seq_length") or 2048),
        sliding_window=window,
        dtype=str(emb[0]["word_embeddings.weight"].dtype).removeprefix("torch."),
    )
    return spec, schema, layout


def tokenizer_size(nf: NeoxFiles) -> int | None:
    """The real vocabulary size from the tokenizer the NeoX config names (None when it has none)."""
    from neoxconv.tokenizer import find_neox_tokenizer
    from neoxconv.tokenizer import tokenizer_size as size_of

    path = find_neox_tokenizer(nf.args, nf.tag_dir)
    return size_of(path) if path else None
