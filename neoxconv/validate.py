"""Spec-level checks: does every tensor have the shape the ModelSpec implies?

`check(ckpt)` runs right after a reader (convert, verify): NeoX per stored rank (below), HF and
Meta on the canonical tensors (`canonical_shapes`: every tensor whose shape the config fixes;
HF and Meta readers take hidden size, MLP size and vocab rows from the tensors, so this catches
one layer that disagrees with the others or with the head counts).

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
