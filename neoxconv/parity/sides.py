"""One side of a parity check per format: its ModelSpec (the converter's reading, for the config
check and the report) and its logits from the most independent forward for that format.

* **NeoX**: :func:`neoxconv.reference.neox_reference_logits` on
  :class:`neoxconv.reference.NeoxCheckpoint`: the per-rank tensors exactly as stored, semantics
  from the checkpoint's own YAML, the QKV layout read by the reference itself. The converter's
  canonical map and its QKV reading are never used, so a converter bug cannot cancel out.
* **HF**: :func:`neoxconv.reference.hf_logits`: transformers' own model, eager attention; a custom
  export (model_type ``neox_custom``) runs its own ``modeling_neox.py`` through
  ``trust_remote_code``, only when that code is byte for byte what this neoxconv writes.
* **Meta**: :func:`neoxconv.reference.meta_reference_logits` on the memory-mapped shards.

Every forward streams one layer group at a time (docs/parity.md, "Memory").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from neoxconv import graph
from neoxconv.errors import NeoxconvError
from neoxconv.progress import Progress
from neoxconv.reference import (
    NeoxCheckpoint,
    NeoxSemantics,
    SimulatedGroup,
    hf_logits,
    meta_reference_logits,
    neox_reference_logits,
    open_meta,
)
from neoxconv.reference.ranks import DistributedGroup, RankGroup

__all__ = ["NUMERIC_FIELDS", "Side", "launched_by_torchrun", "open_side", "rank_group"]

#: ModelSpec fields that change the numerics without changing any tensor shape (`local_layers`:
#: global and flash layers compute the same, local ones do not).
NUMERIC_FIELDS = ("norm", "norm_eps", "rotary_pct", "rotary_base", "activation", "parallel_residual",
                  "sliding_window", "position", "position_offset", "position_multiplier", "qk_norm",
                  "qk_norm_group", "local_layers", "local_block", "local_blocks", "parallel_norms_tied")
# replicated on every rank: the norms and the learned position table
_NORM_PREFIXES = ("input_layernorm.", "post_attention_layernorm.", "norm.", "position_embeddings.weight")
_ROW_BIASES = ("attention.dense.bias", "mlp.linear2.bias", "mlp.dense_4h_to_h.bias")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def rank_group(tp: int, device: torch.device) -> RankGroup:
    """Ranks simulated in this process, or, under torchrun, one real process per TP rank
    (gloo on CPU, NCCL on CUDA): the NeoX reference then runs with real collectives."""
    if not launched_by_torchrun():
        return SimulatedGroup(tp, device)
    world = int(os.environ["WORLD_SIZE"])
    if world != tp:
        raise NeoxconvError(f"torchrun started {world} processes, but the NeoX checkpoint has TP {tp}: "
                            f"use --nproc-per-node {tp}")
    return DistributedGroup.from_env()


class Side:
    """One checkpoint: its format, ModelSpec (the converter's reading) and its logits."""

    def __init__(self, path: Path, spec, info: dict):
        self.path, self.spec, self.info = Path(path), spec, info
        self.notes: list[str] = []

    fmt = ""

    @property
    def real_vocab(self) -> int:
        return int(self.spec.vocab_size)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": str(self.path), "format": self.fmt, "family": self.spec.family,
                               "real_vocab": self.real_vocab, "vocab_rows": self.spec.vocab_rows,
                               "stored_dtype": self.spec.dtype}
        out.update(self.layout_summary())
        out["config"] = {f: getattr(self.spec, f) for f in NUMERIC_FIELDS}
        return out

    def layout_summary(self) -> dict[str, Any]:
        return {k: self.info[k] for k in ("layout", "tp", "pp", "qkv_layout") if self.info.get(k) is not None}

    def logits(self, tokens: torch.Tensor, dtype: torch.dtype, device: torch.device, replicated: str,
               progress: Progress | None = None) -> torch.Tensor:
        """Logits [b, s, vocab] in fp32; ``progress(done, total)`` as layer groups are run."""
        raise NotImplementedError


class HFSide(Side):
    fmt = "hf"

    def logits(self, tokens, dtype, device, replicated, progress=None):
        custom = self.spec.family == "custom"
        if custom:
            from neoxconv.custom.export import TEMPLATE_FILES, is_neoxconv_code

            if not is_neoxconv_code(self.path):
                raise NeoxconvError(f"{self.path}: its {' / '.join(TEMPLATE_FILES)} differ from the code this neoxconv "
                                    "writes; parity would have to run foreign code, so it is not run")
        return hf_logits(self.path, tokens, dtype, device, trust_remote_code=custom, progress=progress).cpu()


