"""TextSettings from tokenizer files: what an HF directory records, the T16 rules for tokenizers that
record nothing (NeoX's tokenizer JSON, SentencePiece, Meta's tiktoken), and ``--chat-template`` /
``--eos-token`` on top (``resolve_settings``)."""

from __future__ import annotations

import json
from pathlib import Path

from neoxconv.errors import NeoxconvError
from neoxconv.text_settings import TOKENIZER_OPTIONS, AddedToken, GenerationSettings, TextSettings, TokenizerSettings
from neoxconv.tokenizer.kinds import (KIND_HF_DIR, KIND_HF_JSON, KIND_SENTENCEPIECE, NEOX_EOD, NEOX_PAD, model_file,
                                      tokenizer_kind)
from neoxconv.tokenizer.vocab import Vocab, load_raw_json, open_vocab, sentencepiece_processor

# transformers' own files of a tokenizer directory (copied verbatim beside a NeoX tokenizer).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")
HF_TEMPLATES_DIR = "additional_chat_templates"


# --------------------------------------------------------------------------- what an HF directory records


def hf_dir_settings(d: Path) -> TextSettings:
    """An HF model or tokenizer directory's settings: tokenizer_config.json (special_tokens_map.json
    fills what it lacks), chat_template.jinja / .json and additional_chat_templates/ (they win over
    tokenizer_config.json's chat_template, as in transformers), tokenizer.json's added tokens, and
    generation_config.json (else config.json's ids, which transformers would derive it from)."""
    return TextSettings(hf_tokenizer_settings(Path(d)), hf_generation_settings(Path(d)))


def hf_tokenizer_settings(d: Path) -> TokenizerSettings | None:
    """None when the directory has none of the files that say them (a bare tokenizer.json records
    no special tokens: the T16 rules apply to it)."""
    if not any((d / n).is_file() for n in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                                           "chat_template.json")):
        return None
    cfg = _json_or_empty(d / "tokenizer_config.json")
    stm = _json_or_empty(d / "special_tokens_map.json")

    def token(key: str) -> str | None:
        v = cfg.get(key) if cfg.get(key) is not None else stm.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return v if isinstance(v, str) else None

    default, named = None, {}
    templates = cfg.get("chat_template")
    if isinstance(templates, str):
        default = templates
    elif isinstance(templates, list):  # [{"name": ..., "template": ...}]
        named = {t["name"]: t["template"] for t in templates if isinstance(t, dict) and "name" in t}
        default = named.pop("default", None)
    if (d / "chat_template.jinja").is_file():
        default = (d / "chat_template.jinja").read_text(encoding="utf-8")
    elif (d / "chat_template.json").is_file():
        default = _json_or_empty(d / "chat_template.json").get("chat_template", default)
    for f in sorted((d / HF_TEMPLATES_DIR).glob("*.jinja")):
        named[f.stem] = f.read_text(encoding="utf-8")
    return TokenizerSettings(
        bos_token=token("bos_token"), eos_token=token("eos_token"), pad_token=token("pad_token"),
        unk_token=token("unk_token"), added_tokens=_added_tokens(d, cfg), chat_template=default,
        named_chat_templates=tuple(sorted(named.items())),
        options=tuple((k, cfg[k]) for k in TOKENIZER_OPTIONS if cfg.get(k) is not None))


def hf_generation_settings(d: Path) -> GenerationSettings | None:
    if (d / "generation_config.json").is_file():
        return GenerationSettings.from_json(_json_or_empty(d / "generation_config.json"),
                                            str(d / "generation_config.json"))
    if (d / "config.json").is_file():
        cfg = _json_or_empty(d / "config.json")
        ids = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
        if ids:
            return GenerationSettings.from_json({"_from_model_config": True, **ids}, str(d / "config.json"))
    return None


