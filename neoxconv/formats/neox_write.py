"""Write a canonical checkpoint as a GPT-NeoX checkpoint at any TP/PP, one group at a time.

Each group is split by the roles of its entries (neox_schema, with the family's roles) into
what every TP rank stores; the DeepSpeed model-states files, the YAML and neoxconv.json follow.
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
from neoxconv.io import load_pickle, owned, save_pickle
from neoxconv.roles import Context, padded_vocab
from neoxconv.spec import ModelSpec
from neoxconv.table import split_group

LAYOUTS = ("pipeline", "sequential")


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
    names = NeoxNames.of(spec, schema, layout_qkv)
    ctx = Context.of(spec, vocab_rows=rows)
    tag_dir.mkdir(parents=True)
    L = spec.layers
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
            emit(0, split_group(names.embed, t, tp, ctx, buffers(spec, schema, tp, out_dtype, group)))
        elif group == "final":
            emit(L + 3, split_group(names.final, t, tp, ctx))
            if not spec.tied:
                emit(L + 4, split_group(names.head, t, tp, ctx))
        else:
            emit(group + 2, split_group(names.layer_at(group), t, tp, ctx, buffers(spec, schema, tp, out_dtype, group)))
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
    count = pp * tp if layout == "pipeline" else tp
    for mp in range(count):
        module = None
        if layout == "sequential":
            module = {}
            for idx, path in parts[mp]:
                module.update({f"sequential.{idx}.{k}": v for k, v in load_pickle(path).items()})
        buffer_names = [k for k in (module or {}) if k.endswith(BUFFERS)]
        state = {
            "module": module,
            "buffer_names": buffer_names,
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
