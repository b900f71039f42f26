"""Raw Meta Llama checkpoints (`params.json` + `consolidated.XX.pth`) <-> canonical.

One `consolidated.{r:02d}.pth` per model-parallel rank of Meta's fairscale model, each a plain
dict of tensors (neox-formats.md §6.3, T18):

| Meta name (per layer `layers.{i}.`) | canonical            | split across shards (the family's role) |
|-------------------------------------|----------------------|------------------------------|
| tok_embeddings.weight               | embed.weight         | dim 1 (Llama 1/2), dim 0 (3) |
| attention.wq / wk / wv.weight       | attn.q / k / v       | dim 0 (column), rotary perm. |
| attention.wo.weight                 | attn.o.weight        | dim 1 (row)                  |
| feed_forward.w1 / w3 / w2.weight    | mlp.gate / up / down | dim 0 / dim 0 / dim 1        |
| attention_norm / ffn_norm.weight    | attn_norm / mlp_norm | replicated                   |
| norm.weight / output.weight         | final_norm / lm_head | replicated / dim 0 (vocab)   |
| rope.freqs                          | (ignored)            |                              |

This module keeps only the names (`*_NAMES`); how shards split each tensor is the role the
model's family declares (archs/llama.py), except Llama 1/2's embedding, which fairscale's
ParallelEmbedding splits on the hidden dim (a row-parallel split, `HIDDEN_SPLIT`).

Rotary: Meta rotates adjacent pairs (x_2i, x_2i+1) as complex numbers; the canonical form is
rotate-half. Per head of d rows in wq (n heads) and wk (n_kv heads), never wv: Meta -> canonical
views the rows [H, d/2, 2, h] and swaps the middle axes; the inverse views [H, 2, d/2, h].

The embedding split is read from the shapes (a shard of width dim/p was split on dim 1).
`params.json`: dim, n_layers, n_heads, n_kv_heads (optional), vocab_size (-1: from the
tensors), multiple_of + ffn_dim_multiplier (FFN size, cross-checked; the shapes win), norm_eps
(default 1e-5 as in Meta's ModelArgs), rope_theta (default 10000), use_scaled_rope (Llama 3.1
RoPE scaling: refused, neither NeoX nor the canonical form can hold it). Meta files carry no
context length: `max_seq_len` is read when present, else 4096 is assumed (it does not change
any weight or logit, only the HF config's max_position_embeddings).

Writing (`write_meta`) makes N shards for Meta's reference code. Style "llama3" (default):
embedding split on dim 0 (VocabParallelEmbedding) and params.json with n_kv_heads and
rope_theta always. Style "llama2": embedding split on dim 1 (ParallelEmbedding) and only the
keys Llama 1/2 code knows (n_kv_heads when GQA, ffn_dim_multiplier when needed, rope_theta only
when it is not 10000, as CodeLlama). The style of a Meta source is kept; other sources get
"llama3". Meta has no vocabulary padding: padded rows are dropped, except that the output
layer is always split on dim 0, so a vocabulary that the shard count does not divide is padded
with zero rows to the next multiple (params.json then says that size).
All shards are written in one pass over the source (neoxconv.plan, neoxconv.pipeline): each
group is split into every shard's file at once, at its planned offset.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from neoxconv import archs
from neoxconv.checkpoint import Checkpoint
from neoxconv.errors import DamagedInput, NeoxconvError
from neoxconv.io import check_finite, read_json, write_json
from neoxconv.lazy import Lazy
from neoxconv.plan import Plan, make_plan, pt_file
from neoxconv.ptio import MappedFile, TensorRecord, index_pt
from neoxconv.roles import ROW, Context, resize_vocab
from neoxconv.spec import ModelSpec
from neoxconv.table import Entry, entries, merge_group, split_group, with_roles
from neoxconv.tensormap import Group, TensorMap
from neoxconv.validate import check_canonical

PARAMS = "params.json"
SHARD_FILE = re.compile(r"^consolidated\.(\d+)\.pth$")
IGNORED = ("rope.freqs",)
STYLES = ("llama3", "llama2")

# Meta name <-> canonical name, per group, in Meta's file order.
EMBED_NAMES = entries(("tok_embeddings.weight", "embed.weight"))
LAYER_NAMES = entries(
    ("layers.{i}.attention_norm.weight",   "layers.{i}.attn_norm.weight"),
    ("layers.{i}.attention.wq.weight",     "layers.{i}.attn.q.weight"),
    ("layers.{i}.attention.wk.weight",     "layers.{i}.attn.k.weight"),
    ("layers.{i}.attention.wv.weight",     "layers.{i}.attn.v.weight"),
    ("layers.{i}.attention.wo.weight",     "layers.{i}.attn.o.weight"),
    ("layers.{i}.ffn_norm.weight",         "layers.{i}.mlp_norm.weight"),
    ("layers.{i}.feed_forward.w1.weight",  "layers.{i}.mlp.gate.weight"),
    ("layers.{i}.feed_forward.w3.weight",  "layers.{i}.mlp.up.weight"),
    ("layers.{i}.feed_forward.w2.weight",  "layers.{i}.mlp.down.weight"),
)
FINAL_NAMES = entries(("norm.weight", "final_norm.weight"), ("output.weight", "lm_head.weight"))
# Llama 1/2 reference code (fairscale ParallelEmbedding) splits the embedding on the hidden dim.
HIDDEN_SPLIT = ROW
EMBED = "tok_embeddings.weight"


# ---------------------------------------------------------------------------------------------
# rotary and FFN size


def meta_to_rotate_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered evens first, then odds: Meta interleaved -> rotate-half."""
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rotate_half_to_meta(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of meta_to_rotate_half."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def ffn_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward hidden size (llama/model.py): int(2*4*dim/3), scaled, rounded up."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_params(dim: int, ffn: int, prefer: dict | None = None) -> dict:
    """`multiple_of` / `ffn_dim_multiplier` that make Meta's formula give exactly `ffn`."""
    candidates = []
    if prefer and "multiple_of" in prefer:
        candidates.append((int(prefer["multiple_of"]), prefer.get("ffn_dim_multiplier")))
    candidates += [(m, None) for m in (256, 1024, 4096, 128, 64, 32, 16, 8, 4, 2, 1)]
    for multiple_of, mult in candidates:
        if ffn_size(dim, multiple_of, mult) == ffn:
            out = {"multiple_of": multiple_of}
            if mult is not None:
                out["ffn_dim_multiplier"] = mult
            return out
    # int(mult * base) lands on ffn or ffn - 1 (float rounding); multiple_of = ffn rounds it to ffn.
    mult = ffn / int(2 * (4 * dim) / 3)
    if ffn_size(dim, ffn, mult) != ffn:
        raise NeoxconvError(f"cannot express an FFN size of {ffn} for dim {dim} with Meta's multiple_of/ffn_dim_multiplier")
    return {"multiple_of": ffn, "ffn_dim_multiplier": mult}


# ---------------------------------------------------------------------------------------------
# reading


def is_meta_dir(path: Path) -> bool:
    return (path / PARAMS).is_file() and any(SHARD_FILE.match(p.name) for p in path.iterdir())


def _shard_files(path: Path) -> list[Path]:
    # Shards are found by listing the directory with a strict name pattern, never from a name a
    # file supplies, so they cannot lie outside it (a symlinked shard is allowed, as in io.inside).
    found = sorted((int(m[1]), path / p.name) for p in path.iterdir() if (m := SHARD_FILE.match(p.name)))
    if not found:
        raise NeoxconvError(f"{path}: no consolidated.XX.pth files next to params.json")
    ranks = [r for r, _ in found]
    if ranks != list(range(len(ranks))):
        raise DamagedInput(f"{path}: consolidated.XX.pth files are not numbered 00..{len(ranks) - 1:02d} (found {ranks})")
    return [f for _, f in found]


def _index_shards(files: list[Path]) -> list[dict[str, TensorRecord]]:
    """Each shard's tensor records, from its zip directory and pickle (no tensor data read)."""
    shards = []
    for f in files:
        sd = index_pt(f).obj
        if not isinstance(sd, dict) or EMBED not in sd:
            raise DamagedInput(f"{f}: not a Meta Llama shard (no {EMBED})")
        shards.append({k: v for k, v in sd.items() if isinstance(v, TensorRecord) and k not in IGNORED})
    keys0 = set(shards[0])
    for f, sd in zip(files[1:], shards[1:]):
        if set(sd) != keys0:
            raise DamagedInput(f"{f}: tensor names differ from {files[0].name} (e.g. {sorted(keys0 ^ set(sd))[0]})")
        for k in sorted(keys0):  # fairscale splits in equal chunks: every shard holds the same shapes
            (a, b) = (shards[0][k], sd[k])
            if a.shape != b.shape or a.dtype != b.dtype:
                raise DamagedInput(f"{f}: tensor {k} is {str(b.dtype)[6:]} {list(b.shape)}, expected "
                                   f"{str(a.dtype)[6:]} {list(a.shape)} as in {files[0].name}")
    return shards


def _check_names(files: list[Path], keys: set[str], n_layers: int) -> None:
    expected = {e.name for e in EMBED_NAMES + FINAL_NAMES}
    expected |= {e.at(i).name for i in range(n_layers) for e in LAYER_NAMES}
    missing, extra = expected - keys, keys - expected
    if missing:
        raise DamagedInput(f"{files[0]}: missing tensor {sorted(missing)[0]} (params.json says {n_layers} layers)")
    if extra:
        raise NeoxconvError(f"{files[0]}: unexpected tensor {sorted(extra)[0]} for a Llama checkpoint")


def _tokenizer(path: Path) -> Path | None:
    # Llama 3 ships tokenizer.model next to the shards; Llama 1/2 downloads one level up.
    for d in (path, path.parent):
        if (d / "tokenizer.model").is_file():
            return d / "tokenizer.model"
    return None


def _names(family: str, hidden_split: bool) -> dict[str, list[Entry]]:
    """The tables per group ("embed", "layer", "final") with the family's roles."""
    where = f"{family} model in Meta Llama names"

    def bind(rows: tuple[Entry, ...]) -> list[Entry]:
        return with_roles(rows, lambda c: archs.role_of(c, family), where)

    embed = bind(EMBED_NAMES)
    if hidden_split:
        embed = [dataclasses.replace(e, role=HIDDEN_SPLIT) for e in embed]
    return {"embed": embed, "layer": bind(LAYER_NAMES), "final": bind(FINAL_NAMES)}


def read_meta(path: Path, family: str | None = None) -> Checkpoint:
    path = Path(path)
    if not (path / PARAMS).is_file():
        raise NeoxconvError(f"{path}: no params.json (not a Meta Llama checkpoint directory)")
    params = read_json(path / PARAMS)
    pfile = path / PARAMS
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise NeoxconvError(f"{pfile}: missing {key!r}")
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads"):
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise NeoxconvError(f"{pfile}: {key} must be a positive integer, got {value!r}")
    if params.get("use_scaled_rope"):
        raise NeoxconvError(f"{pfile}: use_scaled_rope (Llama 3.1 RoPE scaling) is not supported: GPT-NeoX has no RoPE scaling")
    if family not in (None, "llama", "mistral"):
        raise NeoxconvError(f"{path}: a Meta Llama checkpoint cannot be read as {family!r} (use llama)")
    files = _shard_files(path)
    shards = _index_shards(files)
    p = len(shards)
    dim, n_layers, heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
    _check_names(files, set(shards[0]), n_layers)
    if dim % heads:
        raise NeoxconvError(f"{pfile}: dim {dim} is not divisible by n_heads {heads}")
    d = dim // heads

    def rows(name: str) -> int:
        return sum(sd[name].shape[0] for sd in shards)

    q_rows = rows("layers.0.attention.wq.weight")
    if q_rows != dim:  # sizes are read from layer 0: its damage is named here
        raise DamagedInput(f"{files[0]}: tensor layers.0.attention.wq.weight has {q_rows} rows over {p} shard(s), "
                           f"expected {dim} (params.json dim)")
    k_rows = rows("layers.0.attention.wk.weight")
    kv = k_rows // d
    want_kv = int(params.get("n_kv_heads") or heads)
    if k_rows != want_kv * d:
        raise DamagedInput(f"{files[0]}: tensor layers.0.attention.wk.weight has {k_rows} rows over {p} shard(s), "
                           f"expected {want_kv * d} ({want_kv} KV heads (params.json n_kv_heads, default n_heads) "
                           f"of size {d})")
    warnings: list[str] = []
    # The FFN size: params.json's formula when a layer has it, else the layers' common size (not
    # simply layer 0's, so that a damaged layer 0 is the one the shape check names).
    sizes = [rows(f"layers.{i}.feed_forward.w1.weight") for i in range(n_layers)]
    formula = ffn_size(dim, int(params["multiple_of"]), params.get("ffn_dim_multiplier")) \
        if "multiple_of" in params else None
    ffn = formula if formula in sizes else Counter(sizes).most_common(1)[0][0]
    if formula is not None and formula != ffn:
        warnings.append(f"params.json multiple_of/ffn_dim_multiplier give FFN size {formula}, the tensors have "
                        f"{ffn}: using {ffn}")
    vocab = rows("output.weight")
    if int(params.get("vocab_size", -1)) not in (-1, vocab):
        warnings.append(f"params.json vocab_size {params['vocab_size']} differs from the {vocab} rows of output.weight: "
                        f"using {vocab}")
    emb0 = shards[0][EMBED].shape
    if p == 1:
        emb_dim = None
    elif tuple(emb0) == (vocab // p, dim) and vocab % p == 0:
        emb_dim = 0
    elif tuple(emb0) == (vocab, dim // p):
        emb_dim = 1
    else:
        raise DamagedInput(f"{files[0]}: tok_embeddings shard {tuple(emb0)} fits neither a dim-0 split "
                           f"({vocab // p}, {dim}) nor a dim-1 split ({vocab}, {dim // p}) of {p} shards")

    names = _names(family or "llama", hidden_split=emb_dim == 1)
    ctx = Context()

    def load(group: Group, meta: bool = False) -> dict[str, torch.Tensor]:
        rows = names[group] if isinstance(group, str) else [e.at(group) for e in names["layer"]]
        if meta:
            states = [{e.name: Lazy.shape_only(sd[e.name].shape, sd[e.name].dtype) for e in rows} for sd in shards]
        else:  # Lazy rows of each shard, mapped (--check-finite scans the mapping the conversion copies from)
            states = []
            for rank, (f, sd) in enumerate(zip(files, shards, strict=True)):
                mapped = MappedFile(f)
                tensors = {e.name: mapped.tensor(sd[e.name]) for e in rows}
                for k, t in tensors.items():
                    check_finite(t, f, k, rank)
                states.append({k: Lazy.of_record(t, sd[k]) for k, t in tensors.items()})
        out = merge_group(rows, states, ctx)
        if isinstance(group, int):
            q, k = f"layers.{group}.attn.q.weight", f"layers.{group}.attn.k.weight"
            out[q], out[k] = meta_to_rotate_half(out[q], heads), meta_to_rotate_half(out[k], kv)
        return dict(sorted(out.items()))

    groups: list[Group] = ["embed", *range(n_layers), "final"]
    metas = {g: load(g, meta=True) for g in groups}
    spec = ModelSpec(
        family=family or "llama",
        hidden=dim,
        layers=n_layers,
        heads=heads,
        kv_heads=kv,
        intermediate=ffn,
        vocab_rows=vocab,
        vocab_size=vocab,
        norm="rmsnorm",
        norm_eps=float(params.get("norm_eps", 1e-5)),
        activation="swiglu",
        rotary_pct=1.0,
        rotary_base=float(params.get("rope_theta", 10000.0)),
        parallel_residual=False,
        tied=False,
        attn_bias=False,
        mlp_bias=False,
        max_positions=int(params.get("max_seq_len") or 4096),
        dtype=str(shards[0][EMBED].dtype).removeprefix("torch."),
    )
    tok = _tokenizer(path)
    layout = {None: "one shard", 0: "tok_embeddings split on dim 0 (Llama 3)",
              1: "tok_embeddings split on dim 1 (Llama 1/2)"}[emb_dim]
    info = {"format": "meta", "path": str(path), "shards": p, "tp": p, "layout": layout, "embedding_split_dim": emb_dim,
            "meta_style": _style_of(emb_dim, params), "params": params, "iteration": 0,
            "tokenizer": str(tok) if tok else None, "warnings": warnings}
    ckpt = Checkpoint(spec, TensorMap(metas, load), info)
    check_canonical(ckpt)  # every tensor's shape against the spec: before anyone uses it
    return ckpt


def _style_of(emb_dim: int | None, params: dict) -> str:
    """Which reference code a source was made for: its embedding split, else its params keys."""
    if emb_dim is not None:
        return "llama2" if emb_dim == 1 else "llama3"
    return "llama3" if "rope_theta" in params else "llama2"


# ---------------------------------------------------------------------------------------------
# writing


def _check_writable(spec: ModelSpec, shards: int) -> None:
    why = None
    if spec.norm != "rmsnorm" or spec.activation != "swiglu":
        why = f"it needs RMSNorm and SwiGLU (this model: {spec.norm}, {spec.activation})"
    elif spec.position != "rotary" or spec.qk_norm or spec.local_layers:
        why = "it has rotary positions, dense attention and no QK-norm (this model is a custom GPT-NeoX one)"
    elif spec.attn_bias or spec.mlp_bias:
        why = "it has no attention or MLP biases"
    elif spec.rotary_pct != 1.0:
        why = f"it rotates whole heads (this model: rotary_pct {spec.rotary_pct})"
    elif spec.parallel_residual:
        why = "it has no parallel (GPT-J) residual"
    elif spec.sliding_window:
        from neoxconv.window import exact_up_to, terms

        why = (f"it has no sliding-window attention (this model: {terms(spec.sliding_window)}); pass "
               f"--drop-sliding-window to write it without the window ({exact_up_to(spec.sliding_window)})")
    if why:
        raise NeoxconvError(f"cannot write a Meta Llama checkpoint: {why}")
    if shards < 1:
        raise NeoxconvError(f"--tp (Meta shard count) must be at least 1, got {shards}")
    spec.check_tp(shards)


def meta_params(spec: ModelSpec, vocab: int, style: str, prefer: dict | None = None) -> dict:
    """params.json for Meta's reference code (no max_seq_len: its loader passes that itself)."""
    ffn = ffn_params(spec.hidden, spec.intermediate, prefer)
    out: dict = {"dim": spec.hidden, **({"ffn_dim_multiplier": ffn["ffn_dim_multiplier"]}
                                        if "ffn_dim_multiplier" in ffn else {}),
                 "multiple_of": ffn["multiple_of"], "n_heads": spec.heads}
    if style == "llama3" or spec.gqa:
        out["n_kv_heads"] = spec.kv_heads
    out.update({"n_layers": spec.layers, "norm_eps": spec.norm_eps})
    if style == "llama3" or spec.rotary_base != 10000.0:
        theta = spec.rotary_base
        out["rope_theta"] = int(theta) if float(theta).is_integer() else theta
    out["vocab_size"] = vocab
    return out


def write_meta(ckpt: Checkpoint, out: Path, *, progress: Callable[[int], None] | None = None, workers: int = 1,
               **opts) -> dict:
    """Write `consolidated.00.pth` ... and `params.json` into `out` (exists, empty)."""
    from neoxconv.pipeline import execute

    plan = plan_meta(ckpt, **opts)
    execute(plan, out, workers=workers, progress=progress)
    return plan.finish(out)


def plan_meta(ckpt: Checkpoint, *, shards: int, dtype: torch.dtype | None = None, style: str | None = None) -> Plan:
    """The files of a Meta checkpoint (neoxconv.plan): all shards are written in one pass over
    the source, each group split into every shard at once."""
    spec = ckpt.spec
    _check_writable(spec, shards)
    style = style or ckpt.info.get("meta_style") or "llama3"
    if style not in STYLES:
        raise NeoxconvError(f"unknown Meta style {style!r} (use llama3 or llama2)")
    out_dtype = dtype or getattr(torch, spec.dtype)
    vocab = spec.vocab_size
    if vocab % shards:
        vocab = -(-vocab // shards) * shards  # output.weight is always split on dim 0
    emb_dim = 1 if style == "llama2" else 0
    heads, kv = spec.heads, spec.kv_heads

    names = _names(spec.family, hidden_split=emb_dim == 1)
    ctx = Context.of(spec, vocab_rows=vocab)
    tied = "lm_head.weight" not in ckpt.tensors

    def with_embed(load):  # tied: Meta always stores the output layer, a copy of the embedding
        return lambda g: {**load(g), **(load("embed") if g == "final" and tied else {})}

    def outputs(group: Group, t: dict[str, torch.Tensor]):
        """What each shard stores of one group (Meta names)."""
        t = {k: v.to(out_dtype) for k, v in t.items()}
        if group == "embed":
            t["embed.weight"] = resize_vocab(t["embed.weight"], vocab, spec.vocab_size)
            ranks = split_group(names["embed"], t, shards, ctx)
        elif group == "final":
            if tied:
                t["lm_head.weight"] = t.pop("embed.weight")
            ranks = split_group(names["final"], t, shards, ctx)
        else:
            q, k = f"layers.{group}.attn.q.weight", f"layers.{group}.attn.k.weight"
            t[q], t[k] = rotate_half_to_meta(t[q], heads), rotate_half_to_meta(t[k], kv)
            ranks = split_group([e.at(group) for e in names["layer"]], t, shards, ctx)
        return [(f"consolidated.{r:02d}.pth", name, part) for r, sd in enumerate(ranks) for name, part in sd.items()]

    def finish(out: Path) -> dict:
        prefer = ckpt.info.get("params") if ckpt.info.get("format") == "meta" else None
        params = meta_params(spec, vocab, style, prefer)
        write_json(out / PARAMS, params)
        out_spec = spec.replace(vocab_rows=vocab, vocab_size=min(spec.vocab_size, vocab), tied=False,
                                dtype=str(out_dtype).removeprefix("torch."))
        return {"shards": shards, "vocab_rows": vocab, "embedding_split_dim": emb_dim if shards > 1 else None,
                "style": style, "params": params, "spec": out_spec}

    options = {"to": "meta", "shards": shards, "dtype": str(out_dtype), "style": style}
    return make_plan(ckpt.tensors.groups(), with_embed(ckpt.tensors.shapes), outputs,
                     lambda rel, entries: pt_file(rel, sorted(entries, key=lambda e: _meta_key(e[0]))),
                     with_embed(ckpt.tensors.lazy_group), finish, options)


def _meta_key(name: str) -> tuple:
    """Meta's key order: tok_embeddings, layers in order, norm, output."""
    if name == EMBED:
        return (0, 0, "")
    if name.startswith("layers."):
        return (1, int(name.split(".")[1]), "")
    return (2, 0, "" if name == "norm.weight" else "z")
