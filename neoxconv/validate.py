"""Spec-level checks: does every tensor have the shape the ModelSpec implies?

Every reader calls them before it returns (formats/neox_read.py `check_neox`, formats/hf.py and
formats/meta_llama.py `check_canonical`), so every command that reads a checkpoint (conversions,
parity, train-check, inspect, export-run, verify) refuses the same damage. NeoX is checked per
stored rank (below); HF and Meta on the canonical tensors (`canonical_shapes`: every tensor whose
shape the config fixes). HF and Meta readers take hidden size, MLP size and vocab rows from the
first layer's tensors; the HF reader first compares those tensors with the sizes config.json
states (`check_hf_sizes`), so a damaged first layer is named as such rather than through the
layers it then contradicts (Meta: params.json's dim and the layers' common MLP size), and
`check_hf_config` refuses values that mean nothing (`hidden_size: 0`) before any tensor is read.

NeoX, per stored rank:

The storage layer (formats/neox_files.py) already proves that all TP ranks hold the same
names, shapes and dtypes, and that every layer stores what the first layer stores. What it
cannot see is damage that is the same everywhere: both ranks' `attention.dense.weight` one
column short, say. This module compares one rank's stored shapes with what the spec implies,
from an independent table of NeoX's own module shapes (neox-formats.md §2.1; NeoX's
ParallelSelfAttention / ParallelMLP / embedding constructors), not from the converter's code,
so that a converter bug and this check cannot agree by construction.

`neox_mismatch(spec, tp, schema, idx, shapes)` is a pure function: the spec of the model, the
TP degree, the naming schema ("current"/"legacy"), the spec index (embedding 0, layer i at
i+2, final norm L+3, head L+4) and one rank's stored {name: shape}; it returns the first
mismatch as text, or None.
"""

from __future__ import annotations

from neoxconv.spec import ModelSpec

# Tolerated in any shape: buffers, recomputed from the config (the reader checks the ALiBi slopes,
# sinusoidal inv_freq and local block layout against it; the stale legacy rotary one is ignored).
_ANY_SHAPE = ("attention.rotary_emb.inv_freq", "attention.alibi_embed.slopes", "attention.sparse_attn.master_layout",
              "position_embeddings.inv_freq")


def _norm(prefix: str, spec: ModelSpec, shape: tuple[int, ...] | None = None) -> dict[str, tuple[int, ...]]:
    """A NeoX norm's stored tensors over `shape` (default [hidden]); ScaleNorm keeps one gain."""
    shape = shape or (spec.hidden,)
    if spec.norm == "rmsnorm":
        return {f"{prefix}.scale": shape}
    if spec.norm == "scalenorm":
        return {f"{prefix}.g": (1,)}
    if spec.norm == "non_parametric_layernorm":
        return {}
    return {f"{prefix}.weight": shape, f"{prefix}.bias": shape}


def _mlp(spec: ModelSpec, tp: int, schema: str) -> dict[str, tuple[int, ...]]:
    h, f = spec.hidden, spec.intermediate // tp
    out: dict[str, tuple[int, ...]] = {}
    if schema == "legacy" and spec.gated:  # LLaMAParallelMLP: w2(act(w1 x) * w3 x), no biases
        return {"mlp.w1.weight": (f, h), "mlp.w3.weight": (f, h), "mlp.w2.weight": (h, f)}
    up, down = ("mlp.linear1", "mlp.linear2") if schema == "current" else ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    out[f"{up}.weight"] = ((2 if spec.gated else 1) * f, h)  # gated linear1 holds [up; gate] per rank
    out[f"{down}.weight"] = (h, f)
    if spec.mlp_bias:
        out[f"{up}.bias"] = ((2 if spec.gated else 1) * f,)
        out[f"{down}.bias"] = (h,)
    return out


