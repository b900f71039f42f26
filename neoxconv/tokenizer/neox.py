"""The NeoX side: find the tokenizer a NeoX config points at, copy one beside a NeoX checkpoint, and
the settings record neoxconv keeps beside it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from neoxconv.errors import NeoxconvError
from neoxconv.text_settings import TextSettings
from neoxconv.tokenizer.kinds import KIND_SENTENCEPIECE, KIND_TIKTOKEN, one_line, tokenizer_kind
from neoxconv.tokenizer.settings import HF_TEMPLATES_DIR, HF_TOKENIZER_FILES

# Beside a NeoX tokenizer that neoxconv copied: the TextSettings record (the same as in neoxconv.json,
# which NeoX does not carry into the checkpoints it saves while training).
RECORD = "neoxconv-tokenizer.json"


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
    for cand in _candidates(vocab, base_dir):
        if cand.is_file() and cand.suffix in wanted:
            return cand.resolve()
    return None


def _candidates(vocab, base_dir) -> list[Path]:
    base = Path(base_dir)
    p = Path(os.path.expanduser(str(vocab)))
    tries = [p] if p.is_absolute() else [base / p, *[parent / p for parent in base.parents][:3], Path.cwd() / p]
    return [*tries, base / p.name]


def missing_tokenizer(neox_args: dict, base_dir) -> str | None:
    """A warning when the NeoX config names a tokenizer that cannot be found or carried over (None
    when it names none or it is found): the export then has no tokenizer."""
    vocab = _neox_get(neox_args or {}, "vocab_file")
    if not vocab or find_neox_tokenizer(neox_args, base_dir) is not None:
        return None
    ttype = str(_neox_get(neox_args, "tokenizer_type") or "").strip()
    if ttype in ("", "HFTokenizer", "SPMTokenizer") and not any(c.is_file() for c in _candidates(vocab, base_dir)):
        return (f"WARNING: the NeoX config's vocab-file {vocab} does not exist (looked beside {base_dir}, in its "
                "parents and the working directory): the export has no tokenizer; pass --tokenizer PATH")
    return (f"WARNING: the NeoX config's tokenizer ({ttype or 'type unknown'}, vocab-file {vocab}) is not one neoxconv "
            "carries over (HFTokenizer .json, SPMTokenizer .model): the export has no tokenizer; pass --tokenizer PATH")


def neox_tokenizer_source(neox_args: dict, base_dir) -> Path | None:
    """The tokenizer of a NeoX checkpoint: the directory neoxconv copied an HF tokenizer into (its
    record and tokenizer_config.json beside the vocab file), else the vocab file itself."""
    path = find_neox_tokenizer(neox_args, base_dir)
    if path is not None and (path.parent / RECORD).is_file() and (path.parent / "tokenizer_config.json").is_file():
        return path.parent
    return path


def recorded_settings(sidecar: dict, neox_args: dict, tag_dir, where) -> TextSettings:
    """A NeoX checkpoint's recorded settings: neoxconv.json's, else the record beside its tokenizer."""
    if sidecar.get("text"):
        return TextSettings.from_record(sidecar["text"], str(where))
    path = find_neox_tokenizer(neox_args, tag_dir)
    if path is not None and (path.parent / RECORD).is_file():
        try:
            record = json.loads((path.parent / RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise NeoxconvError(f"{path.parent / RECORD}: not readable ({one_line(e)})") from None
        return TextSettings.from_record(record, str(path.parent / RECORD))
    return TextSettings()


def write_record(tokenizer_dir: Path, text: TextSettings) -> None:
    (tokenizer_dir / RECORD).write_text(json.dumps(text.to_record(), indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")


def copy_tokenizer_for_neox(source: str | os.PathLike, out_dir: str | os.PathLike,
                            warnings: list[str] | None = None) -> dict:
    """Copy a tokenizer next to a NeoX checkpoint; return the NeoX YAML keys to write.

    * a SentencePiece ``tokenizer.model`` (a file, or present in an HF directory) ->
      ``{"tokenizer_type": "SPMTokenizer", "vocab_file": <copied .model>}``. It is preferred
      over ``tokenizer.json`` when a directory has both (Llama/Mistral repos), because NeoX's
      HFTokenizer needs an ``<|endoftext|>`` token that those vocabularies lack;
    * otherwise a tokenizers ``tokenizer.json`` (a file or in a directory) ->
      ``{"tokenizer_type": "HFTokenizer", "vocab_file": <copied .json>}``;
    * an HF directory's own files (tokenizer_config.json, chat template, ...) are copied with it,
      verbatim, so that the directory is still the same HF tokenizer;
    * a tiktoken ``tokenizer.model`` (Llama 3) is not a SentencePiece model, and NeoX's
      ``TiktokenTokenizer`` takes a tiktoken *encoding name* (``tiktoken.get_encoding(vocab_file)``),
      not a file: a directory falls back to its ``tokenizer.json``; a lone tiktoken file is not
      copied, ``{}`` is returned and a warning is appended to ``warnings``.

    ``vocab_file`` is an absolute path, so the YAML works from any launch directory.
    """
    from neoxconv.tokenizer.vocab import load_raw_json

    src, out = Path(source), Path(out_dir)
    skipped = (f"{src}: tiktoken tokenizer (Llama 3) not carried to NeoX: NeoX's TiktokenTokenizer takes a "
               "tiktoken encoding name, not a file, and SPMTokenizer cannot read it; set tokenizer-type / "
               "vocab-file yourself (e.g. HFTokenizer with a converted tokenizer.json)")
    extra_files: list[Path] = []
    if src.is_dir():
        spm, js = src / "tokenizer.model", src / "tokenizer.json"
        if spm.is_file() and tokenizer_kind(spm) == KIND_SENTENCEPIECE:
            chosen, ttype = spm, "SPMTokenizer"
        elif js.is_file():
            chosen, ttype = js, "HFTokenizer"
        elif spm.is_file():
            if warnings is not None:
                warnings.append(skipped)
            return {}
        else:
            raise NeoxconvError(f"{src}: no tokenizer.json or tokenizer.model to copy for NeoX")
        extra_files = [src / n for n in HF_TOKENIZER_FILES if (src / n).is_file() and n != chosen.name]
        extra_files += [src / HF_TEMPLATES_DIR] if (src / HF_TEMPLATES_DIR).is_dir() else []
    elif src.is_file() and tokenizer_kind(src) == KIND_TIKTOKEN:
        if warnings is not None:
            warnings.append(skipped)
        return {}
    elif src.is_file() and src.suffix == ".model":
        chosen, ttype = src, "SPMTokenizer"
    elif src.is_file() and src.suffix == ".json":
        load_raw_json(src)
        chosen, ttype = src, "HFTokenizer"
    else:
        raise NeoxconvError(f"{src}: tokenizer not found (expected a directory, a .json or a .model)")

    out.mkdir(parents=True, exist_ok=True)
    dest = out / chosen.name
    try:
        for f in [chosen, *extra_files]:
            target = out / f.name
            if target.exists() and target.resolve() == f.resolve():
                continue
            if f.is_dir():
                shutil.copytree(f, target, dirs_exist_ok=True)
            else:
                shutil.copyfile(f, target)
    except OSError as e:
        raise NeoxconvError(f"{dest}: cannot copy the tokenizer ({one_line(e)})") from None
    return {"tokenizer_type": ttype, "vocab_file": str(dest.resolve())}
