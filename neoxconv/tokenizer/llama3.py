"""tiktoken BPE files (Meta's Llama 3 ``tokenizer.model``: lines ``<base64 token> <rank>``) -> Hugging Face.

The file is read by the ``tiktoken`` library, converted by transformers' ``TikTokenConverter`` and
checked against ``tiktoken``'s own encoder on the probe texts: both need the ``tiktoken`` extra.
Any problem raises :class:`TiktokenUnsupported`, so the caller can skip the tokenizer with a warning.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from neoxconv.text_settings import TokenizerSettings
from neoxconv.tokenizer.kinds import PROBE_TEXTS, TiktokenUnsupported, one_line, require

# Meta's Llama 3 tokenizer (llama3 / llama-models tokenizer.py): this split pattern, and 256
# special tokens appended after the base vocabulary, whatever its size. Their names changed in
# Llama 3.1 (eom_id, python_tag, finetune_right_pad_id); bos/eos/header/eot ids are the same.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL = 256
_LLAMA3_SPECIALS = {
    "3": ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
          "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>",
          "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"],
    "3.1": ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"],
}


def llama3_special_tokens(version: str = "3") -> list[str]:
    """Meta's 256 Llama 3 (``"3"``) or Llama 3.1+ (``"3.1"``) special tokens, in id order."""
    named = _LLAMA3_SPECIALS[version]
    first_reserved = 5 if version == "3" else 3
    return named + [f"<|reserved_special_token_{first_reserved + i}|>" for i in range(LLAMA3_NUM_SPECIAL - len(named))]


def llama3_specials_for(model_file: Path) -> list[str]:
    """Llama 3.1 names when Meta's params.json next to the file has ``use_scaled_rope``, else Llama 3's."""
    try:
        params = json.loads((model_file.parent / "params.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        params = None
    return llama3_special_tokens("3.1" if isinstance(params, dict) and "use_scaled_rope" in params else "3")


def read_tiktoken(path: Path) -> dict[bytes, int]:
    """The mergeable ranks, read by the tiktoken library and checked: ranks 0..n-1, all 256 bytes."""
    require("tiktoken", f"{path}: a tiktoken tokenizer", TiktokenUnsupported)
    from tiktoken.load import load_tiktoken_bpe

    try:
        data = path.read_bytes()
        # tiktoken caches files by path; the content hash keeps a rewritten file from reading stale
        ranks = load_tiktoken_bpe(str(path), expected_hash=hashlib.sha256(data).hexdigest())
    except (OSError, ValueError) as e:
        raise TiktokenUnsupported(f"{path}: not a readable tiktoken file ({one_line(e)})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TiktokenUnsupported(f"{path}: tiktoken ranks are not 0..{len(ranks) - 1} without gaps")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TiktokenUnsupported(f"{path}: not a complete byte-level BPE ({len(missing)} of the 256 single bytes "
                                  "have no token)")
    return ranks


def tiktoken_encoding(ranks: dict[bytes, int], specials: list[str]):
    """The tiktoken library's encoder for these ranks with the Llama 3 split and special tokens."""
    import tiktoken

    return tiktoken.Encoding("neoxconv-llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                             special_tokens={s: len(ranks) + i for i, s in enumerate(specials)})


def export_tiktoken(src: Path, out: Path, embedding_rows: int, settings: TokenizerSettings, options: dict,
                    warnings: list[str]):
    """Convert a tiktoken file to a fast tokenizer saved in ``out``; TiktokenUnsupported if not possible.

    Nothing is written to ``out`` unless the result reloads and encodes the probe texts exactly
    like tiktoken itself.
    """
    import transformers
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from neoxconv.tokenizer.export import apply_settings, roundtrip_problem, save

    ranks = read_tiktoken(src)
    added = llama3_specials_for(src)
    n_tokens = len(ranks) + len(added)
    if n_tokens > embedding_rows:
        raise TiktokenUnsupported(
            f"{src}: tiktoken vocabulary ({len(ranks)}) + {len(added)} Llama 3 special tokens = {n_tokens} "
            f"tokens, but the model's embedding has only {embedding_rows} rows")
    if len(ranks) != 128000:
        warnings.append(f"{src.name}: tiktoken file with {len(ranks)} tokens (Llama 3 has 128000); "
                        "converted with Llama 3's split pattern and special tokens")

    class _Converter(TikTokenConverter):  # the ranks read (and checked) above, not a second read
        def load_tiktoken_bpe(self, _url):
            return ranks

    bos = settings.bos_token or added[0]
    with tempfile.TemporaryDirectory(prefix="neoxconv-tiktoken-") as tmp:
        stage = Path(tmp)
        try:
            backend = _Converter(vocab_file=str(src), pattern=LLAMA3_PATTERN, extra_special_tokens=added).converted()
            # Meta's Llama 3 tokenizer.json: bos before every sequence
            backend.post_processor = processors.Sequence([
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                              special_tokens=[(bos, backend.token_to_id(bos))]),
            ])
            tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **options)
        except Exception as e:  # the Rust error types are not exported
            raise TiktokenUnsupported(f"{src}: cannot build a fast tokenizer ({one_line(e)})") from None
        if len(tok) != n_tokens or tok.convert_tokens_to_ids(added[0]) != len(ranks):
            raise TiktokenUnsupported(f"{src}: converted tokenizer has {len(tok)} tokens, expected {n_tokens}")
        apply_settings(tok, settings, src)
        save(tok, stage, src)
        enc = tiktoken_encoding(ranks, added)
        problem = roundtrip_problem(stage, PROBE_TEXTS, [enc.encode(t, disallowed_special=()) for t in PROBE_TEXTS])
        if problem is not None:
            raise TiktokenUnsupported(f"{src}: converted tokenizer differs from tiktoken: {problem}")
        for f in stage.iterdir():
            if f.is_file():
                shutil.copyfile(f, out / f.name)
            else:
                shutil.copytree(f, out / f.name, dirs_exist_ok=True)
    # Meta's original file, where Meta's own HF repos keep it (not at the top: tools would take a
    # top-level tokenizer.model for SentencePiece).
    (out / "original").mkdir(exist_ok=True)
    shutil.copyfile(src, out / "original" / "tokenizer.model")
    return tok
