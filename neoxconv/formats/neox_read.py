"""Read a GPT-NeoX checkpoint into canonical form, one group (layer) at a time.

Each group loads exactly its spec index's files from every TP rank, and the roles of its
entries (neox_schema, with the family's roles) merge them. The tensors are Lazy rows of the
memory-mapped files (neoxconv.lazy): a merge that only concatenates rows copies nothing. A shape
pass runs the same code first on shape-only tensors from the file headers and checks that every
stored tensor is used: none is dropped silently.
"""

from __future__ import annotations

from pathlib import Path

import torch

from neoxconv.checkpoint import Checkpoint
from neoxconv.errors import NeoxconvError
from neoxconv.formats.neox_files import SIDECAR, open_neox, read_sidecar
from neoxconv.formats.neox_schema import NeoxNames, holds_no_weights, in_layer_order
from neoxconv.formats.neox_spec import spec_from_neox, tokenizer_size
from neoxconv.lazy import Lazy
from neoxconv.roles import Context
from neoxconv.table import Entry, merge_group
from neoxconv.tensormap import Group, TensorMap
from neoxconv.validate import check_neox


def read_neox(path: Path, config_files: list[Path] | None = None, family: str | None = None,
              qkv_layout: str | None = None) -> Checkpoint:
    nf = open_neox(path, config_files)
    extra = read_sidecar(nf.tag_dir)
    vocab_size = extra.get("vocab_size")
    tok = tokenizer_size(nf)
    if tok:
        vocab_size = tok
    # neoxconv.json also keeps what NeoX's files cannot say: the HF family (a window-less
    # Mistral is a Llama to NeoX) and the HF spelling of the activation.
    spec, schema, layout = spec_from_neox(nf, family or extra.get("family"), qkv_layout, vocab_size,
                                          recorded_layout=extra.get("qkv_layout"))
    nf.qkv_layout = layout
    L = spec.layers
    names = NeoxNames.of(spec, schema, layout)
    ctx = Context.of(spec)

    def check_used(idx: int, states: list[dict], rows: list[Entry]) -> None:
        """Every stored tensor must map somewhere: dropping one silently is a wrong export."""
        used = {e.name for e in rows if e.name in states[0]}
        for r, sd in enumerate(states):
            left = [k for k in sd if k not in used and not holds_no_weights(k)]
            if left:
                raise NeoxconvError(f"{nf.file_for(idx, r)}: tensor {left[0]!r} is not part of a {spec.family} "
                                    f"{'layer' if 2 <= idx < L + 2 else 'checkpoint'} as neoxconv knows it; "
                                    "refusing to drop it")

    def merged(idx: int, rows: list[Entry], meta: bool) -> dict[str, torch.Tensor]:
        """The canonical tensors of spec index idx, merged over TP ranks. The shape pass
        (meta=True, from the headers) also checks that every stored tensor is used."""
        records = nf.records(idx)
        if meta:
            check_used(idx, records, rows)
            states = [{k: Lazy.shape_only(rec.shape, rec.dtype) for k, rec in sd.items()} for sd in records]
        else:
            states = [{k: Lazy.of_record(t, recs[k]) for k, t in sd.items()}
                      for sd, recs in zip(nf.rank_states(idx), records, strict=True)]
        return merge_group(rows, states, ctx)

    def load(group: Group, meta: bool = False) -> dict[str, torch.Tensor]:
        if group == "embed":
            return merged(0, names.embed, meta)
        if group == "final":
            out = merged(L + 3, names.final, meta)
            if not spec.tied:
                out.update(merged(L + 4, names.head, meta))
            return out
        layer = merged(group + 2, names.layer_at(group), meta)
        prefix = f"layers.{group}."
        leaves = in_layer_order({k.removeprefix(prefix): v for k, v in layer.items()})
        return {prefix + leaf: t for leaf, t in leaves.items()}

    groups: list[Group] = ["embed", *range(L), "final"]
    metas = {g: load(g, meta=True) for g in groups}
    tensors = TensorMap(metas, load)
    info = {"format": "neox", "path": str(nf.tag_dir), "layout": nf.layout, "tp": nf.tp, "pp": nf.pp,
            "iteration": nf.iteration, "schema": schema, "qkv_layout": layout, "neox_args": nf.args,
            "config_files": [str(p) for p in nf.config_files], "files": nf}
    info["vocab_known"] = bool(tok) or bool(extra.get("vocab_known", "vocab_size" in extra))
    if extra.get("hf_hidden_act"):
        info["hf_hidden_act"] = extra["hf_hidden_act"]
    from neoxconv.tokenizer.neox import recorded_settings

    ckpt = Checkpoint(spec, tensors, info, text=recorded_settings(extra, nf.args, nf.tag_dir, nf.tag_dir / SIDECAR))
    check_neox(ckpt)  # every stored shape, on every rank, against the spec: before anyone uses it
    return ckpt