class MetaSide(Side):
    fmt = "meta"

    def logits(self, tokens, dtype, device, replicated, progress=None):
        shards, params = open_meta(self.path)
        return meta_reference_logits(shards, params, tokens, group=SimulatedGroup(len(shards), device),
                                     dtype=dtype, progress=progress).cpu()


class NeoxSide(Side):
    fmt = "neox"

    def __init__(self, path: Path, spec, info: dict, config_files=None, qkv_layout: str | None = None):
        super().__init__(path, spec, info)
        self.source = NeoxCheckpoint(path, config_files, qkv_layout)

    def layout_summary(self) -> dict[str, Any]:
        src = self.source
        return {"layout": src.files.layout, "tp": src.tp, "pp": src.files.pp, "qkv_layout": src.qkv_layout}

    def logits(self, tokens, dtype, device, replicated, progress=None):
        src = self.source
        sem = NeoxSemantics.from_args(src.args, src.qkv_layout, src.num_layers)
        watch = _DriftWatch(src, sem.gpt_j_residual, progress)
        out = neox_reference_logits(watch, tokens, group=rank_group(src.tp, device), dtype=dtype,
                                    replicated=replicated).cpu()
        if watch.max_drift > 0:
            self.notes.append(
                f"{self.path}: {watch.drifted} replicated tensor(s) (norms"
                f"{'' if sem.gpt_j_residual else ', row biases'}) differ across the {src.tp} TP ranks, by up to "
                f"{watch.max_drift:.3g}. The reference used "
                + ("each rank's own copy (what NeoX computes; an HF export holds their mean, so the gap shows in "
                   "the logits; rerun with --replicated mean to check the layout alone)." if replicated == "own"
                   else "their mean (what an HF export holds); NeoX itself uses each rank's own copy."))
        if sem.gpt_j_residual and src.tp > 1 and self.spec.dtype != "float32" and replicated == "own":
            self.notes.append(
                f"{self.path}: the gpt_j_residual row biases are stored as {src.tp} per-rank {self.spec.dtype} parts; "
                f"a merged export holds their sum rounded to {self.spec.dtype}, which differs from the parts NeoX adds "
                "by that rounding (rerun with --replicated mean to model the export exactly).")
        return out


class _DriftWatch:
    """The NeoX source handed to the reference, measuring how far replicated copies differ."""

    def __init__(self, source: NeoxCheckpoint, gpt_j: bool, progress: Progress | None = None):
        self.source, self.gpt_j = source, gpt_j
        self.tp, self.num_layers, self.args = source.tp, source.num_layers, source.args
        self.qkv_layout = source.qkv_layout
        self.max_drift, self.drifted = 0.0, 0
        self.progress, self.fetched = progress, 0

    def rank_states(self, idx: int) -> list[dict[str, torch.Tensor] | None]:
        states = self.source.rank_states(idx)
        if self.progress is not None:  # the forward fetches the embedding, each layer, the final norm, the head
            total = self.num_layers + 3
            self.fetched += 1
            self.progress(min(self.fetched, total), total)
        held = [st for st in states if st is not None]
        for k in held[0]:
            if k.startswith(_NORM_PREFIXES) or (k in _ROW_BIASES and not self.gpt_j):
                d = max(((st[k].float() - held[0][k].float()).abs().max().item() for st in held[1:]), default=0.0)
                self.drifted += d > 0
                self.max_drift = max(self.max_drift, d)
        return states


def open_side(path, config_files=None, arch: str | None = None, qkv_layout: str | None = None) -> Side:
    """The side for ``path`` (format detected). ``config_files`` and ``qkv_layout`` apply to NeoX only."""
    path = Path(path)
    fmt = graph.detect(path)
    ckpt = graph.read(path, fmt=fmt, config_files=config_files, family=arch,
                      qkv_layout=qkv_layout if fmt == "neox" else None)
    if fmt == "neox":
        return NeoxSide(path, ckpt.spec, ckpt.info, config_files, qkv_layout)
    return (HFSide if fmt == "hf" else MetaSide)(path, ckpt.spec, ckpt.info)
