"""Numerical proof of conversions: independent reference forwards and logit parity.

Independent of the converter: this package imports nothing of neoxconv but ``errors``, ``io``
(safe pickle loading) and ``formats.neox_files`` (NeoX file storage and its YAMLs); a test
(tests/test_reference_independence.py) walks the imports and fails if that changes.

* :func:`neox_reference_logits` -- NeoX semantics directly on the stored per-rank tensors
  (:class:`NeoxCheckpoint`: the files, with the reference's own reading of the QKV layout), one
  spec index at a time; :class:`NeoxReferenceModel` holds them as parameters (for training).
* :func:`meta_reference_logits` -- Meta Llama semantics on ``consolidated.XX.pth`` shards
  (:func:`open_meta`), layer by layer.
* :func:`hf_logits` -- the HF side: transformers' own model, streamed one layer group at a time.
* :func:`compare_logits` -> :class:`ParityReport`; :func:`make_batch`.
* :mod:`.ranks` -- simulated and torch.distributed rank groups, :func:`run_distributed`.
* :mod:`.train` -- TP training on the stored shards (column/row-parallel linear, vocab-parallel
  embedding and cross-entropy, :class:`~.train.NeoxTrainModel`, optimizer, save back to NeoX),
  the independent side of ``neoxconv train-check`` (:mod:`neoxconv.traincheck`).

Heavy imports (transformers) happen only inside :mod:`.hf_forward` functions.
"""

from .hf_forward import hf_logits, hf_model_logits, load_hf_model
from .meta_forward import meta_reference_logits, open_meta
from .neox_checkpoint import NeoxCheckpoint
from .neox_forward import InMemoryShardSource, NeoxShardSource, neox_reference_logits, spec_indices
from .neox_layers import ReferenceOptions
from .neox_model import NeoxReferenceModel
from .neox_semantics import NeoxSemantics, UnsupportedNeoxFeature
from .parity import DEFAULT_TOLERANCES, ParityReport, compare_logits, default_tolerance, make_batch
from .ranks import DistributedGroup, RankGroup, SimulatedGroup, run_distributed

__all__ = [
    "DEFAULT_TOLERANCES",
    "DistributedGroup",
    "InMemoryShardSource",
    "NeoxCheckpoint",
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
    "open_meta",
    "run_distributed",
    "spec_indices",
]
