"""The NeoX reference forward, streamed one pipeline spec index at a time.

:func:`neox_reference_logits` runs the per-rank blocks of :mod:`.neox_layers` over a
:class:`NeoxShardSource`: fetch one spec index (every local rank's tensors as stored), cast it to
the compute dtype, compute, drop it, fetch the next. Only the batch's activations live between
spec indices, so peak memory is one spec index in the compute dtype plus activations, whatever
the depth (the tied head re-reads the embedding instead of keeping it).

Sources: :class:`.neox_checkpoint.NeoxCheckpoint` (the files on disk, with the reference's own
reading of the QKV layout) or :class:`InMemoryShardSource` (ready dicts, for tests).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import NeoxconvError
from ..formats.neox_files import NeoxFiles
from .neox_layers import (
    RankStates,
    ReferenceOptions,
    check_keys,
    embed,
    final_norm,
    head_partials,
    layer,
    make_run,
)
from .neox_semantics import NeoxSemantics
from .ranks import RankGroup, SimulatedGroup

__all__ = [
    "InMemoryShardSource",
    "NeoxShardSource",
    "ReferenceOptions",
    "neox_reference_logits",
    "semantics_of",
    "spec_indices",
]


class NeoxShardSource(Protocol):
    """What the reference needs from a NeoX checkpoint (duck-typed).

    ``rank_states(i)`` returns one dict per TP rank (``None`` for ranks this process does not
    hold); ``qkv_layout`` is the declared fused-QKV layout (see :class:`.NeoxSemantics`)."""

    tp: int
    num_layers: int
    args: dict
    qkv_layout: str

    def rank_states(self, spec_idx: int) -> list[dict[str, torch.Tensor] | None]: ...


@dataclass
class InMemoryShardSource:
    """A :class:`NeoxShardSource` over ready dicts: ``layers[spec_idx][rank] -> {name: tensor}``."""

    tp: int
    num_layers: int
    args: dict
    qkv_layout: str
    layers: dict[int, list[dict[str, torch.Tensor]]] = field(default_factory=dict)

    def rank_states(self, spec_idx: int) -> list[dict[str, torch.Tensor]]:
        try:
            return self.layers[spec_idx]
        except KeyError:
            raise NeoxconvError(f"no pipeline spec index {spec_idx} in this checkpoint") from None


def spec_indices(num_layers: int, tied: bool) -> dict[str, Any]:
    """Pipeline spec indices (§1.3): embed 0, layers 2..L+1, final norm L+3, head L+4 (untied)."""
    return {
        "embed": 0,
        "layers": [i + 2 for i in range(num_layers)],
        "final_norm": num_layers + 3,
        "head": 0 if tied else num_layers + 4,
    }


def semantics_of(source: NeoxShardSource) -> NeoxSemantics:
    """The forward's semantics from the source's own YAML and declared QKV layout."""
    if isinstance(source, NeoxFiles):
        # a NeoxFiles object may carry a layout a converter attached to it; the reference reads its own
        raise TypeError("pass neoxconv.reference.NeoxCheckpoint (the reference's own reading of the files), "
                        "not a NeoxFiles object")
    return NeoxSemantics.from_args(source.args, source.qkv_layout, source.num_layers)


Fetch = Callable[[int], RankStates]


def forward(group: RankGroup, sem: NeoxSemantics, num_layers: int, tokens: torch.Tensor, fetch: Fetch,
            dtype: torch.dtype | None, opts: ReferenceOptions) -> torch.Tensor:
    """Full padded-vocab logits [b, s, V_pad] (fp32), fetching one spec index at a time.

    Every fetched spec index is released before the next is fetched."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    sem.validate_tp(group.tp)
    idx = spec_indices(num_layers, sem.tied_embeddings)
    tokens = tokens.to(group.device)
    states = fetch(idx["embed"])
    emb_w = states[0]["word_embeddings.weight"]
    run = make_run(group, sem, tokens.shape[1], emb_w.shape[1], dtype or emb_w.dtype, opts, num_layers)
    xs = embed(run, tokens, states)
    del states, emb_w
    for i, spec_idx in enumerate(idx["layers"]):
        states = fetch(spec_idx)
        check_keys(states, spec_idx)
        xs = layer(run, xs, states, i)
        del states
    normed = final_norm(run, xs, fetch(idx["final_norm"]))
    del xs
    return group.all_gather_cat(head_partials(run, normed, fetch(idx["head"])), dim=-1).float()