def _read_json(path: Path):
    """A JSON file read as UTF-8 (tokenizer files hold non-ASCII tokens, whatever the locale)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise NeoxconvError(f"{path}: not a readable JSON file ({e})") from None


def _json_or_empty(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise NeoxconvError(f"{path}: expected a JSON object")
    return data


def _added_tokens(d: Path, cfg: dict) -> tuple[AddedToken, ...]:
    keys = ("special", "normalized", "lstrip", "rstrip", "single_word")
    if (d / "tokenizer.json").is_file():
        entries = [(t["id"], t) for t in _json_or_empty(d / "tokenizer.json").get("added_tokens") or ()]
    else:
        entries = [(int(i), t) for i, t in (cfg.get("added_tokens_decoder") or {}).items()]
    return tuple(AddedToken(int(i), t["content"], **{k: bool(t[k]) for k in keys if k in t})
                 for i, t in sorted(entries, key=lambda e: int(e[0])))


# --------------------------------------------------------------------------- T16: the tokenizer's own rules


def native_tokenizer_settings(src: Path, warnings: list[str]) -> TokenizerSettings:
    """Special tokens of a tokenizer that records none beyond its file (trap T16):

    * a tokenizers JSON (NeoX ``HFTokenizer``): bos = eos = unk = ``<|endoftext|>``, pad =
      ``<|padding|>`` when they exist (ids 0/0/0/1 for the 20B tokenizer); else guessed from the
      usual names, with a warning;
    * SentencePiece (``SPMTokenizer``): the model's own bos/eos/unk/pad pieces, not NeoX's eod;
    * tiktoken (Meta Llama 3): ``<|begin_of_text|>`` / ``<|end_of_text|>``;
    * an HF directory: what its files say.
    """
    kind = tokenizer_kind(src)
    if kind == KIND_HF_DIR:
        recorded = hf_tokenizer_settings(src)
        if recorded is not None or not (src / "tokenizer.json").is_file():
            return recorded or TokenizerSettings()
        src, kind = src / "tokenizer.json", KIND_HF_JSON
    if kind == KIND_HF_JSON:
        raw, _ = load_raw_json(src)

        def first(*names: str) -> str | None:
            return next((n for n in names if raw.token_to_id(n) is not None), None)

        if first(NEOX_EOD):
            specials = {"bos_token": NEOX_EOD, "eos_token": NEOX_EOD, "unk_token": NEOX_EOD}
        else:
            specials = {"bos_token": first("<s>", "<|begin_of_text|>", "<bos>"),
                        "eos_token": first("</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>"),
                        "unk_token": first("<unk>")}
            warnings.append(f"{src.name}: no {NEOX_EOD} token; special tokens guessed as {specials}")
        added = tuple(AddedToken(i, t.content, special=t.special, normalized=t.normalized, lstrip=t.lstrip,
                                 rstrip=t.rstrip, single_word=t.single_word)
                      for i, t in sorted(raw.get_added_tokens_decoder().items()))
        return TokenizerSettings(**specials, pad_token=first(NEOX_PAD, "<pad>"), added_tokens=added)
    if kind == KIND_SENTENCEPIECE:
        sp = sentencepiece_processor(model_file(src))

        def piece(i: int) -> str | None:
            return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

        return TokenizerSettings(bos_token=piece(sp.bos_id()), eos_token=piece(sp.eos_id()),
                                 pad_token=piece(sp.pad_id()), unk_token=piece(sp.unk_id()))
    from neoxconv.tokenizer.llama3 import llama3_specials_for

    specials = llama3_specials_for(model_file(src))
    return TokenizerSettings(bos_token=specials[0], eos_token=specials[1])


def generation_from_tokenizer(ts: TokenizerSettings, vocab: Vocab, derived: GenerationSettings | None = None
                              ) -> GenerationSettings:
    """generation_config.json as transformers derives it from a config with the tokenizer's special
    ids; the other values of a ``derived`` one (and its ids where the tokenizer has none) are kept."""
    def tid(t: str | None, fallback: int | None) -> int | None:
        return vocab.id(t) if t is not None else fallback

    d = derived or GenerationSettings(params=(("_from_model_config", True),))
    return GenerationSettings(bos_token_id=tid(ts.bos_token, d.bos_token_id),
                              eos_token_id=tid(ts.eos_token, d.eos_token_id),
                              pad_token_id=tid(ts.pad_token, d.pad_token_id), params=d.params)


# --------------------------------------------------------------------------- one conversion's settings


def resolve_settings(recorded: TextSettings, source: Path | None, *, explicit: bool = False,
                     chat_template: Path | None = None, eos_tokens: tuple[str, ...] | list[str] = ()
                     ) -> tuple[TextSettings, list[str]]:
    """The settings a conversion writes, and warnings.

    ``recorded`` is what the reader found; ``source`` the tokenizer that is carried along
    (``explicit``: given with ``--tokenizer``, whose own settings then replace the recorded ones).
    What is not recorded comes from the tokenizer by the T16 rules, and so do the ids of a
    generation config that transformers derived from config.json. ``chat_template`` (a Jinja
    file) replaces the default template. ``eos_tokens``: the first becomes the tokenizer's
    eos_token, and all are added after generation_config's eos ids; one that is not in the
    vocabulary is an error naming it.
    """
    warnings: list[str] = []
    if source is None:
        if chat_template is not None or eos_tokens:
            raise NeoxconvError("--chat-template and --eos-token need a tokenizer, and none was found with the "
                                "source: pass --tokenizer")
        return recorded, warnings
    use_record = not explicit and recorded.tokenizer is not None
    tok = recorded.tokenizer if use_record else native_tokenizer_settings(Path(source), warnings)
    gen = recorded.generation if not explicit else None
    vocab = None
    if gen is None or gen.derived:  # a generation config derived from config.json follows the tokenizer (T16)
        vocab = open_vocab(Path(source))
        gen = generation_from_tokenizer(tok, vocab, gen)
    if chat_template is not None:
        tok = tok.replace(chat_template=read_chat_template(Path(chat_template)))
    if eos_tokens:
        vocab = vocab or open_vocab(Path(source))
        ids = []
        for t in eos_tokens:
            i = vocab.id(t)
            if i is None:
                raise NeoxconvError(f"--eos-token {t!r} is not a token of the tokenizer {source}")
            ids.append(i)
        tok = tok.replace(eos_token=eos_tokens[0])
        gen = gen.with_eos(ids)
    return TextSettings(tok, gen), warnings


def read_chat_template(path: Path) -> str:
    """A Jinja chat template file, checked to parse (as transformers compiles it)."""
    import jinja2

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NeoxconvError(f"{path}: chat template not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise NeoxconvError(f"{path}: cannot read the chat template ({e})") from None
    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise NeoxconvError(f"{path}: not a valid Jinja chat template (line {e.lineno}: {e.message})") from None
    return text
