"""Tokenizer kinds, told apart by content; the optional libraries each kind needs."""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

from neoxconv.errors import NeoxconvError

NEOX_EOD = "<|endoftext|>"
NEOX_PAD = "<|padding|>"

KIND_HF_JSON = "hf-json"
KIND_SENTENCEPIECE = "sentencepiece"
KIND_HF_DIR = "hf-dir"
KIND_TIKTOKEN = "tiktoken"

# Strings every exported tokenizer must encode exactly like its source.
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "GPT-NeoX checkpoints, converted: 20B, 1.4b & 6.9b!",
    "  leading spaces,\ttabs\tand\nnew lines\n\n",
    "runs of    spaces      matter   in code:\n    def f(x):\n        return x",
    "Unicode: café, naïve, Straße, 東京, Ελληνικά, emoji 🙂.",
    "digits 1234567890 and punctuation ()[]{}<>?!;:'\"",
    "end of document" + NEOX_EOD + "next document",
)

# pyproject extra -> the modules it installs.
EXTRAS = {"sentencepiece": ("sentencepiece", "google.protobuf"), "tiktoken": ("tiktoken",)}


class TiktokenUnsupported(NeoxconvError):
    """A tiktoken tokenizer that could not be converted; callers skip it with a warning."""


def require(extra: str, what: str, error: type[NeoxconvError] = NeoxconvError) -> None:
    """Raise ``error`` naming the pyproject extra to install when one of its modules is missing."""
    missing = [m for m in EXTRAS[extra] if not _installed(m)]
    if missing:
        raise error(f"{what} needs the '{extra}' extra ({', '.join(missing)} not installed): "
                    f"pip install 'neoxconv[{extra}]'")


def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def tokenizer_kind(path: str | os.PathLike) -> str:
    """``"sentencepiece"`` | ``"tiktoken"`` | ``"hf-json"`` | ``"hf-dir"`` for a tokenizer file or directory.

    A directory with ``tokenizer.json`` / ``tokenizer_config.json`` is ``hf-dir``; one with only a
    ``tokenizer.model`` is that file's kind. A file is ``tiktoken`` when its content is tiktoken BPE
    lines, whatever its name; otherwise ``.json`` -> ``hf-json`` and ``.model`` -> ``sentencepiece``.
    """
    src = Path(path)
    if src.is_dir():
        if (src / "tokenizer_config.json").is_file() or (src / "tokenizer.json").is_file():
            return KIND_HF_DIR
        if (src / "tokenizer.model").is_file():
            return tokenizer_kind(src / "tokenizer.model")
        raise NeoxconvError(f"{src}: directory has no tokenizer.json, tokenizer_config.json or tokenizer.model")
    if src.is_file() and looks_like_tiktoken(src):
        return KIND_TIKTOKEN
    if src.suffix == ".json":
        return KIND_HF_JSON
    if src.suffix == ".model":
        return KIND_SENTENCEPIECE
    raise NeoxconvError(f"{src}: unknown tokenizer format (expected a tokenizers .json, a SentencePiece or "
                        "tiktoken .model or a directory)")


_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} [0-9]+$")


def looks_like_tiktoken(path: Path) -> bool:
    """True when the file starts with tiktoken BPE lines (``<base64> <rank>``); the tiktoken
    library reads and checks the rest."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    lines = head.split(b"\n")
    if len(head) == 1 << 16:
        lines = lines[:-1]  # the last line may be cut
    lines = [ln.rstrip(b"\r") for ln in lines if ln.strip()]
    return bool(lines) and all(_TIKTOKEN_LINE.match(ln) for ln in lines[:10])


def model_file(src: Path) -> Path:
    """The ``tokenizer.model`` of a directory, or the file itself."""
    return src / "tokenizer.model" if src.is_dir() else src


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