# replicated on every rank: the norms and the learned position table
_NORM_PREFIXES = ("input_layernorm.", "post_attention_layernorm.", "norm.", "position_embeddings.weight")
_ROW_BIASES = ("attention.dense.bias", "mlp.linear2.bias", "mlp.dense_4h_to_h.bias")


def replicated(group: RankGroup, sem: NeoxSemantics, opts: ReferenceOptions, states: RankStates,
               stored: Mapping[str, torch.dtype] | None = None) -> RankStates:
    """``replicated="mean"``: replace what an export merges by exactly what it holds.

    * replicated tensors (norms; row biases unless gpt_j_residual): the mean of the rank copies;
    * gpt_j_residual row biases (per-rank parts of one bias, T5): their total, held by rank 0
      (the other ranks get zeros, so the all-reduce adds it once).

    Both are computed in float64 (across ranks: a float64 all-reduce) and rounded once to the
    STORED dtype (``stored[name]``, default the tensor's own dtype), as the converter's merge roles do,
    then cast to the tensors' (compute) dtype. ``"own"``: ``states`` unchanged.
    """
    if opts.replicated == "own":
        return states
    stored = stored or {}
    means = [k for k in states[0] if k.startswith(_NORM_PREFIXES) or (k in _ROW_BIASES and not sem.gpt_j_residual)]
    sums = [k for k in states[0] if k in _ROW_BIASES and sem.gpt_j_residual]
    out = [dict(st) for st in states]
    for k in means + sums:
        like = states[0][k]
        total = group.all_reduce_sum([st[k].double() for st in states])[0]
        merged = total / group.tp if k in means else total
        merged = merged.to(stored.get(k, like.dtype)).to(like.dtype)
        for r, st in zip(group.local_ranks, out):
            st[k] = merged if k in means or r == 0 else torch.zeros_like(like)
    return out


def select_local(group: RankGroup, states: list, tp: int, spec_idx: int) -> RankStates:
    """The local ranks' dicts out of one per TP rank."""
    if len(states) != tp:
        raise NeoxconvError(f"spec index {spec_idx}: {len(states)} rank files, expected tp={tp} (T4)")
    return [states[r] for r in group.local_ranks]


def cast(states: RankStates, dtype: torch.dtype | None, device: torch.device) -> RankStates:
    """Floating tensors to ``dtype`` (None: as stored), everything to ``device``."""
    return [
        {k: (v.to(device=device, dtype=dtype) if dtype is not None and v.is_floating_point() else v.to(device))
         for k, v in st.items()}
        for st in states
    ]


def default_group(source: NeoxShardSource, group: RankGroup | None) -> RankGroup:
    group = group or SimulatedGroup(source.tp)
    if group.tp != source.tp:
        raise NeoxconvError(f"rank group has tp={group.tp} but the checkpoint has tp={source.tp}")
    return group


def neox_reference_logits(
    source: NeoxShardSource,
    tokens: torch.Tensor,
    *,
    group: RankGroup | None = None,
    dtype: torch.dtype | None = None,
    options: ReferenceOptions | None = None,
    **option_kwargs: str,
) -> torch.Tensor:
    """Logits [b, s, V_pad] (fp32) of the NeoX checkpoint ``source`` for ``tokens`` [b, s].

    Streams one pipeline spec index at a time (peak memory ≈ one spec index on all local ranks
    in the compute dtype, plus activations). ``dtype``: compute dtype; default the stored dtype
    (upcasting fp16/bf16 weights to fp32 is exact and gives the tightest parity). ``group``:
    default a :class:`SimulatedGroup` over all ``source.tp`` ranks. ``options`` or keyword
    arguments (``sliding_window_convention``, ``rmsnorm_style``, ``replicated``): see
    :class:`ReferenceOptions`.
    """
    opts = options or ReferenceOptions(**option_kwargs)
    group = default_group(source, group)
    sem = semantics_of(source)

    def fetch(spec_idx: int) -> RankStates:
        local = select_local(group, source.rank_states(spec_idx), source.tp, spec_idx)
        # merged values (replicated="mean") are rounded to the stored dtype before the cast
        local = replicated(group, sem, opts, cast(local, None, group.device))
        return cast(local, dtype, group.device)

    with torch.no_grad():
        return forward(group, sem, source.num_layers, tokens, fetch, dtype, opts)
