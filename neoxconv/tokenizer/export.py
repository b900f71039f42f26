"""Write a Hugging Face tokenizer for any tokenizer source, with its TokenizerSettings applied.

Sources: a tokenizers JSON (NeoX ``HFTokenizer``), a SentencePiece model (``spm``), a tiktoken file
(``llama3``), an HF tokenizer directory. Every export is reloaded from ``out_dir`` with
``AutoTokenizer`` and checked against the source on fixed probe texts, so a tokenizer class that
would tokenize differently after a reload is never published silently.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neoxconv.errors import NeoxconvError
from neoxconv.text_settings import TokenizerSettings
from neoxconv.tokenizer.kinds import (KIND_HF_DIR, KIND_HF_JSON, KIND_SENTENCEPIECE, PROBE_TEXTS, looks_like_tiktoken,
                                      model_file, one_line, tokenizer_kind)


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


def export_tokenizer(source: str | os.PathLike, out_dir: str | os.PathLike, embedding_rows: int, family: str, *,
                     model_max_length: int | None = None, settings: TokenizerSettings | None = None) -> TokenizerInfo:
    """Write a Hugging Face tokenizer for ``source`` into ``out_dir``.

    ``embedding_rows`` is the number of rows of the model's input embedding. A tokenizer with
    more tokens than that is an error (the model could be fed ids it has no row for); fewer is
    normal (NeoX pads the vocabulary) and is reported as ``padding_rows``.
    ``settings`` (special tokens, added tokens, chat template, tokenizer options) are applied;
    without them the tokenizer's own rules give the special tokens (T16). ``model_max_length``
    (e.g. the model's ``max_position_embeddings``) is written unless the settings have one.
    """
    from neoxconv.tokenizer.llama3 import export_tiktoken
    from neoxconv.tokenizer.settings import native_tokenizer_settings
    from neoxconv.tokenizer.spm import export_sentencepiece

    src, out = Path(source), Path(out_dir)
    if not src.exists():
        raise NeoxconvError(f"{src}: tokenizer not found")
    if embedding_rows is None or int(embedding_rows) <= 0:
        raise NeoxconvError(f"{src}: embedding_rows must be a positive integer, got {embedding_rows!r}")
    embedding_rows = int(embedding_rows)
    kind = tokenizer_kind(src)
    warnings: list[str] = []
    if settings is None:
        settings = native_tokenizer_settings(src, warnings)
    options = {"model_max_length": model_max_length, **dict(settings.options)}
    options = {k: v for k, v in options.items() if v is not None}
    out.mkdir(parents=True, exist_ok=True)
    before = _listing(out)
    exporter = {KIND_HF_JSON: _export_hf_json, KIND_SENTENCEPIECE: export_sentencepiece,
                KIND_HF_DIR: _export_hf_dir}.get(kind, export_tiktoken)
    tok = exporter(src if kind == KIND_HF_DIR else model_file(src), out, embedding_rows, settings, options, warnings)
    vocab_size = len(tok)
    after = _listing(out)
    return TokenizerInfo(
        kind=kind, tokenizer_class=_saved_class(out, tok), vocab_size=vocab_size, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, unk_token_id=tok.unk_token_id,
        embedding_rows=embedding_rows, padding_rows=embedding_rows - vocab_size, family=family, source=str(src),
        files=sorted(p for p in after if before.get(p) != after[p]), warnings=warnings)


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


def apply_settings(tok, settings: TokenizerSettings, src: Path) -> None:
    """Set special tokens, added tokens and chat templates on a transformers tokenizer.

    A special token must already be in the vocabulary (transformers would add it as a new
    token); an added token must sit at its recorded id (it is added when it is the next id)."""
    from tokenizers import AddedToken

    vocab = tok.get_vocab()
    for t in settings.added_tokens:
        have = vocab.get(t.content)
        if have is None and t.id == len(tok):
            tok.add_tokens([AddedToken(t.content, special=t.special, normalized=t.normalized, lstrip=t.lstrip,
                                       rstrip=t.rstrip, single_word=t.single_word)], special_tokens=t.special)
            vocab[t.content] = t.id
        elif have != t.id:
            raise NeoxconvError(f"{src}: added token {t.content!r} should have id {t.id}, the tokenizer has "
                                f"{'none' if have is None else have}")
    for key, token in settings.specials().items():
        if token not in vocab:
            raise NeoxconvError(f"{src}: {key} {token!r} is not in the tokenizer's vocabulary")
        if getattr(tok, key) != token:
            setattr(tok, key, token)
    templates = settings.chat_templates()
    if templates is not None:
        tok.chat_template = templates


def check_size(src: Path, n_tokens: int, embedding_rows: int) -> None:
    if n_tokens > embedding_rows:
        raise NeoxconvError(
            f"{src}: tokenizer has {n_tokens} tokens but the model's embedding has only {embedding_rows} rows")


def save(tok, out: Path, src: Path) -> None:
    try:
        tok.save_pretrained(str(out))
        # transformers 5 names its generic class TokenizersBackend; the older, still understood
        # name keeps the export loadable by transformers 4 as well.
        cfg_path = out / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            if cfg.get("tokenizer_class") == "TokenizersBackend":
                cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            for key in ("is_local", "local_files_only"):  # how it was loaded here, not what it is
                cfg.pop(key, None)
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except (OSError, ValueError) as e:
        raise NeoxconvError(f"{out}: cannot write the tokenizer ({one_line(e)})") from None


def roundtrip_problem(out: Path, texts, reference: list[list[int]]) -> str | None:
    """Reload ``out`` with AutoTokenizer and compare the probe encodings; None when identical."""
    from transformers import AutoTokenizer

    try:
        again = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        return f"cannot be reloaded ({one_line(e)})"
    for text, ids in zip(texts, reference):
        got = again(text, add_special_tokens=False)["input_ids"]
        if got != ids:
            return f"encodes {text!r} as {got[:12]}... instead of {ids[:12]}"
    return None


def _saved_class(out: Path, tok) -> str:
    try:
        return json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))["tokenizer_class"]
    except (OSError, ValueError, KeyError):
        return type(tok).__name__


def _listing(d: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir() if p.is_file()}


def _is_neox_pipeline(data: dict) -> tuple[bool, dict]:
    """True when the JSON uses exactly the pipeline GPTNeoXTokenizer rebuilds on reload."""
    model, norm = data.get("model") or {}, data.get("normalizer") or {}
    pre, dec = data.get("pre_tokenizer") or {}, data.get("decoder") or {}
    ok = (model.get("type") == "BPE" and not model.get("continuing_subword_prefix")
          and not model.get("end_of_word_suffix") and norm.get("type") == "NFC" and pre.get("type") == "ByteLevel"
          and pre.get("use_regex", True) and dec.get("type") == "ByteLevel")
    return ok, {"add_prefix_space": bool(pre.get("add_prefix_space", False)),
                "trim_offsets": bool(pre.get("trim_offsets", True))}


def _export_hf_json(src: Path, out: Path, embedding_rows: int, settings: TokenizerSettings, options: dict,
                    warnings: list[str]):
    """A tokenizers JSON: GPTNeoXTokenizer when its pipeline is exactly the one that class rebuilds,
    else the generic fast class, which keeps tokenizer.json verbatim."""
    import transformers

    from neoxconv.tokenizer.vocab import load_raw_json

    raw, data = load_raw_json(src)
    neox_ok, neox_kwargs = _is_neox_pipeline(data)
    neox_cls = getattr(transformers, "GPTNeoXTokenizerFast", None) or getattr(transformers, "GPTNeoXTokenizer")
    candidates = ([(neox_cls, neox_kwargs)] if neox_ok else []) + [(transformers.PreTrainedTokenizerFast, {})]
    reference = [raw.encode(t, add_special_tokens=False).ids for t in PROBE_TEXTS]
    n_raw = raw.get_vocab_size(with_added_tokens=True)
    last_problem = ""
    for cls, extra in candidates:
        try:
            tok = cls(tokenizer_file=str(src), **settings.specials(), **extra, **options)
        except Exception as e:  # noqa: BLE001
            raise NeoxconvError(f"{src}: cannot build a {cls.__name__} ({one_line(e)})") from None
        check_size(src, len(tok), embedding_rows)
        if len(tok) != n_raw:
            last_problem = f"{cls.__name__} has {len(tok)} tokens, the JSON has {n_raw}"
            continue
        apply_settings(tok, settings, src)
        save(tok, out, src)
        problem = roundtrip_problem(out, PROBE_TEXTS, reference)
        if problem is None:
            return tok
        last_problem = f"{cls.__name__}: {problem}"
    raise NeoxconvError(f"{src}: exported tokenizer does not reproduce the source ({last_problem})")


def _export_hf_dir(src: Path, out: Path, embedding_rows: int, settings: TokenizerSettings, options: dict,
                   warnings: list[str]):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True, **options)
    except Exception as e:  # noqa: BLE001
        raise NeoxconvError(f"{src}: cannot load the tokenizer directory ({one_line(e)})") from None
    check_size(src, len(tok), embedding_rows)
    apply_settings(tok, settings, src)
    if tok.eos_token_id is None:
        warnings.append(f"{src.name}: tokenizer has no eos token")
    if src.resolve() != out.resolve():
        save(tok, out, src)
        spm = src / "tokenizer.model"
        if spm.is_file() and not (out / "tokenizer.model").exists() and not looks_like_tiktoken(spm):
            shutil.copyfile(spm, out / "tokenizer.model")
    return tok
