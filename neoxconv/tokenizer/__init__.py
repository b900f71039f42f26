"""Tokenizers, carried between NeoX, Hugging Face and Meta checkpoints, each read by its own library.

| module     | does |
|------------|------|
| `kinds`    | tells tokenizer files apart by content; the optional extras each kind needs |
| `vocab`    | token -> id lookups and sizes (tokenizers, sentencepiece, tiktoken) |
| `settings` | TextSettings of a tokenizer: an HF directory's record, the T16 rules, CLI overrides |
| `export`   | writes an HF tokenizer with its settings applied, checked by reloading |
| `spm`      | SentencePiece -> HF through transformers (``sentencepiece`` extra) |
| `llama3`   | tiktoken (Meta Llama 3) -> HF through ``TikTokenConverter`` (``tiktoken`` extra) |
| `neox`     | finds a NeoX config's tokenizer, copies one beside a NeoX checkpoint, the record beside it |
"""

from neoxconv.tokenizer.export import TokenizerInfo, apply_special_ids, export_tokenizer
from neoxconv.tokenizer.kinds import (KIND_HF_DIR, KIND_HF_JSON, KIND_SENTENCEPIECE, KIND_TIKTOKEN, NEOX_EOD, NEOX_PAD,
                                      PROBE_TEXTS, TiktokenUnsupported, tokenizer_kind)
from neoxconv.tokenizer.llama3 import LLAMA3_PATTERN, llama3_special_tokens, read_tiktoken
from neoxconv.tokenizer.neox import (RECORD, copy_tokenizer_for_neox, find_neox_tokenizer, neox_tokenizer_source,
                                     recorded_settings, write_record)
from neoxconv.tokenizer.settings import hf_dir_settings, read_chat_template, resolve_settings
from neoxconv.tokenizer.vocab import open_vocab, tokenizer_size

__all__ = [
    "KIND_HF_DIR", "KIND_HF_JSON", "KIND_SENTENCEPIECE", "KIND_TIKTOKEN", "LLAMA3_PATTERN", "NEOX_EOD", "NEOX_PAD",
    "PROBE_TEXTS", "RECORD", "TiktokenUnsupported", "TokenizerInfo", "apply_special_ids", "copy_tokenizer_for_neox",
    "export_tokenizer", "find_neox_tokenizer", "hf_dir_settings", "llama3_special_tokens", "neox_tokenizer_source",
    "open_vocab", "read_chat_template", "read_tiktoken", "recorded_settings", "resolve_settings", "tokenizer_kind",
    "tokenizer_size", "write_record",
]
