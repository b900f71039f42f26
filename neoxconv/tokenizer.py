"""Tokenizer export (NeoX -> Hugging Face) and copy (Hugging Face -> NeoX).

Sources handled by :func:`export_tokenizer`:

* a Hugging Face ``tokenizers`` JSON file, such as NeoX's ``20B_tokenizer.json``
  (``tokenizer_type: HFTokenizer``): saved as a GPT-NeoX tokenizer with
  bos = eos = unk = ``<|endoftext|>`` and pad = ``<|padding|>`` when those tokens exist;
* a SentencePiece ``tokenizer.model`` (``tokenizer_type: SPMTokenizer``): converted to a
  Llama tokenizer whose bos/eos are the SentencePiece model's own bos/eos pieces (ids 1 and 2
  for Llama-style models), *not* NeoX's ``eod`` (spec §8, trap T16). The conversion reads the
  model file directly, so neither ``protobuf`` nor ``sentencepiece`` is needed to export;
  ``sentencepiece``, when installed, is used to check the result;
* a tiktoken BPE file (Meta's Llama 3 ``tokenizer.model``: lines ``<base64 token> <rank>``):
  converted with the ``tokenizers`` library (no ``tiktoken`` needed) to a byte-level BPE with
  the Llama 3 pre-tokenizer and Meta's 256 Llama 3 special tokens appended after the base
  vocabulary (``<|begin_of_text|>`` = bos, ``<|end_of_text|>`` = eos), checked against a
  tiktoken-equivalent reference encoder; any problem raises :class:`TiktokenUnsupported` so the
  caller can skip the tokenizer with a warning;
* a Hugging Face tokenizer directory: loaded with ``AutoTokenizer`` and saved again.

:func:`tokenizer_kind` tells the kinds apart by content, not only by name: a ``tokenizer.model``
may be SentencePiece (Llama 1/2, Mistral) or tiktoken (Llama 3).

Every export is reloaded from ``out_dir`` with ``AutoTokenizer`` and checked against the source
on a fixed set of probe strings, so a tokenizer class that would tokenize differently after a
reload is never published silently.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neoxconv.errors import NeoxconvError

NEOX_EOD = "<|endoftext|>"
NEOX_PAD = "<|padding|>"

KIND_HF_JSON = "hf-json"
KIND_SENTENCEPIECE = "sentencepiece"
KIND_HF_DIR = "hf-dir"
KIND_TIKTOKEN = "tiktoken"


class TiktokenUnsupported(NeoxconvError):
    """A tiktoken tokenizer that could not be converted; callers skip it with a warning."""

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


@dataclass
class TokenizerInfo:
    """What :func:`export_tokenizer` wrote; feed it to :func:`apply_special_ids` and the model card."""

    kind: str  # "hf-json" | "sentencepiece" | "tiktoken" | "hf-dir"
    tokenizer_class: str  # class name written to tokenizer_config.json
    vocab_size: int  # len(tokenizer): base vocabulary plus added tokens
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    embedding_rows: int  # rows of the model's embedding matrix
    padding_rows: int  # embedding_rows - vocab_size (vocabulary padding, spec §3.3)
    family: str
    source: str
    files: list[str] = field(default_factory=list)  # files written to out_dir
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- export


def export_tokenizer(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    embedding_rows: int,
    family: str,
    *,
    model_max_length: int | None = None,
) -> TokenizerInfo:
    """Write a Hugging Face tokenizer for ``source`` into ``out_dir``.

    ``embedding_rows`` is the number of rows of the model's input embedding. A tokenizer with
    more tokens than that is an error (the model could be fed ids it has no row for); fewer is
    normal (NeoX pads the vocabulary) and is reported as ``padding_rows``.
    ``model_max_length`` (e.g. the model's ``max_position_embeddings``) is written into
    ``tokenizer_config.json`` when given.
    """
    src = Path(source)
    out = Path(out_dir)
    if not src.exists():
        raise NeoxconvError(f"{src}: tokenizer not found")
    if embedding_rows is None or int(embedding_rows) <= 0:
        raise NeoxconvError(f"{src}: embedding_rows must be a positive integer, got {embedding_rows!r}")
    embedding_rows = int(embedding_rows)

    kind = tokenizer_kind(src)
    out.mkdir(parents=True, exist_ok=True)
    before = _listing(out)
    warnings: list[str] = []
    if kind == KIND_HF_JSON:
        tok = _export_hf_json(src, out, embedding_rows, model_max_length, warnings)
    elif kind == KIND_TIKTOKEN:
        tok = _export_tiktoken(src, out, embedding_rows, model_max_length, warnings)
    elif kind == KIND_SENTENCEPIECE:
        tok = _export_sentencepiece(src, out, embedding_rows, model_max_length, warnings)
    else:
        tok = _export_hf_dir(src, out, embedding_rows, model_max_length, warnings)

    vocab_size = len(tok)
    written = sorted(p for p in _listing(out) if p not in before or _listing(out)[p] != before[p])
    return TokenizerInfo(
        kind=kind,
        tokenizer_class=_saved_class(out, tok),
        vocab_size=vocab_size,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        unk_token_id=tok.unk_token_id,
        embedding_rows=embedding_rows,
        padding_rows=embedding_rows - vocab_size,
        family=family,
        source=str(src),
        files=written,
        warnings=warnings,
    )


def apply_special_ids(config: dict, generation_config: dict, info: TokenizerInfo) -> tuple[dict, dict]:
    """Write the tokenizer's bos/eos/pad ids into ``config.json`` and ``generation_config.json`` dicts.

    Both dicts are updated in place and returned. ``vocab_size`` is left alone: it is the number
    of embedding rows (padded), not the tokenizer size. A pad id is only written when the
    tokenizer has a pad token.
    """
    for target in (config, generation_config):
        target["bos_token_id"] = info.bos_token_id
        target["eos_token_id"] = info.eos_token_id
        if info.pad_token_id is not None:
            target["pad_token_id"] = info.pad_token_id
    return config, generation_config


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
    if src.is_file() and _looks_like_tiktoken(src):
        return KIND_TIKTOKEN
    if src.suffix == ".json":
        return KIND_HF_JSON
    if src.suffix == ".model":
        return KIND_SENTENCEPIECE
    raise NeoxconvError(f"{src}: unknown tokenizer format (expected a tokenizers .json, a SentencePiece or "
                        "tiktoken .model or a directory)")


_detect_kind = tokenizer_kind


def _saved_class(out: Path, tok) -> str:
    try:
        return json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))["tokenizer_class"]
    except (OSError, ValueError, KeyError):
        return type(tok).__name__


def _listing(d: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir() if p.is_file()}


def _check_size(src: Path, n_tokens: int, embedding_rows: int) -> None:
    if n_tokens > embedding_rows:
        raise NeoxconvError(
            f"{src}: tokenizer has {n_tokens} tokens but the model's embedding has only {embedding_rows} rows"
        )


def _load_raw_json(src: Path):
    from tokenizers import Tokenizer

    try:
        with open(src, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise NeoxconvError(f"{src}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or "model" not in data:
        raise NeoxconvError(
            f"{src}: not a Hugging Face tokenizers JSON (no 'model' section; a GPT-2 vocab.json is not supported)"
        )
    try:
        return Tokenizer.from_file(str(src)), data
    except Exception as e:  # the Rust error types are not exported
        raise NeoxconvError(f"{src}: cannot be read as a tokenizers JSON ({_one_line(e)})") from None


def _first_present(raw, candidates) -> str | None:
    for c in candidates:
        if raw.token_to_id(c) is not None:
            return c
    return None


def _is_neox_pipeline(data: dict) -> tuple[bool, dict]:
    """True when the JSON uses exactly the pipeline GPTNeoXTokenizer rebuilds on reload."""
    model = data.get("model") or {}
    norm = data.get("normalizer") or {}
    pre = data.get("pre_tokenizer") or {}
    dec = data.get("decoder") or {}
    ok = (
        model.get("type") == "BPE"
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and norm.get("type") == "NFC"
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and dec.get("type") == "ByteLevel"
    )
    kwargs = {"add_prefix_space": bool(pre.get("add_prefix_space", False)), "trim_offsets": bool(pre.get("trim_offsets", True))}
    return ok, kwargs


def _export_hf_json(src: Path, out: Path, embedding_rows: int, model_max_length, warnings: list[str]):
    import transformers

    raw, data = _load_raw_json(src)
    eod = _first_present(raw, (NEOX_EOD,))
    specials: dict[str, str | None]
    if eod is not None:
        # NeoX HFTokenizer convention (and Pythia on the Hub): bos = eos = unk = <|endoftext|>.
        specials = {"bos_token": eod, "eos_token": eod, "unk_token": eod}
    else:
        eos = _first_present(raw, ("</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>"))
        specials = {
            "bos_token": _first_present(raw, ("<s>", "<|begin_of_text|>", "<bos>")),
            "eos_token": eos,
            "unk_token": _first_present(raw, ("<unk>",)),
        }
        warnings.append(f"{src.name}: no {NEOX_EOD} token; special tokens guessed as {specials}")
    specials["pad_token"] = _first_present(raw, (NEOX_PAD, "<pad>"))

    neox_ok, neox_kwargs = _is_neox_pipeline(data)
    neox_cls = getattr(transformers, "GPTNeoXTokenizerFast", None) or getattr(transformers, "GPTNeoXTokenizer")
    candidates = []
    if neox_ok:
        candidates.append((neox_cls, neox_kwargs))
    candidates.append((transformers.PreTrainedTokenizerFast, {}))

    reference = [raw.encode(t, add_special_tokens=False).ids for t in PROBE_TEXTS]
    last_problem = ""
    for cls, extra in candidates:
        try:
            tok = cls(tokenizer_file=str(src), **specials, **extra)
        except Exception as e:
            raise NeoxconvError(f"{src}: cannot build a {cls.__name__} ({_one_line(e)})") from None
        _check_size(src, len(tok), embedding_rows)
        if len(tok) != raw.get_vocab_size(with_added_tokens=True):
            last_problem = f"{cls.__name__} has {len(tok)} tokens, the JSON has {raw.get_vocab_size(with_added_tokens=True)}"
            continue
        _save(tok, out, model_max_length, src)
        problem = _roundtrip_problem(out, PROBE_TEXTS, reference)
        if problem is None:
            return tok
        last_problem = f"{cls.__name__}: {problem}"
    raise NeoxconvError(f"{src}: exported tokenizer does not reproduce the source ({last_problem})")


def _export_hf_dir(src: Path, out: Path, embedding_rows: int, model_max_length, warnings: list[str]):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except Exception as e:
        raise NeoxconvError(f"{src}: cannot load the tokenizer directory ({_one_line(e)})") from None
    _check_size(src, len(tok), embedding_rows)
    if tok.eos_token_id is None:
        warnings.append(f"{src.name}: tokenizer has no eos token")
    if src.resolve() != out.resolve():
        _save(tok, out, model_max_length, src)
        spm = src / "tokenizer.model"
        if spm.is_file() and not (out / "tokenizer.model").exists() and not _looks_like_tiktoken(spm):
            shutil.copyfile(spm, out / "tokenizer.model")
    return tok


def _save(tok, out: Path, model_max_length, src: Path) -> None:
    if model_max_length:
        tok.model_max_length = int(model_max_length)
    try:
        tok.save_pretrained(str(out))
        # transformers 5 names its generic class TokenizersBackend; the older, still understood
        # name keeps the export loadable by transformers 4 as well.
        cfg_path = out / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            if cfg.get("tokenizer_class") == "TokenizersBackend":
                cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
                cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except (OSError, ValueError) as e:
        raise NeoxconvError(f"{out}: cannot write the tokenizer ({_one_line(e)})") from None


def _roundtrip_problem(out: Path, texts, reference: list[list[int]]) -> str | None:
    """Reload ``out`` with AutoTokenizer and compare the probe encodings; None when identical."""
    from transformers import AutoTokenizer

    try:
        again = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    except Exception as e:
        return f"cannot be reloaded ({_one_line(e)})"
    for text, ids in zip(texts, reference):
        got = again(text, add_special_tokens=False)["input_ids"]
        if got != ids:
            return f"encodes {text!r} as {got[:12]}... instead of {ids[:12]}"
    return None


# --------------------------------------------------------------------------- SentencePiece

# sentencepiece_model.proto: ModelProto.pieces = 1, trainer_spec = 2, normalizer_spec = 3;
# SentencePiece.piece = 1, score = 2, type = 3; TrainerSpec.model_type = 3, byte_fallback = 35,
# unk/bos/eos/pad_id = 40..43, unk/bos/eos/pad_piece = 45..48;
# NormalizerSpec.name = 1, add_dummy_prefix = 3, remove_extra_whitespaces = 4.
_PIECE_NORMAL, _PIECE_UNKNOWN, _PIECE_CONTROL, _PIECE_USER, _PIECE_UNUSED, _PIECE_BYTE = 1, 2, 3, 4, 5, 6
_MODEL_UNIGRAM, _MODEL_BPE = 1, 2


def _proto_fields(buf: bytes):
    """Yield (field_number, wire_type, value) of one protobuf message (wire format only)."""
    i, n = 0, len(buf)

    def varint():
        nonlocal i
        shift = result = 0
        while True:
            if i >= n:
                raise ValueError("truncated varint")
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    while i < n:
        key = varint()
        num, wt = key >> 3, key & 7
        if wt == 0:
            yield num, wt, varint()
        elif wt == 1:
            yield num, wt, buf[i : i + 8]
            i += 8
        elif wt == 2:
            ln = varint()
            if i + ln > n:
                raise ValueError("truncated field")
            yield num, wt, buf[i : i + ln]
            i += ln
        elif wt == 5:
            yield num, wt, buf[i : i + 4]
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wt}")


def _int32(v: int) -> int:
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass
class _SpmModel:
    pieces: list[tuple[str, float, int]]
    model_type: int = _MODEL_UNIGRAM
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    normalizer: str = "nmt_nfkc"
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True


def _read_spm(path: Path) -> _SpmModel:
    try:
        buf = path.read_bytes()
        model = _SpmModel(pieces=[])
        for num, wt, val in _proto_fields(buf):
            if num == 1 and wt == 2:
                piece, score, ptype = "", 0.0, _PIECE_NORMAL
                for pn, pwt, pv in _proto_fields(val):
                    if pn == 1 and pwt == 2:
                        piece = pv.decode("utf-8")
                    elif pn == 2 and pwt == 5:
                        score = struct.unpack("<f", pv)[0]
                    elif pn == 3 and pwt == 0:
                        ptype = pv
                model.pieces.append((piece, score, ptype))
            elif num == 2 and wt == 2:
                for tn, twt, tv in _proto_fields(val):
                    if twt != 0:
                        continue
                    if tn == 3:
                        model.model_type = tv
                    elif tn == 35:
                        model.byte_fallback = bool(tv)
                    elif tn == 40:
                        model.unk_id = _int32(tv)
                    elif tn == 41:
                        model.bos_id = _int32(tv)
                    elif tn == 42:
                        model.eos_id = _int32(tv)
                    elif tn == 43:
                        model.pad_id = _int32(tv)
            elif num == 3 and wt == 2:
                for nn, nwt, nv in _proto_fields(val):
                    if nn == 1 and nwt == 2:
                        model.normalizer = nv.decode("utf-8")
                    elif nn == 3 and nwt == 0:
                        model.add_dummy_prefix = bool(nv)
                    elif nn == 4 and nwt == 0:
                        model.remove_extra_whitespaces = bool(nv)
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as e:
        raise NeoxconvError(f"{path}: not a readable SentencePiece model ({_one_line(e)})") from None
    if not model.pieces:
        raise NeoxconvError(f"{path}: not a SentencePiece model (no pieces)")
    return model


def _spm_piece(model: _SpmModel, idx: int) -> str | None:
    return model.pieces[idx][0] if 0 <= idx < len(model.pieces) else None


def _bpe_merges(vocab: dict[str, int], mergeable: set[str]) -> list[tuple[str, str]]:
    """Merges for an SPM-BPE vocabulary: every split of a piece into two pieces, in piece-id order."""
    found = []
    for piece, pid in vocab.items():
        if piece not in mergeable:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in mergeable and right in mergeable:
                found.append((pid, vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for _, _, _, left, right in found]


def _build_spm_backend(src: Path, model: _SpmModel, *, legacy: bool):
    """A ``tokenizers`` backend for an SPM model.

    ``legacy=False`` is the pipeline transformers' Llama tokenizer uses (Metaspace pre-tokenizer);
    ``legacy=True`` prepends the dummy-prefix ``▁`` in the normalizer, which is what
    sentencepiece itself does, also for texts that start with whitespace.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE, Unigram

    unk_piece = _spm_piece(model, model.unk_id)
    if model.model_type == _MODEL_BPE:
        vocab = {p: i for i, (p, _, _) in enumerate(model.pieces)}
        mergeable = {p for p, _, t in model.pieces if t in (_PIECE_NORMAL, _PIECE_USER, _PIECE_UNUSED)}
        backend = Tokenizer(
            BPE(
                vocab=vocab,
                merges=_bpe_merges(vocab, mergeable),
                unk_token=unk_piece,
                fuse_unk=True,
                byte_fallback=model.byte_fallback,
                dropout=None,
            )
        )
    elif model.model_type == _MODEL_UNIGRAM:
        backend = Tokenizer(
            Unigram(
                [(p, s) for p, s, _ in model.pieces],
                unk_id=model.unk_id if model.unk_id >= 0 else None,
                byte_fallback=model.byte_fallback,
            )
        )
    else:
        raise NeoxconvError(f"{src}: SentencePiece model type {model.model_type} (word/char) is not supported")

    if legacy:
        steps = [normalizers.Prepend("▁")] if model.add_dummy_prefix else []
        backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    else:
        prepend = "first" if model.add_dummy_prefix else "never"
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if model.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)

    added = []
    for p, _, t in model.pieces:
        if t in (_PIECE_UNKNOWN, _PIECE_CONTROL):
            added.append(AddedToken(p, special=True, normalized=False))
        elif t == _PIECE_USER:
            added.append(AddedToken(p, special=False, normalized=False))
    if added:
        backend.add_tokens(added)
    bos = _spm_piece(model, model.bos_id)
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, model.bos_id)]
        )
    return backend


