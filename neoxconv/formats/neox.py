"""GPT-NeoX checkpoints <-> canonical: the entry points. The work is split by job:

- neox_files:  storage only (which file holds what; layouts; sidecar; schema and QKV-layout rules)
- neox_schema: stored names per schema and NeoX's fusings, bound to the family's roles
- neox_spec:   NeoX config + tensor shapes -> ModelSpec (attention types, sliding window)
- neox_read:   read_neox, one layer at a time
- neox_write:  write_neox at any TP/PP, both layouts
- neox_config: the YAML (read and written)

`rank_to_layer` (one rank's canonical pieces, not merged) is what train-check gathers
gradients with.
"""

from neoxconv.formats.neox_read import read_neox
from neoxconv.formats.neox_schema import rank_to_layer
from neoxconv.formats.neox_write import write_neox

__all__ = ["read_neox", "write_neox", "rank_to_layer"]
