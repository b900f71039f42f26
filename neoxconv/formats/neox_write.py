"""Write a canonical checkpoint as a GPT-NeoX checkpoint at any TP/PP, one group at a time.

Each group is split by the roles of its entries (neox_schema, with the family's roles) into
what every TP rank stores; the DeepSpeed model-states files, the YAML and neoxconv.json follow.
The files are a plan (neoxconv.plan) that neoxconv.pipeline writes: every tensor at its offset
in torch's zip format (neoxconv.ptio, byte-identical to torch.save), rows that do not change
copied from the source file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from neoxconv.checkpoint import Checkpoint
from neoxconv.errors import NeoxconvError
from neoxconv.formats.neox_config import neox_yaml
from neoxconv.formats.neox_files import SCHEMAS, SIDECAR
from neoxconv.formats.neox_schema import BUFFERS, NeoxNames, buffers
from neoxconv.fusing import QKV_LAYOUTS
from neoxconv import ptio
from neoxconv.plan import OutFile, Plan, make_plan, pt_file
from neoxconv.roles import Context, padded_vocab
from neoxconv.spec import ModelSpec
from neoxconv.table import split_group

LAYOUTS = ("pipeline", "sequential")


def write_neox(ckpt: Checkpoint, out: Path, *, progress: Callable[[int], None] | None = None, workers: int = 1,
               **opts) -> dict:
    """Write a NeoX checkpoint into `out` (a fresh directory)."""
    from neoxconv.pipeline import execute

    plan = plan_neox(ckpt, **opts)
    execute(plan, out, workers=workers, progress=progress)
    return plan.finish(out)


def plan_neox(ckpt: Checkpoint, *, tp: int = 1, pp: int = 1, layout: str = "pipeline", schema: str = "current",
              dtype: torch.dtype | None = None, vocab_multiple: int = 128, qkv_layout: str | None = None,
              extra_yaml: dict | None = None) -> Plan:
    """The files of a NeoX checkpoint at any TP/PP (neoxconv.plan): a layer file per spec index
    and rank (pipeline), or one mp_rank file per rank holding every layer (sequential, written
    once, straight into torch's zip format)."""
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
    names = NeoxNames.of(spec, schema, layout_qkv)
    ctx = Context.of(spec, vocab_rows=rows)
    L = spec.layers

    def where(idx: int, rank: int, name: str) -> tuple[str, str]:
        if layout == "pipeline":
            return f"{tag}/layer_{idx:02d}-model_{rank:02d}-model_states.pt", name
        return f"{tag}/mp_rank_{rank:02d}_model_states.pt", f"sequential.{idx}.{name}"

    def outputs(group, t: dict[str, torch.Tensor]):
        t = {k: v.to(out_dtype) for k, v in t.items()}
        if group == "embed":
            per_idx = [(0, split_group(names.embed, t, tp, ctx, buffers(spec, schema, tp, out_dtype, group)))]
        elif group == "final":
            per_idx = [(L + 3, split_group(names.final, t, tp, ctx))]
            if not spec.tied:
                per_idx.append((L + 4, split_group(names.head, t, tp, ctx)))
        else:
            per_idx = [(group + 2, split_group(names.layer_at(group), t, tp, ctx,
                                               buffers(spec, schema, tp, out_dtype, group)))]
        out = [(*where(idx, r, k), v) for idx, ranks in per_idx for r, sd in enumerate(ranks) for k, v in sd.items()]
        if layout == "pipeline":  # every spec index has its files, even without tensors (a
            # non-parametric final norm): (file, None, None) plans a file and writes nothing into it
            out += [(where(idx, r, "")[0], None, None) for idx, ranks in per_idx for r, sd in enumerate(ranks)
                    if not sd]
        return out

    def layout_file(rel: str, entries) -> OutFile:
        if layout == "pipeline":
            return pt_file(rel, entries)
        return pt_file(rel, entries, lambda module: _model_states(module, tp, iteration))

    def finish(out: Path, extra_yaml: dict | None = extra_yaml) -> dict:
        tag_dir = out / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        if layout == "pipeline":  # DeepSpeed's model-states files without weights (T1, T2)
            for mp in range(pp * tp):
                ptio.save(_model_states(None, pp * tp, iteration), tag_dir / f"mp_rank_{mp:02d}_model_states.pt")
        out_spec = spec.replace(vocab_rows=rows, dtype=str(out_dtype).removeprefix("torch."))
        (tag_dir / "configs").mkdir(exist_ok=True)
        yaml_extra = dict(extra_yaml or {})
        if spec.sliding_window:  # HF W keys = NeoX flash window W - 1 (see hf_sliding_window)
            yaml_extra.setdefault("sliding_window_width", spec.sliding_window - 1)
        yaml_text = neox_yaml(out_spec, tp=tp, pp=pp, layout=layout, vocab_multiple=yaml_multiple, schema=schema,
                              dtype=out_spec.dtype, extra=yaml_extra, source=ckpt.info.get("format", ""))
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

    options = {"to": "neox", "tp": tp, "pp": pp, "layout": layout, "schema": schema, "dtype": str(out_dtype),
               "vocab_multiple": vocab_multiple, "qkv_layout": layout_qkv}
    return make_plan(ckpt.tensors.groups(), ckpt.tensors.shapes, outputs, layout_file, ckpt.tensors.lazy_group,
                     finish, options)


def _model_states(module: dict | None, mp_world_size: int, iteration: int) -> dict:
    """DeepSpeed's model-states dict (§1.4, §1.6): `module` None in pipeline mode (PP*TP files,
    mp = stage*TP + tp, T2), the `sequential.*` tensors otherwise (TP files)."""
    return {
        "module": module,
        "buffer_names": [k for k in (module or {}) if k.endswith(BUFFERS)],
        "optimizer": None,
        "lr_scheduler": None,
        "sparse_tensor_module_names": [],
        "skipped_steps": 0,
        "global_steps": iteration,
        "global_samples": 0,
        "dp_world_size": 1,
        "mp_world_size": mp_world_size,
        "iteration": iteration,
    }