def _export_sentencepiece(src: Path, out: Path, embedding_rows: int, model_max_length, warnings: list[str]):
    import transformers

    model_file = src / "tokenizer.model" if src.is_dir() else src
    model = _read_spm(model_file)
    specials = {
        "bos_token": _spm_piece(model, model.bos_id),
        "eos_token": _spm_piece(model, model.eos_id),
        "unk_token": _spm_piece(model, model.unk_id),
        "pad_token": _spm_piece(model, model.pad_id),
    }
    if model.normalizer not in ("identity", ""):
        warnings.append(
            f"{model_file.name}: SentencePiece normalization '{model.normalizer}' is not reproduced by the "
            "Hugging Face tokenizer (Llama models use 'identity')"
        )
    if model.remove_extra_whitespaces:
        warnings.append(
            f"{model_file.name}: SentencePiece collapses runs of whitespace (remove_extra_whitespaces); "
            "the Hugging Face tokenizer keeps them"
        )

    sp = None
    try:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    except ImportError:
        warnings.append("sentencepiece is not installed: the converted tokenizer was not checked against it")
    except Exception as e:
        raise NeoxconvError(f"{model_file}: sentencepiece cannot load it ({_one_line(e)})") from None

    # transformers' Llama tokenizer gives a text that *starts* with whitespace one dummy-prefix
    # piece less than sentencepiece; that case is reported, not used to reject the Llama class.
    body = [t for t in PROBE_TEXTS if not t[:1].isspace()]
    leading = [t for t in PROBE_TEXTS if t[:1].isspace()]

    llama_cls = getattr(transformers, "LlamaTokenizerFast", None) or getattr(transformers, "LlamaTokenizer")
    candidates = []
    if model.model_type == _MODEL_BPE:
        candidates.append((llama_cls, False, {"add_prefix_space": model.add_dummy_prefix, "legacy": False}))
    candidates.append((transformers.PreTrainedTokenizerFast, True, {}))

    tok = None
    problem = None
    with tempfile.TemporaryDirectory(prefix="neoxconv-spm-") as tmp:
        for cls, legacy, extra in candidates:
            json_path = os.path.join(tmp, f"tokenizer-{int(legacy)}.json")
            _build_spm_backend(model_file, model, legacy=legacy).save(json_path)
            try:
                tok = cls(
                    tokenizer_file=json_path,
                    add_bos_token=specials["bos_token"] is not None,
                    add_eos_token=False,
                    **specials,
                    **extra,
                )
            except Exception as e:
                raise NeoxconvError(f"{model_file}: cannot build a {cls.__name__} ({_one_line(e)})") from None
            _check_size(model_file, len(tok), embedding_rows)
            _save(tok, out, model_max_length, model_file)
            if sp is None:
                break
            problem = _roundtrip_problem(out, body, [sp.encode(t) for t in body])
            if problem is None:
                break
    if sp is not None:
        if problem is not None:
            warnings.append(f"{model_file.name}: the exported tokenizer differs from sentencepiece: {problem}")
        else:
            lead = _roundtrip_problem(out, leading, [sp.encode(t) for t in leading])
            if lead is not None:
                warnings.append(
                    f"{model_file.name}: texts starting with whitespace are tokenized with one dummy-prefix "
                    "piece less than sentencepiece (transformers' Llama tokenizer behaviour)"
                )
    if not (out / "tokenizer.model").exists() or (out / "tokenizer.model").resolve() != model_file.resolve():
        # Kept for tools that want the original model (NeoX SPMTokenizer, llama.cpp, ...).
        shutil.copyfile(model_file, out / "tokenizer.model")
    return tok


