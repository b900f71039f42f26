"""The canonical in-memory checkpoint every format reads to and writes from."""

from __future__ import annotations

from dataclasses import dataclass, field

from neoxconv.spec import ModelSpec
from neoxconv.tensormap import TensorMap
from neoxconv.text_settings import TextSettings


@dataclass
class Checkpoint:
    spec: ModelSpec
    tensors: TensorMap
    # Provenance and format-specific extras: format, path, iteration, tp, pp, layout,
    # neox_args (merged YAML), tokenizer (path), qkv_layout, schema ...
    info: dict = field(default_factory=dict)
    # Tokenizer and generation settings (special tokens, chat template, generation_config.json).
    text: TextSettings = field(default_factory=TextSettings)
