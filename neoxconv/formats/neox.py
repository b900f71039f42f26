"""GPT-NeoX checkpoints <-> canonical: names per schema, per-rank fusing, TP split/merge.

Stored names (neox-formats.md §2.1), per transformer layer:

| canonical           | current schema             | legacy schema                          |
|---------------------|----------------------------|----------------------------------------|
| attn_norm           | input_layernorm.*          | same                                   |
| mlp_norm            | post_attention_layernorm.* | same                                   |
| attn.{q,k,v} fused  | attention.query_key_value.*| same                                   |
| attn.o              | attention.dense.*          | same                                   |
| mlp.up (+gate)      | mlp.linear1.* ([up; gate]) | mlp.dense_h_to_4h.* / gated: w3 (up), w1 (gate) |
| mlp.down            | mlp.linear2.*              | mlp.dense_4h_to_h.* / gated: w2        |
| (rotary buffer)     | -                          | attention.rotary_emb.inv_freq          |

Norm params are `weight`/`bias` for LayerNorm and `scale` for RMSNorm.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from neoxconv.checkpoint import Checkpoint
from neoxconv.errors import NeoxconvError
from neoxconv.formats.neox_config import neox_yaml
from neoxconv.formats.neox_files import (SCHEMAS, SIDECAR, NeoxFiles, detect_schema, open_neox, qkv_layout_for,
                                         read_sidecar)
from neoxconv.fusing import QKV_LAYOUTS, fuse_gated, fuse_qkv, split_gated, split_qkv
from neoxconv.io import owned, save_pickle
from neoxconv.reshard import merge, padded_vocab, resize_vocab, role_of, split
from neoxconv.spec import ModelSpec
from neoxconv.tensormap import Group, TensorMap

LAYOUTS = ("pipeline", "sequential")


# ---------------------------------------------------------------------------------------------
# names and per-rank (un)fusing


def _norm_param(spec_norm: str, p: str) -> str:
    return "scale" if spec_norm == "rmsnorm" else p


def _mlp_names(schema: str, gated: bool) -> dict[str, str]:
    if schema == "current":
        return {"in": "mlp.linear1", "down": "mlp.linear2"}
    if gated:
        return {"up": "mlp.w3", "gate": "mlp.w1", "down": "mlp.w2"}
    return {"in": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"}


def layer_to_rank(spec: ModelSpec, t: dict[str, torch.Tensor], tp: int, schema: str, qkv_layout: str,
                  inv_freq: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One rank's stored tensors from that rank's canonical pieces (leaf names, no layers.i.)."""
    out: dict[str, torch.Tensor] = {}
    for canon, stored in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")):
        for p in ("weight", "bias"):
            if f"{canon}.{p}" in t:
                out[f"{stored}.{_norm_param(spec.norm, p)}"] = t[f"{canon}.{p}"]
    for p in ("weight", "bias"):
        if f"attn.q.{p}" in t:
            out[f"attention.query_key_value.{p}"] = fuse_qkv(
                t[f"attn.q.{p}"], t[f"attn.k.{p}"], t[f"attn.v.{p}"], spec.heads // tp, spec.kv_heads // tp, qkv_layout)
    if inv_freq is not None:
        out["attention.rotary_emb.inv_freq"] = inv_freq
    for p in ("weight", "bias"):
        if f"attn.o.{p}" in t:
            out[f"attention.dense.{p}"] = t[f"attn.o.{p}"]
    names = _mlp_names(schema, spec.gated)
    for p in ("weight", "bias"):
        if f"mlp.up.{p}" not in t:
            continue
        if "in" in names:
            out[f"{names['in']}.{p}"] = fuse_gated(t[f"mlp.up.{p}"], t[f"mlp.gate.{p}"]) if spec.gated else t[f"mlp.up.{p}"]
        else:
            out[f"{names['up']}.{p}"] = t[f"mlp.up.{p}"]
            out[f"{names['gate']}.{p}"] = t[f"mlp.gate.{p}"]
    for p in ("weight", "bias"):
        if f"mlp.down.{p}" in t:
            out[f"{names['down']}.{p}"] = t[f"mlp.down.{p}"]
    return out


def rank_to_layer(spec: ModelSpec, s: dict[str, torch.Tensor], tp: int, schema: str, qkv_layout: str) -> dict[str, torch.Tensor]:
    """Inverse of layer_to_rank: canonical pieces of one rank (leaf names)."""
    out: dict[str, torch.Tensor] = {}
    for canon, stored in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")):
        for p in ("weight", "bias"):
            key = f"{stored}.{_norm_param(spec.norm, p)}"
            if key in s and not (spec.norm == "rmsnorm" and p == "bias"):
                out[f"{canon}.{p}"] = s[key]
    for p in ("weight", "bias"):
        key = f"attention.query_key_value.{p}"
        if key in s:
            q, k, v = split_qkv(s[key], spec.heads // tp, spec.kv_heads // tp, qkv_layout)
            out[f"attn.q.{p}"], out[f"attn.k.{p}"], out[f"attn.v.{p}"] = q, k, v
        if f"attention.dense.{p}" in s:
            out[f"attn.o.{p}"] = s[f"attention.dense.{p}"]
    names = _mlp_names(schema, spec.gated)
    for p in ("weight", "bias"):
        if "in" in names and f"{names['in']}.{p}" in s:
            x = s[f"{names['in']}.{p}"]
            if spec.gated:
                out[f"mlp.up.{p}"], out[f"mlp.gate.{p}"] = split_gated(x)
            else:
                out[f"mlp.up.{p}"] = x
        elif "up" in names and f"{names['up']}.{p}" in s:
            out[f"mlp.up.{p}"] = s[f"{names['up']}.{p}"]
            out[f"mlp.gate.{p}"] = s[f"{names['gate']}.{p}"]
        if f"{names['down']}.{p}" in s:
            out[f"mlp.down.{p}"] = s[f"{names['down']}.{p}"]
    return out


def inv_freq(spec: ModelSpec, dtype: torch.dtype) -> torch.Tensor:
    """NeoX's rotary buffer 1/base^(2i/r), computed in fp32, then cast (§4.4)."""
    r = spec.rotary_dims
    return (1.0 / (spec.rotary_base ** (torch.arange(0, r, 2, dtype=torch.float32) / r))).to(dtype)


# ---------------------------------------------------------------------------------------------
# reading


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


def _family(args: dict, gated: bool, rms: bool, window: int | None) -> str:
    if window:
        return "mistral"
    if gated or rms:
        return "llama"
    return "gptneox"


_ACT = {"gelu": "gelu", "relu": "relu", "swiglu": "silu"}


def spec_from_neox(nf: NeoxFiles, family: str | None, qkv_layout: str | None, vocab_size: int | None,
                   recorded_layout: str | None = None) -> tuple[ModelSpec, str, str]:
    a = nf.args
    where = nf.tag_dir
    emb = nf.rank_states(0)
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
    layer = nf.rank_states(2)[0]
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
        raise NeoxconvError(f"{nf.file_for(2)}: query_key_value has {qkv_rows} rows over {tp} rank(s); "
                            f"{heads} heads / {kv} KV heads of size {d} need {(heads + 2 * kv) * d}")
    layout = qkv_layout_for(heads, kv, schema, declared=qkv_layout, recorded=recorded_layout, where=where)
    down = layer.get("mlp.linear2.weight", layer.get("mlp.dense_4h_to_h.weight", layer.get("mlp.w2.weight")))
    gated = act_name == "swiglu"
    if gated and "mlp.linear1.weight" in layer and layer["mlp.linear1.weight"].shape[0] != 2 * down.shape[1]:
        # current ParallelMLP rounds F1 and F2 separately; they can disagree (§5.3 edge case)
        raise NeoxconvError(f"{nf.file_for(2)}: gated mlp.linear1 has {layer['mlp.linear1.weight'].shape[0]} rows per "
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
    fam = family or _family(a, gated, rms, window)
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


def read_neox(path: Path, config_files: list[Path] | None = None, family: str | None = None,
              qkv_layout: str | None = None) -> Checkpoint:
    nf = open_neox(path, config_files)
    extra = read_sidecar(nf.tag_dir)
    vocab_size = extra.get("vocab_size")
    tok = _tokenizer_size(nf)
    if tok:
        vocab_size = tok
    # neoxconv.json also keeps what NeoX's files cannot say: the HF family (a window-less
    # Mistral is a Llama to NeoX) and the HF spelling of the activation.
    spec, schema, layout = spec_from_neox(nf, family or extra.get("family"), qkv_layout, vocab_size,
                                          recorded_layout=extra.get("qkv_layout"))
    nf.qkv_layout = layout
    L, tp = spec.layers, nf.tp

    def check_used(idx: int, states: list[dict[str, torch.Tensor]], used: list[set[str]]) -> None:
        """Every stored tensor must map somewhere: dropping one silently is a wrong export."""
        for r, (sd, keys) in enumerate(zip(states, used, strict=True)):
            left = [k for k in sd if k not in keys and not k.endswith("._extra_state")
                    and k != "attention.rotary_emb.inv_freq"]
            if left:
                raise NeoxconvError(f"{nf.file_for(idx, r)}: tensor {left[0]!r} is not part of a {spec.family} "
                                    f"{'layer' if 2 <= idx < L + 2 else 'checkpoint'} as neoxconv knows it; "
                                    "refusing to drop it")

    def load(group: Group, meta: bool = False) -> dict[str, torch.Tensor]:
        """One group, merged over TP ranks. The shape pass (meta=True) also checks that every
        stored tensor is used, on the same tensors, so the files are read once for both."""
        def states(idx: int, used: set[str] | None = None) -> list[dict[str, torch.Tensor]]:
            s = nf.rank_states(idx)
            if not meta:
                return s
            if used is not None:
                check_used(idx, s, [used] * len(s))
            return [{k: v.to("meta") for k, v in d.items()} for d in s]

        if group == "embed":
            return {"embed.weight": merge([s["word_embeddings.weight"] for s in states(0, {"word_embeddings.weight"})],
                                          "vocab", False)}
        if group == "final":
            norm = states(L + 3, {f"norm.{_norm_param(spec.norm, p)}" for p in ("weight", "bias")})
            out = {}
            for p in ("weight", "bias"):
                key = f"norm.{_norm_param(spec.norm, p)}"
                if key in norm[0] and not (spec.norm == "rmsnorm" and p == "bias"):
                    out[f"final_norm.{p}"] = merge([s[key] for s in norm], "replicated", False)
            if not spec.tied:
                head = states(L + 4, {"final_linear.weight"})
                out["lm_head.weight"] = merge([s["final_linear.weight"] for s in head], "vocab", False)
            return out
        stored = states(group + 2)
        pieces = [rank_to_layer(spec, s, tp, schema, layout) for s in stored]
        if meta:  # the tensors a rank's pieces turn back into are the ones that were used
            check_used(group + 2, stored, [set(layer_to_rank(spec, p, tp, schema, layout)) for p in pieces])
        return {f"layers.{group}.{leaf}": merge([p[leaf] for p in pieces], role_of(f"layers.0.{leaf}"),
                                                 spec.parallel_residual) for leaf in pieces[0]}

    groups: list[Group] = ["embed", *range(L), "final"]
    metas = {g: load(g, meta=True) for g in groups}
    tensors = TensorMap(metas, load)
    info = {"format": "neox", "path": str(nf.tag_dir), "layout": nf.layout, "tp": tp, "pp": nf.pp,
            "iteration": nf.iteration, "schema": schema, "qkv_layout": layout, "neox_args": nf.args,
            "config_files": [str(p) for p in nf.config_files], "files": nf}
    info["vocab_known"] = bool(tok) or bool(extra.get("vocab_known", "vocab_size" in extra))
    if extra.get("hf_hidden_act"):
        info["hf_hidden_act"] = extra["hf_hidden_act"]
    from neoxconv.tokenizer.neox import recorded_settings

    return Checkpoint(spec, tensors, info, text=recorded_settings(extra, nf.args, nf.tag_dir, nf.tag_dir / SIDECAR))


def _tokenizer_size(nf: NeoxFiles) -> int | None:
    try:
        from neoxconv.tokenizer import find_neox_tokenizer, tokenizer_size
    except ImportError:
        return None
    path = find_neox_tokenizer(nf.args, nf.tag_dir)
    return tokenizer_size(path) if path else None


# ---------------------------------------------------------------------------------------------
# writing


def write_neox(ckpt: Checkpoint, out: Path, *, tp: int = 1, pp: int = 1, layout: str = "pipeline",
               schema: str = "current", dtype: torch.dtype | None = None, vocab_multiple: int = 128,
               qkv_layout: str | None = None, progress: Callable[[str], None] | None = None,
               extra_yaml: dict | None = None) -> dict:
    """Write a NeoX checkpoint into `out` (a fresh directory). Streams one group at a time."""
    spec = ckpt.spec
    if layout not in LAYOUTS:
        raise NeoxconvError(f"unknown layout {layout!r} (use pipeline or sequential)")
    if schema not in SCHEMAS:
        raise NeoxconvError(f"unknown NeoX schema {schema!r} (use current or legacy)")
    spec.check_tp(tp)
    if spec.sliding_window is not None and spec.sliding_window < 2:
        raise NeoxconvError(f"a sliding window of {spec.sliding_window} key(s) has no NeoX equivalent (NeoX's window "
                            "always includes the query and at least one earlier key)")
    if vocab_multiple < 1:
        raise NeoxconvError(f"--vocab-multiple must be at least 1, got {vocab_multiple}")
    if schema == "legacy" and not spec.gated and (spec.intermediate != 4 * spec.hidden or not spec.mlp_bias):
        # NeoX before 2024-09 always built dense_h_to_4h as [4h, h] with biases.
        raise NeoxconvError(f"the legacy NeoX MLP is always 4 x hidden ({4 * spec.hidden}) with biases; this model has "
                            f"{spec.intermediate}{'' if spec.mlp_bias else ' without biases'}: use --neox-schema current")
    if pp < 1 or (layout == "sequential" and pp != 1):
        raise NeoxconvError(f"--pp {pp} is not possible with the {layout} layout" if layout == "sequential"
                            else f"--pp must be at least 1, got {pp}")
    if pp > spec.layers:
        raise NeoxconvError(f"--pp {pp} is larger than the {spec.layers} layers")
    if qkv_layout and qkv_layout not in QKV_LAYOUTS:
        raise NeoxconvError(f"unknown --qkv-layout {qkv_layout!r} (known: {', '.join(QKV_LAYOUTS)})")
    if schema == "current" and not spec.gated and spec.intermediate % 2:
        # current ParallelMLP builds linear1 with roundup(I, 2*mlp_multiple_of) rows but linear2
        # with roundup(I, mlp_multiple_of) columns: an odd I cannot be rebuilt (§5.3).
        raise NeoxconvError(f"current NeoX cannot build an MLP of odd size {spec.intermediate}; "
                            "use --neox-schema legacy")
    if schema == "legacy" and spec.gated and spec.mlp_bias:
        raise NeoxconvError("the legacy NeoX Llama MLP (mlp.w1/w2/w3) has no biases, but this model has MLP biases; "
                            "use --neox-schema current")
    if spec.gqa:
        layout_qkv = qkv_layout or ("gqa_fakehead" if schema == "legacy" else "gqa_blocked")
        if layout_qkv == "mha_interleaved":
            raise NeoxconvError(f"--qkv-layout mha_interleaved cannot hold {spec.kv_heads} KV heads for {spec.heads} heads")
    else:
        layout_qkv = "mha_interleaved"  # NeoX reads kv == heads through the MHA path (T8)
    rows = padded_vocab(spec.vocab_size, vocab_multiple, tp)
    # NeoX recomputes the padded vocab from its tokenizer: roundup(V, multiple * TP). When the
    # real vocabulary is unknown (no tokenizer, no record), pin the row count instead, as
    # merge20b.py does: multiple = rows / TP gives exactly `rows` for any tokenizer <= rows.
    vocab_known = ckpt.info.get("vocab_known", True)
    yaml_multiple = vocab_multiple if vocab_known else rows // tp
    out_dtype = dtype or getattr(torch, spec.dtype)
    iteration = int(ckpt.info.get("iteration") or 0)
    tag = f"global_step{iteration}"
    tag_dir = out / tag
    tag_dir.mkdir(parents=True)
    L = spec.layers
    freq = inv_freq(spec, out_dtype) if schema == "legacy" else None
    # The sequential layout keeps a whole rank in one file. To hold only one layer in memory,
    # each layer is first saved as a part file; each rank's file is assembled at the end from
    # memory-mapped parts (page cache, not process memory).
    parts_dir = tag_dir / ".parts"
    part_files: list[list[tuple[int, Path]]] = [[] for _ in range(tp)]

    def emit(idx: int, per_rank: list[dict[str, torch.Tensor]]) -> None:
        for r, sd in enumerate(per_rank):
            sd = {k: owned(v) for k, v in sd.items()}
            if layout == "pipeline":
                save_pickle(sd, tag_dir / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
            else:
                parts_dir.mkdir(exist_ok=True)
                path = parts_dir / f"{idx:03d}-{r:02d}.pt"
                save_pickle(sd, path)
                part_files[r].append((idx, path))

    def cast(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(out_dtype) for k, v in t.items()}

    for group in ckpt.tensors.groups():
        t = cast(ckpt.tensors.load_group(group))
        if group == "embed":
            parts = split(resize_vocab(t["embed.weight"], rows, spec.vocab_size), "vocab", tp, False)
            emit(0, [{"word_embeddings.weight": p} for p in parts])
        elif group == "final":
            norm = {p: split(t[f"final_norm.{p}"], "replicated", tp, False) for p in ("weight", "bias") if f"final_norm.{p}" in t}
            emit(L + 3, [{f"norm.{_norm_param(spec.norm, p)}": v[r] for p, v in norm.items()} for r in range(tp)])
            if not spec.tied:
                parts = split(resize_vocab(t["lm_head.weight"], rows, spec.vocab_size), "vocab", tp, False)
                emit(L + 4, [{"final_linear.weight": p} for p in parts])
        else:
            prefix = f"layers.{group}."
            pieces = {k[len(prefix):]: split(v, role_of(k), tp, spec.parallel_residual) for k, v in t.items()}
            emit(group + 2, [layer_to_rank(spec, {k: v[r] for k, v in pieces.items()}, tp, schema, layout_qkv, freq)
                             for r in range(tp)])
        if progress:
            progress(f"layer {group}" if isinstance(group, int) else str(group))

    _write_mp_rank_files(tag_dir, tp, pp, layout, iteration, part_files)
    if parts_dir.exists():
        parts_dir.rmdir()
    out_spec = spec.replace(vocab_rows=rows, dtype=str(out_dtype).removeprefix("torch."))
    (tag_dir / "configs").mkdir()
    extra_yaml = dict(extra_yaml or {})
    if spec.sliding_window:  # HF W keys = NeoX flash window W - 1 (see hf_sliding_window)
        extra_yaml.setdefault("sliding_window_width", spec.sliding_window - 1)
    yaml_text = neox_yaml(out_spec, tp=tp, pp=pp, layout=layout, vocab_multiple=yaml_multiple, schema=schema,
                          dtype=out_spec.dtype, extra=extra_yaml, source=ckpt.info.get("format", ""))
    (tag_dir / "configs" / "neoxconv.yml").write_text(yaml_text)
    # vocab_size: rows never to trim below (the tokenizer's size, or the source's row count when
    # no tokenizer was known: vocab_known false).
    sidecar = {"vocab_size": spec.vocab_size, "vocab_known": vocab_known, "qkv_layout": layout_qkv,
               "schema": schema, "family": spec.family}
    if ckpt.info.get("hf_hidden_act"):
        sidecar["hf_hidden_act"] = ckpt.info["hf_hidden_act"]
    (tag_dir / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    (out / "latest").write_text(tag)
    return {"tag": tag, "vocab_rows": rows, "qkv_layout": layout_qkv, "spec": out_spec}


def _write_mp_rank_files(tag_dir: Path, tp: int, pp: int, layout: str, iteration: int,
                         parts: list[list[tuple[int, Path]]]) -> None:
    """DeepSpeed's model-states files (§1.4, §1.6): PP*TP with module=None in pipeline mode
    (mp = stage*TP + tp, T2), TP with the `sequential.*` module otherwise."""
    from neoxconv.io import load_pickle

    count = pp * tp if layout == "pipeline" else tp
    for mp in range(count):
        module = None
        if layout == "sequential":
            module = {}
            for idx, path in parts[mp]:
                module.update({f"sequential.{idx}.{k}": v for k, v in load_pickle(path).items()})
        buffers = [k for k in (module or {}) if k.endswith("rotary_emb.inv_freq")]
        state = {
            "module": module,
            "buffer_names": buffers,
            "optimizer": None,
            "lr_scheduler": None,
            "sparse_tensor_module_names": [],
            "skipped_steps": 0,
            "global_steps": iteration,
            "global_samples": 0,
            "dp_world_size": 1,
            "mp_world_size": count,
            "iteration": iteration,
        }
        save_pickle(state, tag_dir / f"mp_rank_{mp:02d}_model_states.pt")
        del module, state
        if layout == "sequential":
            for _, path in parts[mp]:
                path.unlink()
