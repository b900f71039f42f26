"""Format adapters: each reads to and/or writes from the canonical Checkpoint."""
