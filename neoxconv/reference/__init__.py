"""Numerical proof of conversions: independent reference forwards and logit parity.

* :func:`neox_reference_logits` / :class:`NeoxReferenceModel` -- NeoX semantics directly on the
  stored per-TP-rank tensors (no converter code).
* :func:`meta_reference_logits` -- Meta Llama semantics on ``consolidated.XX.pth`` shards.
* :func:`hf_logits` -- the HF side via transformers.
* :func:`compare_logits` -> :class:`ParityReport`; :func:`make_batch`.
* :mod:`.ranks` -- simulated and torch.distributed rank groups, :func:`run_distributed`.
* :mod:`.train` -- TP training on the stored shards (column/row-parallel linear, vocab-parallel
  embedding and cross-entropy, :class:`~.train.NeoxTrainModel`, optimizer, save back to NeoX);
  :mod:`.train_check` -- ``neoxconv train-check`` (loss/gradient/update parity against HF).

Heavy imports (transformers) happen only inside :mod:`.hf_forward` functions.
"""

from .hf_forward import hf_logits, hf_model_logits, load_hf_model
from .meta_forward import meta_reference_logits
from .neox_forward import (
    InMemoryShardSource,
    NeoxReferenceModel,
    NeoxShardSource,
    ReferenceOptions,
    neox_reference_logits,
    spec_indices,
)
from .neox_semantics import NeoxSemantics, UnsupportedNeoxFeature
from .parity import DEFAULT_TOLERANCES, ParityReport, compare_logits, default_tolerance, make_batch
from .ranks import DistributedGroup, RankGroup, SimulatedGroup, run_distributed

__all__ = [
    "DEFAULT_TOLERANCES",
    "DistributedGroup",
    "InMemoryShardSource",
    "NeoxReferenceModel",
    "NeoxSemantics",
    "NeoxShardSource",
    "ParityReport",
    "RankGroup",
    "ReferenceOptions",
    "SimulatedGroup",
    "UnsupportedNeoxFeature",
    "compare_logits",
    "default_tolerance",
    "hf_logits",
    "hf_model_logits",
    "load_hf_model",
    "make_batch",
    "meta_reference_logits",
    "neox_reference_logits",
    "run_distributed",
    "spec_indices",
]