# --------------------------------------------------------------------------- tiktoken (Llama 3)

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
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} [0-9]+$")


def llama3_special_tokens(version: str = "3") -> list[str]:
    """Meta's 256 Llama 3 (``"3"``) or Llama 3.1+ (``"3.1"``) special tokens, in id order."""
    named = _LLAMA3_SPECIALS[version]
    first_reserved = 5 if version == "3" else 3
    return named + [f"<|reserved_special_token_{first_reserved + i}|>" for i in range(LLAMA3_NUM_SPECIAL - len(named))]


def _looks_like_tiktoken(path: Path) -> bool:
    """True when the file starts with tiktoken BPE lines (``<base64> <rank>``); the rest of the
    file is checked by :func:`read_tiktoken`."""
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


def read_tiktoken(path: str | os.PathLike) -> dict[bytes, int]:
    """The mergeable ranks of a tiktoken BPE file, checked: unique ranks 0..n-1, all 256 bytes."""
    p = Path(path)
    ranks: dict[bytes, int] = {}
    try:
        for no, line in enumerate(p.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            if not _TIKTOKEN_LINE.match(line.strip()):
                raise TiktokenUnsupported(f"{p}: line {no} is not '<base64 token> <rank>'")
            tok, rank = line.split()
            token = base64.b64decode(tok, validate=True)
            if token in ranks:
                raise TiktokenUnsupported(f"{p}: token {token!r} listed twice (line {no})")
            ranks[token] = int(rank)
    except (OSError, binascii.Error, ValueError) as e:
        raise TiktokenUnsupported(f"{p}: not a readable tiktoken file ({_one_line(e)})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TiktokenUnsupported(f"{p}: tiktoken ranks are not 0..{len(ranks) - 1} without gaps")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TiktokenUnsupported(f"{p}: not a complete byte-level BPE ({len(missing)} of the 256 single bytes "
                                  "have no token)")
    return ranks


def _tiktoken_reference(ranks: dict[bytes, int], pattern: str):
    """A tiktoken-equivalent encoder (regex split, then lowest-rank-first byte-pair merging)."""
    import regex

    pat = regex.compile(pattern)

    def encode(text: str) -> list[int]:
        ids: list[int] = []
        for piece in pat.findall(text):
            b = piece.encode("utf-8")
            if b in ranks:
                ids.append(ranks[b])
                continue
            parts = [b[i:i + 1] for i in range(len(b))]
            while len(parts) > 1:
                best = None
                for i in range(len(parts) - 1):
                    r = ranks.get(parts[i] + parts[i + 1])
                    if r is not None and (best is None or r < best[0]):
                        best = (r, i)
                if best is None:
                    break
                i = best[1]
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids.extend(ranks[x] for x in parts)
        return ids

    return encode


def _build_tiktoken_backend(ranks: dict[bytes, int], pattern: str, specials: list[str], bos: str):
    """The ``tokenizers`` equivalent of a tiktoken encoding (what transformers' TikTokenConverter
    builds, without needing the ``tiktoken`` package to read the file)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    byte_char = _bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab = {s(t): r for t, r in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        local = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
        local.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges.extend((rank, left, right) for left, right in local)
    merges.sort(key=lambda m: m[0])
    backend = Tokenizer(BPE(vocab, [(s(left), s(right)) for _, left, right in merges], fuse_unk=False))
    if hasattr(backend.model, "ignore_merges"):
        backend.model.ignore_merges = True  # a piece that is itself a token is that token (tiktoken)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    bos_id = backend.token_to_id(bos)
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, bos_id)]),
    ])
    return backend


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _llama3_version(model_file: Path) -> str:
    """``"3.1"`` when Meta's params.json next to the file has Llama 3.1's ``use_scaled_rope``, else ``"3"``."""
    try:
        params = json.loads((model_file.parent / "params.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "3"
    return "3.1" if isinstance(params, dict) and "use_scaled_rope" in params else "3"


def _export_tiktoken(src: Path, out: Path, embedding_rows: int, model_max_length, warnings: list[str]):
    """Convert a tiktoken file (Llama 3) to a Hugging Face fast tokenizer; TiktokenUnsupported if not possible.

    Nothing is written to ``out`` unless the result reloads and encodes the probe texts exactly
    like the reference encoder.
    """
    import transformers

    model_file = src / "tokenizer.model" if src.is_dir() else src
    ranks = read_tiktoken(model_file)
    version = _llama3_version(model_file)
    specials = llama3_special_tokens(version)
    n_tokens = len(ranks) + len(specials)
    if n_tokens > embedding_rows:
        raise TiktokenUnsupported(
            f"{model_file}: tiktoken vocabulary ({len(ranks)}) + {len(specials)} Llama 3 special tokens = {n_tokens} "
            f"tokens, but the model's embedding has only {embedding_rows} rows"
        )
    if len(ranks) != 128000:
        warnings.append(f"{model_file.name}: tiktoken file with {len(ranks)} tokens (Llama 3 has 128000); "
                        "converted with Llama 3's split pattern and special tokens")
    try:
        reference = _tiktoken_reference(ranks, LLAMA3_PATTERN)
    except ImportError:
        raise TiktokenUnsupported("the 'regex' package is needed to check a tiktoken conversion") from None
    bos, eos = specials[0], specials[1]
    with tempfile.TemporaryDirectory(prefix="neoxconv-tiktoken-") as tmp:
        stage = Path(tmp)
        try:
            backend = _build_tiktoken_backend(ranks, LLAMA3_PATTERN, specials, bos)
            tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos)
        except Exception as e:  # the Rust error types are not exported
            raise TiktokenUnsupported(f"{model_file}: cannot build a fast tokenizer ({_one_line(e)})") from None
        if len(tok) != n_tokens or tok.convert_tokens_to_ids(bos) != len(ranks):
            raise TiktokenUnsupported(f"{model_file}: converted tokenizer has {len(tok)} tokens, expected {n_tokens}")
        _save(tok, stage, model_max_length, model_file)
        problem = _roundtrip_problem(stage, PROBE_TEXTS, [reference(t) for t in PROBE_TEXTS])
        if problem is not None:
            raise TiktokenUnsupported(f"{model_file}: converted tokenizer differs from tiktoken: {problem}")
        for f in stage.iterdir():
            if f.is_file():
                shutil.copyfile(f, out / f.name)
    # Meta's original file, where Meta's own HF repos keep it (not at the top: tools would take a
    # top-level tokenizer.model for SentencePiece).
    (out / "original").mkdir(exist_ok=True)
    shutil.copyfile(model_file, out / "original" / "tokenizer.model")
    return tok


# --------------------------------------------------------------------------- NeoX side


def _neox_get(args: dict, key: str):
    for k in (key, key.replace("_", "-"), key.replace("-", "_")):
        if k in args and args[k] is not None:
            return args[k]
    return None


def find_neox_tokenizer(neox_args: dict, base_dir: str | os.PathLike) -> Path | None:
    """Locate the tokenizer a NeoX config points at, or None.

    Reads ``vocab_file`` / ``vocab-file`` and ``tokenizer_type`` (``HFTokenizer`` -> a
    tokenizers ``.json``; ``SPMTokenizer`` -> a SentencePiece ``.model``). A relative path is
    tried against ``base_dir`` (the checkpoint or config directory) and its parents, then by
    file name inside ``base_dir`` (a tokenizer copied next to the checkpoint). Other tokenizer
    types (GPT2BPETokenizer, CharLevelTokenizer, TiktokenTokenizer) give None.
    """
    vocab = _neox_get(neox_args or {}, "vocab_file")
    if not vocab:
        return None
    ttype = str(_neox_get(neox_args, "tokenizer_type") or "").strip()
    wanted = {"HFTokenizer": (".json",), "SPMTokenizer": (".model",)}.get(ttype)
    if wanted is None:
        if ttype:
            return None
        wanted = (".json", ".model")  # no tokenizer_type: decide by extension

    base = Path(base_dir)
    p = Path(os.path.expanduser(str(vocab)))
    tries = [p] if p.is_absolute() else [base / p, *[parent / p for parent in base.parents][:3], Path.cwd() / p]
    tries.append(base / p.name)
    for cand in tries:
        if cand.is_file() and cand.suffix in wanted:
            return cand.resolve()
    return None


def copy_tokenizer_for_neox(source: str | os.PathLike, out_dir: str | os.PathLike,
                            warnings: list[str] | None = None) -> dict:
    """Copy a tokenizer next to a NeoX checkpoint; return the NeoX YAML keys to write.

    * a SentencePiece ``tokenizer.model`` (a file, or present in an HF directory) ->
      ``{"tokenizer_type": "SPMTokenizer", "vocab_file": <copied .model>}``. It is preferred
      over ``tokenizer.json`` when a directory has both (Llama/Mistral repos), because NeoX's
      HFTokenizer needs an ``<|endoftext|>`` token that those vocabularies lack;
    * otherwise a tokenizers ``tokenizer.json`` (a file or in a directory) ->
      ``{"tokenizer_type": "HFTokenizer", "vocab_file": <copied .json>}``;
    * a tiktoken ``tokenizer.model`` (Llama 3) is not a SentencePiece model, and NeoX's
      ``TiktokenTokenizer`` takes a tiktoken *encoding name* (``tiktoken.get_encoding(vocab_file)``),
      not a file: a directory falls back to its ``tokenizer.json``; a lone tiktoken file is not
      copied, ``{}`` is returned and a warning is appended to ``warnings``.

    ``vocab_file`` is an absolute path, so the YAML works from any launch directory.
    """
    src = Path(source)
    out = Path(out_dir)
    skipped = (f"{src}: tiktoken tokenizer (Llama 3) not carried to NeoX: NeoX's TiktokenTokenizer takes a "
               "tiktoken encoding name, not a file, and SPMTokenizer cannot read it; set tokenizer-type / "
               "vocab-file yourself (e.g. HFTokenizer with a converted tokenizer.json)")
    if src.is_dir():
        spm, js = src / "tokenizer.model", src / "tokenizer.json"
        spm_ok = spm.is_file() and tokenizer_kind(spm) == KIND_SENTENCEPIECE
        if spm_ok:
            chosen, ttype = spm, "SPMTokenizer"
        elif js.is_file():
            chosen, ttype = js, "HFTokenizer"
        elif spm.is_file():
            if warnings is not None:
                warnings.append(skipped)
            return {}
        else:
            raise NeoxconvError(f"{src}: no tokenizer.json or tokenizer.model to copy for NeoX")
    elif src.is_file() and tokenizer_kind(src) == KIND_TIKTOKEN:
        if warnings is not None:
            warnings.append(skipped)
        return {}
    elif src.is_file() and src.suffix == ".model":
        chosen, ttype = src, "SPMTokenizer"
    elif src.is_file() and src.suffix == ".json":
        _load_raw_json(src)
        chosen, ttype = src, "HFTokenizer"
    else:
        raise NeoxconvError(f"{src}: tokenizer not found (expected a directory, a .json or a .model)")

    out.mkdir(parents=True, exist_ok=True)
    dest = out / chosen.name
    try:
        if not dest.exists() or dest.resolve() != chosen.resolve():
            shutil.copyfile(chosen, dest)
    except OSError as e:
        raise NeoxconvError(f"{dest}: cannot copy the tokenizer ({_one_line(e)})") from None
    return {"tokenizer_type": ttype, "vocab_file": str(dest.resolve())}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def tokenizer_size(path: str | os.PathLike) -> int | None:
    """Number of tokens of a tokenizers JSON or SentencePiece model (None if unreadable or tiktoken)."""
    p = Path(path)
    try:
        if p.is_file() and _looks_like_tiktoken(p):
            return None  # the special tokens are not in the file: the size is not known from it
        if p.suffix == ".model":
            return len(_read_spm(p).pieces)
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(p)).get_vocab_size(with_added_tokens=True)
    except Exception:  # noqa: BLE001 - an unreadable tokenizer only loses the padding information
        return None
