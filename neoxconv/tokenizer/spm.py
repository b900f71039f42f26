"""SentencePiece models (NeoX ``SPMTokenizer``, Llama 1/2, Mistral) -> Hugging Face, through transformers.

transformers builds the fast tokenizer from the model (its SentencePiece extractor and converters,
which need the ``sentencepiece`` extra: ``sentencepiece`` + ``protobuf``). BPE models become a
``LlamaTokenizer``; when that class does not encode like ``sentencepiece`` (Unigram models, other
normalizations), the generic fast class is used, which transformers builds to follow the model's
own normalizer spec. The result is compared with ``sentencepiece`` itself on the probe texts;
differences are warnings, because one is inherent: transformers' Llama tokenizer gives a text that
*starts* with whitespace one dummy-prefix piece less than sentencepiece.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from neoxconv.errors import NeoxconvError
from neoxconv.text_settings import TokenizerSettings
from neoxconv.tokenizer.kinds import PROBE_TEXTS, one_line


def export_sentencepiece(src: Path, out: Path, embedding_rows: int, settings: TokenizerSettings, options: dict,
                         warnings: list[str]):
    import transformers

    from neoxconv.tokenizer.export import apply_settings, check_size, roundtrip_problem, save
    from neoxconv.tokenizer.vocab import sentencepiece_processor

    sp = sentencepiece_processor(src)
    is_bpe = _model_type(src) == "BPE"
    llama_cls = getattr(transformers, "LlamaTokenizerFast", None) or getattr(transformers, "LlamaTokenizer")
    candidates = [(llama_cls, {"legacy": False})] if is_bpe else []
    candidates.append((transformers.PreTrainedTokenizerFast, {"legacy": True}))
    # Texts starting with whitespace are compared apart (see the module docstring).
    body = [t for t in PROBE_TEXTS if not t[:1].isspace()]
    leading = [t for t in PROBE_TEXTS if t[:1].isspace()]
    kwargs = {"add_bos_token": settings.bos_token is not None, "add_eos_token": False, **settings.specials(),
              **options}
    tok, problem = None, None
    with tempfile.TemporaryDirectory(prefix="neoxconv-spm-") as tmp:
        shutil.copyfile(src, Path(tmp) / "tokenizer.model")
        for cls, extra in candidates:
            try:
                tok = cls.from_pretrained(tmp, local_files_only=True, **{**kwargs, **extra})
            except Exception as e:  # noqa: BLE001 - transformers raises many types here
                raise NeoxconvError(f"{src}: cannot build a {cls.__name__} ({one_line(e)})") from None
            check_size(src, len(tok), embedding_rows)
            apply_settings(tok, settings, src)
            save(tok, out, src)
            problem = roundtrip_problem(out, body, [sp.encode(t) for t in body])
            if problem is None:
                break
    if problem is not None:
        warnings.append(f"{src.name}: the exported tokenizer differs from sentencepiece: {problem}")
    elif roundtrip_problem(out, leading, [sp.encode(t) for t in leading]) is not None:
        warnings.append(f"{src.name}: texts starting with whitespace are tokenized with one dummy-prefix piece less "
                        "than sentencepiece (transformers' Llama tokenizer behaviour)")
    # Kept for tools that want the original model (NeoX SPMTokenizer, llama.cpp, ...).
    if not (out / "tokenizer.model").exists() or not (out / "tokenizer.model").samefile(src):
        shutil.copyfile(src, out / "tokenizer.model")
    return tok


def _model_type(src: Path) -> str:
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(src.read_bytes())
    return "BPE" if proto.trainer_spec.model_type == 2 else "UNIGRAM" if proto.trainer_spec.model_type == 1 else "?"
