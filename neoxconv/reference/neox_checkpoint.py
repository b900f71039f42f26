"""A NeoX checkpoint on disk as the reference reads it, independently of the converter.

:class:`NeoxCheckpoint` is a :class:`.neox_forward.NeoxShardSource` over the stored files: the
per-rank tensors come from ``formats/neox_files.py`` (storage only: which file holds spec index i
of rank r), the semantics from the checkpoint's own YAMLs, and the fused-QKV layout from the one
storage rule (:func:`neoxconv.formats.neox_files.qkv_layout_for`) applied to what the reference
reads itself: the head counts of the YAML, the tensor-name schema of the stored layer and the
layout neoxconv recorded in ``neoxconv.json``. Nothing comes from a converter object, so a
mistake in the converter's reading cannot be shared by the proof.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import NeoxconvError
from ..formats.neox_files import detect_schema, open_neox, qkv_layout_for, read_sidecar

__all__ = ["NeoxCheckpoint"]


class NeoxCheckpoint:
    """The stored per-rank tensors of a NeoX checkpoint, read one spec index at a time.

    ``path``: a save dir with ``latest`` or a ``global_stepN`` dir. ``config_files``: NeoX YAMLs
    (default: the checkpoint's ``configs/``). ``qkv_layout``: the declared GQA layout
    (``--qkv-layout``), else the recorded one, else NeoX's history (see ``qkv_layout_for``).
    ``ranks``: the TP ranks this process reads (default all; the others are ``None`` in
    :meth:`rank_states` and their files are never opened). Nothing is cached: every call reads
    the files (memory-mapped), so a forward holds one spec index at a time.
    """

    def __init__(self, path: str | Path, config_files: list[Path] | None = None, qkv_layout: str | None = None,
                 ranks: tuple[int, ...] | None = None):
        self.files = open_neox(Path(path), list(config_files or []) or None, ranks=ranks)
        self.tag_dir = self.files.tag_dir
        self.tp, self.num_layers, self.args = self.files.tp, self.files.num_layers, self.files.args
        self.ranks = tuple(ranks) if ranks else tuple(range(self.tp))
        #: stored dtype of every tensor read so far, keyed (spec index, rank, name)
        self.stored_dtypes: dict[tuple[int, int, str], torch.dtype] = {}
        self.schema = self._schema()
        self.qkv_layout = self._qkv_layout(qkv_layout)

    def _schema(self) -> str:
        if self.num_layers == 0:
            return "current"
        r = self.ranks[0]
        return detect_schema(set(self.files.rank_state(2, r)), str(self.files.file_for(2, r)))

    def _qkv_layout(self, declared: str | None) -> str:
        a = self.args
        if "num_attention_heads" not in a:
            raise NeoxconvError(f"{self.tag_dir}: num_attention_heads is unknown: no NeoX YAML in configs/; "
                                "pass --config FILE")
        heads = int(a["num_attention_heads"])
        kv = a.get("num_kv_heads")
        kv = heads if kv in (None, "", 0) else int(kv)
        recorded = read_sidecar(self.tag_dir).get("qkv_layout")
        return qkv_layout_for(heads, kv, self.schema, declared=declared, recorded=recorded, where=self.tag_dir)

    def rank_states(self, spec_idx: int) -> list[dict[str, torch.Tensor] | None]:
        """Spec index ``spec_idx`` as stored: one dict per TP rank, ``None`` for ranks not read."""
        if spec_idx not in self.files.indices:
            raise NeoxconvError(f"{self.tag_dir}: no pipeline spec index {spec_idx}")
        out: list[dict[str, torch.Tensor] | None] = []
        for r in range(self.tp):
            if r not in self.ranks:
                out.append(None)
                continue
            st = self.files.rank_state(spec_idx, r)
            self.stored_dtypes.update({(spec_idx, r, k): v.dtype for k, v in st.items()})
            out.append(st)
        return out
