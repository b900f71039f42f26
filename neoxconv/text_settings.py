"""TextSettings: how a model's text goes in and comes out, next to ModelSpec (what shapes its weights).

- ``TokenizerSettings``: the special tokens (bos/eos/pad/unk, as token strings), the added tokens, the
  chat template(s) and the ``tokenizer_config.json`` options that change encoding or decoding.
- ``GenerationSettings``: ``generation_config.json``: bos/eos/pad ids typed (eos may be a list, as
  for Llama 3 Instruct), every other value (temperature, top_p, ...) kept as it was.

Readers fill what their format records (HF: the tokenizer files and generation_config.json; NeoX:
neoxconv.json, or the record neoxconv left beside the NeoX tokenizer). What a format does not record
is derived from the tokenizer file by the T16 rules, and ``--chat-template`` / ``--eos-token`` are
applied, once per conversion (``neoxconv.tokenizer.resolve_settings``). Writers write the result.
A field that is ``None`` is not known; nothing is guessed here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from neoxconv.errors import NeoxconvError

# tokenizer_config.json fields that change what a tokenizer does, carried with the settings.
TOKENIZER_OPTIONS = ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces", "model_max_length",
                     "padding_side")
SPECIALS = ("bos_token", "eos_token", "pad_token", "unk_token")
RECORD_FORMAT = "neoxconv-text-settings"


@dataclass(frozen=True)
class AddedToken:
    """A token added on top of the base vocabulary (``tokenizer.json`` ``added_tokens``)."""

    id: int
    content: str
    special: bool = True
    normalized: bool = False
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False


@dataclass(frozen=True)
class TokenizerSettings:
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    added_tokens: tuple[AddedToken, ...] = ()
    chat_template: str | None = None  # the default template
    named_chat_templates: tuple[tuple[str, str], ...] = ()  # others, e.g. ("tool_use", "...")
    options: tuple[tuple[str, Any], ...] = ()  # TOKENIZER_OPTIONS present in the source

    def specials(self) -> dict[str, str]:
        """The special tokens that are set, as tokenizer keyword arguments."""
        return {k: getattr(self, k) for k in SPECIALS if getattr(self, k) is not None}

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    def chat_templates(self) -> str | dict[str, str] | None:
        """The value of a transformers tokenizer's ``chat_template``: one string, or named templates."""
        if not self.named_chat_templates:
            return self.chat_template
        named = dict(self.named_chat_templates)
        return {"default": self.chat_template, **named} if self.chat_template is not None else named

    def replace(self, **changes) -> TokenizerSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["named_chat_templates"] = dict(self.named_chat_templates)
        d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TokenizerSettings:
        return cls(**{k: d.get(k) for k in SPECIALS}, chat_template=d.get("chat_template"),
                   added_tokens=tuple(AddedToken(**t) for t in d.get("added_tokens") or ()),
                   named_chat_templates=tuple((d.get("named_chat_templates") or {}).items()),
                   options=tuple((d.get("options") or {}).items()))


@dataclass(frozen=True)
class GenerationSettings:
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    params: tuple[tuple[str, Any], ...] = ()  # every other generation_config.json value, in file order

    @property
    def derived(self) -> bool:
        """True when transformers derived this from config.json (``_from_model_config``): its ids
        are then the model config's, which may be a class default, not a choice (T16)."""
        return dict(self.params).get("_from_model_config") is True

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (e,) if isinstance(e, int) else tuple(e)

    def with_eos(self, ids: list[int]) -> GenerationSettings:
        """These eos ids added after the present ones (a list once there is more than one); the
        result is a choice, no longer derived from config.json."""
        merged = list(dict.fromkeys([*self.eos_ids, *ids]))
        return dataclasses.replace(self, eos_token_id=None if not merged else merged[0] if len(merged) == 1
                                   else tuple(merged),
                                   params=tuple((k, v) for k, v in self.params if k != "_from_model_config"))

    def token_ids(self) -> dict[str, Any]:
        """bos/eos/pad ids for ``config.json`` (only the known ones; a list eos as a list)."""
        out = {"bos_token_id": self.bos_token_id,
               "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
               "pad_token_id": self.pad_token_id}
        return {k: v for k, v in out.items() if v is not None}

    def to_json(self) -> dict:
        """``generation_config.json`` content (without ``transformers_version``)."""
        return {**dict(self.params), **self.token_ids()}

    @classmethod
    def from_json(cls, d: dict, where: str = "generation_config.json") -> GenerationSettings:
        ids = {}
        for key in ("bos_token_id", "pad_token_id"):
            v = d.get(key)
            if v is not None and not isinstance(v, int):
                raise NeoxconvError(f"{where}: {key} must be an integer, got {v!r}")
            ids[key] = v
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            if not all(isinstance(x, int) for x in eos):
                raise NeoxconvError(f"{where}: eos_token_id must be an integer or a list of integers, got {eos!r}")
            eos = tuple(eos)
        elif eos is not None and not isinstance(eos, int):
            raise NeoxconvError(f"{where}: eos_token_id must be an integer or a list of integers, got {eos!r}")
        skip = {"bos_token_id", "eos_token_id", "pad_token_id", "transformers_version"}
        return cls(**ids, eos_token_id=eos, params=tuple((k, v) for k, v in d.items() if k not in skip))

    def to_dict(self) -> dict:
        return self.to_json()


@dataclass(frozen=True)
class TextSettings:
    """A checkpoint's tokenizer and generation settings; ``None`` parts are not known."""

    tokenizer: TokenizerSettings | None = None
    generation: GenerationSettings | None = None

    @property
    def known(self) -> bool:
        return self.tokenizer is not None or self.generation is not None

    def replace(self, **changes) -> TextSettings:
        return dataclasses.replace(self, **changes)

    def to_record(self) -> dict:
        """The JSON record kept in neoxconv.json and beside a NeoX tokenizer."""
        return {"format": RECORD_FORMAT, "version": 1,
                "tokenizer": self.tokenizer.to_dict() if self.tokenizer else None,
                "generation": self.generation.to_json() if self.generation else None}

    @classmethod
    def from_record(cls, d: Any, where: str) -> TextSettings:
        if not isinstance(d, dict) or d.get("format") != RECORD_FORMAT:
            raise NeoxconvError(f"{where}: not a {RECORD_FORMAT} record")
        try:
            tok = TokenizerSettings.from_dict(d["tokenizer"]) if d.get("tokenizer") else None
        except (TypeError, AttributeError) as e:
            raise NeoxconvError(f"{where}: malformed tokenizer settings ({e})") from None
        gen = GenerationSettings.from_json(d["generation"], where) if d.get("generation") else None
        return cls(tok, gen)