def neox_rank_shapes(spec: ModelSpec, tp: int, schema: str, idx: int) -> dict[str, tuple[int, ...]]:
    """The stored {name: shape} of spec index `idx` on one of `tp` ranks."""
    h, d, rows = spec.hidden, spec.head_dim, spec.vocab_rows // tp
    if idx == 0:
        table = {"position_embeddings.weight": (spec.max_positions, h)} if spec.position == "learned" else {}
        return {"word_embeddings.weight": (rows, h), **table}
    if idx == spec.layers + 3:
        return _norm("norm", spec)
    if idx == spec.layers + 4:
        return {"final_linear.weight": (rows, h)}
    if not 2 <= idx < spec.layers + 2:
        return {}
    qkv = (spec.heads + 2 * spec.kv_heads) * d // tp  # every QKV layout holds these rows per rank
    out = {**_norm("input_layernorm", spec), **_norm("post_attention_layernorm", spec),
           "attention.query_key_value.weight": (qkv, h), "attention.dense.weight": (h, spec.heads * d // tp)}
    if spec.attn_bias:
        out["attention.query_key_value.bias"] = (qkv,)
        out["attention.dense.bias"] = (h,)
    if spec.qk_norm:
        out.update(_norm("attention.qk_layernorm", spec, (spec.heads // tp, d)))
    return {**out, **_mlp(spec, tp, schema)}


def _what(spec: ModelSpec, idx: int) -> str:
    if idx == 0:
        return "the embedding"
    if idx == spec.layers + 3:
        return "the final norm"
    if idx == spec.layers + 4:
        return "the output layer"
    return f"layer {idx - 2}"


def neox_mismatch(spec: ModelSpec, tp: int, schema: str, idx: int, shapes: dict[str, tuple[int, ...]],
                  rank: int | None = None, name_of=str) -> str | None:
    """The first stored tensor of one rank whose shape (or presence) contradicts the spec, as
    "tensor NAME of layer i [on TP rank r] is [..], expected [..] (the spec)"; None when all
    agree. `name_of` spells a name as its file holds it (e.g. with `sequential.N.`)."""
    want = neox_rank_shapes(spec, tp, schema, idx)
    on = f" on TP rank {rank}" if rank is not None else ""
    why = (f"{spec.heads} heads, {spec.kv_heads} KV heads, hidden {spec.hidden}, MLP {spec.intermediate}, "
           f"vocab rows {spec.vocab_rows}, TP {tp}")
    for name in sorted(want):
        if name not in shapes:
            return f"tensor {name_of(name)} of {_what(spec, idx)} is missing{on} ({why})"
        if tuple(shapes[name]) != want[name]:
            return (f"tensor {name_of(name)} of {_what(spec, idx)}{on} is {list(shapes[name])}, expected "
                    f"{list(want[name])} ({why})")
    for name in sorted(shapes):
        if name not in want and name not in _ANY_SHAPE and not name.endswith("._extra_state"):
            return f"unexpected tensor {name_of(name)} in {_what(spec, idx)}{on} ({why})"
    return None


def canonical_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """{canonical name: shape} the spec implies (tensormap.py's table)."""
    h, d, f, rows = spec.hidden, spec.head_dim, spec.intermediate, spec.vocab_rows
    params = {"rmsnorm": ("weight",), "scalenorm": ("weight",), "non_parametric_layernorm": ()}.get(
        spec.norm, ("weight", "bias"))
    norm_shape = (1,) if spec.norm == "scalenorm" else (h,)
    out: dict[str, tuple[int, ...]] = {"embed.weight": (rows, h)}
    if spec.position == "learned":
        out["embed.positions.weight"] = (spec.max_positions, h)
    out.update({f"final_norm.{p}": norm_shape for p in params})
    if not spec.tied:
        out["lm_head.weight"] = (rows, h)
    for i in range(spec.layers):
        layer = {f"{n}.{p}": norm_shape for n in ("attn_norm", "mlp_norm") for p in params}
        if spec.qk_norm:  # [heads, head_dim]; ScaleNorm: one gain per head
            layer.update({f"attn.qk_norm.{p}": (spec.heads,) if spec.norm == "scalenorm" else (spec.heads, d)
                          for p in params})
        layer.update({"attn.q.weight": (spec.heads * d, h), "attn.k.weight": (spec.kv_heads * d, h),
                      "attn.v.weight": (spec.kv_heads * d, h), "attn.o.weight": (h, spec.heads * d),
                      "mlp.up.weight": (f, h), "mlp.down.weight": (h, f)})
        if spec.attn_bias:
            layer.update({"attn.q.bias": (spec.heads * d,), "attn.k.bias": (spec.kv_heads * d,),
                          "attn.v.bias": (spec.kv_heads * d,), "attn.o.bias": (h,)})
        if spec.gated:
            layer["mlp.gate.weight"] = (f, h)
        if spec.mlp_bias:
            layer.update({"mlp.up.bias": (f,), "mlp.down.bias": (h,), **({"mlp.gate.bias": (f,)} if spec.gated else {})})
        out.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    return out


def check(ckpt) -> None:
    """The spec-level check of a checkpoint just read: NeoX per stored rank, others canonically."""
    if ckpt.info.get("format") == "neox" and ckpt.info.get("files") is not None:
        check_neox(ckpt)
    else:
        check_canonical(ckpt)


# HF config.json: keys that must be positive integers, non-negative numbers, positive numbers
# (when present and not null).
_HF_POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
                     "max_position_embeddings", "num_attention_heads", "num_key_value_heads",
                     "local_block_size", "local_window_blocks", "qk_norm_group_heads")  # the last three: custom
_HF_NON_NEGATIVE = ("layer_norm_eps", "rms_norm_eps", "layer_norm_epsilon", "norm_eps")
_HF_POSITIVE = ("rope_theta", "rotary_emb_base", "rotary_base")


def check_hf_config(cfg: dict, where) -> None:
    """Refuse config.json values that mean nothing (NeoxconvError naming the file and the key)."""
    from neoxconv.errors import NeoxconvError

    rope = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    for key in _HF_POSITIVE_INTS:
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise NeoxconvError(f"{where}: {key} must be a positive integer, got {value!r}")
    for key, low, what in [(k, 0, "a non-negative number") for k in _HF_NON_NEGATIVE] + \
                          [(k, None, "a positive number") for k in _HF_POSITIVE]:
        for value in (cfg.get(key), rope.get(key)):
            bad = isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                or (value < low if low is not None else value <= 0)
            if value is not None and bad:
                raise NeoxconvError(f"{where}: {key} must be {what}, got {value!r}")


def check_hf_sizes(cfg: dict, shapes: dict[str, tuple], where_of, config_file) -> None:
    """Before a spec is made from the first layer's tensors: the layers present are 0..L-1 without a
    gap, and the tensors the sizes are read from (embed.weight, layer 0's MLP) agree with what
    config.json states, so a damaged first layer is named as such (DamagedInput naming the file
    and tensor, or config.json and the key). `where_of(canonical name)` is the file holding it."""
    from neoxconv.errors import DamagedInput

    layers = sorted({int(n.split(".")[1]) for n in shapes if n.startswith("layers.")})
    if not layers:
        raise DamagedInput(f"{config_file.parent}: the weights hold no transformer layer")
    gaps = sorted(set(range(layers[-1] + 1)) - set(layers)) if layers else []
    if gaps:
        raise DamagedInput(f"{config_file.parent}: missing tensors of layer {gaps[0]} (the weights hold layers up to "
                           f"{layers[-1]})")
    stated = cfg.get("num_hidden_layers")
    if isinstance(stated, int) and not isinstance(stated, bool) and stated != len(layers):
        raise DamagedInput(f"{config_file}: num_hidden_layers is {stated}, but the weights hold {len(layers)} layer(s)")
    for key, name, dim in (("vocab_size", "embed.weight", 0), ("hidden_size", "embed.weight", 1),
                           ("intermediate_size", "layers.0.mlp.up.weight", 0)):
        value = cfg.get(key)
        if name in shapes and isinstance(value, int) and not isinstance(value, bool) and shapes[name][dim] != value:
            want = list(shapes[name])
            want[dim] = value
            raise DamagedInput(f"{where_of(name)}: tensor {name} (canonical name) is {list(shapes[name])}, expected "
                               f"{want} ({config_file.name} {key} {value}; the model's sizes are read from it)")


def check_canonical(ckpt) -> None:
    """Every canonical tensor whose shape the spec fixes has that shape; every weight matrix the
    spec implies exists. Raises DamagedInput naming the file(s), tensor, expected and found."""
    from neoxconv.errors import DamagedInput
    from neoxconv.tensormap import group_of

    spec, want = ckpt.spec, canonical_shapes(ckpt.spec)
    have = {name: tuple(ckpt.tensors[name].shape) for name in ckpt.tensors}
    files = ckpt.info.get("group_files") or {}
    path = ckpt.info.get("path", "")
    default = f"{path}/consolidated.*.pth" if ckpt.info.get("format") == "meta" else path
    why = (f"{spec.heads} heads, {spec.kv_heads} KV heads, hidden {spec.hidden}, MLP {spec.intermediate}, "
           f"vocab rows {spec.vocab_rows}")
    for name, shape in want.items():
        where = ", ".join(files.get(group_of(name), [])) or default
        if name not in have and name.endswith(".weight"):
            raise DamagedInput(f"{where}: tensor {name} (canonical name) is missing ({why})")
        if name in have and have[name] != shape:
            raise DamagedInput(f"{where}: tensor {name} (canonical name) is {list(have[name])}, expected "
                               f"{list(shape)} ({why})")


def check_neox(ckpt) -> None:
    """Check every spec index a NeoX reader has seen (its NeoxFiles record), on every rank, against
    the spec the reader made: raises DamagedInput naming file, tensor, rank, expected and found."""
    from neoxconv.errors import DamagedInput

    nf = ckpt.info.get("files")
    if nf is None or ckpt.info.get("format") != "neox":
        return
    spec, schema = ckpt.spec, ckpt.info.get("schema", "current")
    for idx in sorted(nf.stored):
        for rank, stored in enumerate(nf.stored[idx]):
            problem = neox_mismatch(spec, nf.tp, schema, idx, {k: shape for k, (shape, _) in stored.items()},
                                    rank, lambda n, i=idx: nf.stored_name(i, n))
            if problem:
                raise DamagedInput(f"{nf.file_for(idx, rank)}: {problem}")
