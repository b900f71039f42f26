"""The NeoX reference forward as an ``nn.Module`` holding the local ranks' stored tensors as parameters.

For training steps (:mod:`.train`) and gradient checks: the same per-rank blocks and driver as
:func:`.neox_forward.neox_reference_logits`, but every spec index is held (as a parameter) for the
model's lifetime, as training needs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .neox_forward import (
    NeoxShardSource,
    cast,
    default_group,
    forward,
    replicated,
    select_local,
    semantics_of,
    spec_indices,
)
from .neox_layers import RankStates, ReferenceOptions
from .ranks import RankGroup

__all__ = ["NeoxReferenceModel"]


def _param_key(name: str) -> str:
    return name.replace(".", "__")


def _neox_name(key: str) -> str:
    return key.replace("__", ".")


class NeoxReferenceModel(nn.Module):
    """The reference forward, holding every local rank's stored tensors as ``nn.Parameter`` s.

    Parameters keep their NeoX names per (spec index, rank): see :meth:`rank_state`. With
    ``requires_grad=True`` a backward pass gives Megatron-exact gradients in both backends
    (see :mod:`.ranks`), so a TP training step can be built on it.
    """

    def __init__(
        self,
        source: NeoxShardSource,
        *,
        group: RankGroup | None = None,
        dtype: torch.dtype | None = None,
        requires_grad: bool = False,
        options: ReferenceOptions | None = None,
        **option_kwargs: str,
    ):
        super().__init__()
        self.group = default_group(source, group)
        self.semantics = semantics_of(source)
        self.semantics.validate_tp(self.group.tp)
        self.num_layers = source.num_layers
        self.options = options or ReferenceOptions(**option_kwargs)
        idx = spec_indices(source.num_layers, self.semantics.tied_embeddings)
        wanted = [idx["embed"], *idx["layers"], idx["final_norm"]]
        if not self.semantics.tied_embeddings:
            wanted.append(idx["head"])
        self.spec_idx = tuple(wanted)
        self.slots = nn.ModuleDict()
        self._stored_dtypes: dict[int, dict[str, torch.dtype]] = {}
        for spec_idx in wanted:
            local = select_local(self.group, source.rank_states(spec_idx), source.tp, spec_idx)
            self._stored_dtypes[spec_idx] = {k: v.dtype for k, v in local[0].items()}
            for r, st in zip(self.group.local_ranks, cast(local, dtype, self.group.device)):
                self.slots[f"s{spec_idx}_r{r}"] = nn.ParameterDict({
                    _param_key(k): nn.Parameter(v.detach().clone(),
                                                requires_grad=requires_grad and v.is_floating_point())
                    for k, v in st.items()
                })
        self.dtype = dtype

    def rank_state(self, spec_idx: int, rank: int) -> dict[str, torch.Tensor]:
        """The parameters of one (spec index, rank) under their NeoX names."""
        slot = self.slots[f"s{spec_idx}_r{rank}"]
        return {_neox_name(k): v for k, v in slot.items()}

    def local_states(self, spec_idx: int) -> RankStates:
        """The parameters of one spec index, one dict per local rank."""
        return [self.rank_state(spec_idx, r) for r in self.group.local_ranks]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full padded-vocab logits [b, s, V_pad] in fp32 (replicated on every rank)."""
        def fetch(spec_idx: int) -> RankStates:
            return replicated(self.group, self.semantics, self.options, self.local_states(spec_idx),
                              self._stored_dtypes.get(spec_idx))

        return forward(self.group, self.semantics, self.num_layers, tokens, fetch, self.dtype, self.options)
