"""The canonical in-memory checkpoint every format reads to and writes from."""

from __future__ import annotations

from dataclasses import dataclass, field

from neoxconv.spec import ModelSpec
from neoxconv.tensormap import TensorMap


@dataclass
class Checkpoint:
    spec: ModelSpec
    tensors: TensorMap
    # Provenance and format-specific extras: format, path, iteration, tp, pp, layout,
    # neox_args (merged YAML), tokenizer (path), qkv_layout, schema ...
    info: dict = field(default_factory=dict)
