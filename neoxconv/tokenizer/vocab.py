"""Token -> id lookups and vocabulary sizes of tokenizer files, each read by the library that owns it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from neoxconv.errors import NeoxconvError
from neoxconv.tokenizer.kinds import (KIND_HF_DIR, KIND_HF_JSON, KIND_SENTENCEPIECE, looks_like_tiktoken,
                                      model_file, one_line, require, tokenizer_kind)


@dataclass(frozen=True)
class Vocab:
    id: Callable[[str], int | None]  # a token's id, None when the vocabulary has no such token
    size: int | None  # tokens including added ones; None when the file does not say (tiktoken)


def load_raw_json(src: Path):
    """A tokenizers JSON as (tokenizers.Tokenizer, parsed JSON); NeoxconvError naming the problem."""
    from tokenizers import Tokenizer

    try:
        with open(src, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise NeoxconvError(f"{src}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or "model" not in data:
        raise NeoxconvError(
            f"{src}: not a Hugging Face tokenizers JSON (no 'model' section; a GPT-2 vocab.json is not supported)")
    try:
        return Tokenizer.from_file(str(src)), data
    except Exception as e:  # the Rust error types are not exported
        raise NeoxconvError(f"{src}: cannot be read as a tokenizers JSON ({one_line(e)})") from None


def sentencepiece_processor(path: Path):
    require("sentencepiece", f"{path}: a SentencePiece tokenizer")
    import sentencepiece

    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError
        raise NeoxconvError(f"{path}: not a readable SentencePiece model ({one_line(e)})") from None


def open_vocab(src: Path) -> Vocab:
    src = Path(src)
    kind = tokenizer_kind(src)
    if kind == KIND_HF_DIR:
        if (src / "tokenizer.json").is_file():
            return open_vocab(src / "tokenizer.json")
        return _auto_vocab(src)
    if kind == KIND_HF_JSON:
        raw, _ = load_raw_json(src)
        return Vocab(raw.token_to_id, raw.get_vocab_size(with_added_tokens=True))
    if kind == KIND_SENTENCEPIECE:
        sp = sentencepiece_processor(model_file(src))

        def spm_id(token: str) -> int | None:
            i = sp.piece_to_id(token)  # unknown pieces give the unk id
            return i if sp.id_to_piece(i) == token else None

        return Vocab(spm_id, sp.get_piece_size())
    from neoxconv.tokenizer.llama3 import llama3_specials_for, read_tiktoken

    f = model_file(src)
    ranks = read_tiktoken(f)
    specials = {t: len(ranks) + i for i, t in enumerate(llama3_specials_for(f))}
    return Vocab(lambda t: specials.get(t, ranks.get(t.encode("utf-8"))), None)


def _auto_vocab(src: Path) -> Vocab:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise NeoxconvError(f"{src}: cannot load the tokenizer directory ({one_line(e)})") from None
    vocab = tok.get_vocab()
    return Vocab(vocab.get, len(tok))


def tokenizer_size(path) -> int | None:
    """Number of tokens of a tokenizers JSON or SentencePiece model (None if unreadable or tiktoken).

    A SentencePiece model without the ``sentencepiece`` extra is an error naming the extra."""
    p = Path(path)
    if p.is_file() and looks_like_tiktoken(p):
        return None  # the special tokens are not in the file: the size is not known from it
    if p.suffix == ".model":
        require("sentencepiece", f"{p}: a SentencePiece tokenizer")
    try:
        return open_vocab(p).size
    except NeoxconvError:  # an unreadable tokenizer only loses the padding information
        return None

