"""What makes an output usable beyond its weights: tokenizer, tokenizer/generation settings, model card.

One conversion: ``prepare`` (before anything is written) resolves the checkpoint's TextSettings --
what the source records, the tokenizer's own rules (T16) for what it does not, then
``--chat-template`` / ``--eos-token`` -- so that a bad option fails before the weights are written;
the writers use the settings (HF: bos/eos/pad ids of config.json and generation_config.json);
``finish`` carries the tokenizer to the target:

- HF: a working HF tokenizer (from the NeoX config's `vocab-file`, the Meta `tokenizer.model`, the
  HF source's tokenizer, or `--tokenizer PATH`) with the settings applied, and a README.md model
  card with provenance.
- NeoX: the tokenizer copied to OUT/tokenizer/ (an HF source's tokenizer files verbatim), the
  written YAML's `tokenizer-type` / `vocab-file` pointed at it, and the settings recorded in
  neoxconv.json and beside the tokenizer (neoxconv-tokenizer.json), so NeoX -> HF restores them.
- Meta: `tokenizer.model`, the only tokenizer file Meta's format holds.

A tokenizer that cannot be carried over (a Llama 3 tiktoken file that does not convert, or any
tiktoken file for NeoX) is skipped with a one-line warning, never guessed, and never stops the
weight conversion. Warnings are collected in `result["warnings"]`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from neoxconv import __version__
from neoxconv.checkpoint import Checkpoint
from neoxconv.errors import NeoxconvError
from neoxconv.io import read_json, write_json
from neoxconv.text_settings import GenerationSettings, TextSettings


@dataclass
class TokenizerPlan:
    """What ``prepare`` decided for one conversion."""

    source: Path | None  # the tokenizer carried along (None: there is none, or it was skipped)
    text: TextSettings  # the settings the output gets
    warnings: list[str] = field(default_factory=list)


def tokenizer_source(ckpt: Checkpoint, explicit: Path | None = None) -> Path | None:
    """Where the source's tokenizer lives, if anywhere."""
    if explicit:
        if not Path(explicit).exists():
            raise NeoxconvError(f"{explicit}: tokenizer not found")
        return Path(explicit)
    fmt = ckpt.info.get("format")
    if fmt == "neox":
        from neoxconv.tokenizer import neox_tokenizer_source

        return neox_tokenizer_source(ckpt.info.get("neox_args") or {}, Path(ckpt.info["path"]))
    if fmt == "hf":
        d = Path(ckpt.info["path"])
        if any((d / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
            return d
        return None
    tok = ckpt.info.get("tokenizer")
    return Path(tok) if tok else None


def prepare(ckpt: Checkpoint, to: str, *, tokenizer: Path | None = None, chat_template: Path | None = None,
            eos_tokens: tuple[str, ...] | list[str] = ()) -> TokenizerPlan:
    """The tokenizer and settings a conversion to ``to`` carries; raises on a bad option."""
    from neoxconv.tokenizer import TiktokenUnsupported, resolve_settings

    src = tokenizer_source(ckpt, tokenizer)
    warnings: list[str] = []
    if src is None and ckpt.info.get("format") == "neox":  # a vocab-file that is not there is said, not skipped
        from neoxconv.tokenizer.neox import missing_tokenizer

        warnings += [w for w in (missing_tokenizer(ckpt.info.get("neox_args") or {}, ckpt.info["path"]),) if w]
    if to == "meta":  # Meta holds the tokenizer.model file as it is, and no settings
        if chat_template is not None or eos_tokens:
            raise NeoxconvError("--chat-template and --eos-token cannot be written to a Meta checkpoint: it holds "
                                "only tokenizer.model")
        return TokenizerPlan(src, ckpt.text, warnings)
    try:
        text, notes = resolve_settings(ckpt.text, src, explicit=tokenizer is not None, chat_template=chat_template,
                                       eos_tokens=tuple(eos_tokens))
        warnings += [f"tokenizer: {n}" for n in notes]
    except TiktokenUnsupported as e:
        if chat_template is not None or eos_tokens:
            raise NeoxconvError(str(e)) from None
        warnings.append(f"WARNING: tokenizer not exported: {e}")
        src, text = None, ckpt.text
    if to == "hf" and text.generation is None and ckpt.info.get("format") in ("neox", "meta"):
        text, note = _assumed_ids(ckpt)
        warnings.append(note)
    return TokenizerPlan(src, text, warnings)


def _assumed_ids(ckpt: Checkpoint) -> tuple[TextSettings, str]:
    """No tokenizer and no record (T16): the ids of NeoX's standard tokenizers, said out loud --
    the 20B tokenizer's <|endoftext|> (0) for GPT-NeoX models, a Llama SentencePiece model's
    bos 1 / eos 2 otherwise (what 0.1.0 wrote)."""
    bos, eos, which = (0, 0, "NeoX's 20B tokenizer") if ckpt.spec.family == "gptneox" else (1, 2, "Llama's")
    gen = GenerationSettings(bos_token_id=bos, eos_token_id=eos, params=(("_from_model_config", True),))
    return TextSettings(generation=gen), (f"WARNING: no tokenizer found: bos/eos ids {bos}/{eos} assumed ({which}); "
                                          "pass --tokenizer to take them from the real one")


def finish(tmp: Path, ckpt: Checkpoint, to: str, result: dict, plan: TokenizerPlan) -> None:
    """Carry the tokenizer and settings into the written output ``tmp`` (after the writer ran)."""
    result.setdefault("warnings", []).extend(plan.warnings)
    if to == "hf":
        finish_hf_export(tmp, ckpt, result, plan)
    elif to == "neox":
        record_neox_text(tmp / result["tag"], plan.text)
    elif to == "meta":
        finish_meta_export(tmp, plan, result["warnings"])


def provenance(ckpt: Checkpoint, result: dict) -> dict:
    info, spec = ckpt.info, result["spec"]
    fmt = info.get("format", "")
    return {
        "model_name": result.get("model_name"),
        "family": {"gptneox": "gpt-neox"}.get(spec.family, spec.family),
        "license": (info.get("neox_args") or {}).get("license") or (info.get("hf_config") or {}).get("license"),
        "source_format": f"{fmt}-{info['layout']}" if info.get("layout") else fmt,
        "source_dir": info.get("path"),
        "iteration": info.get("iteration"),
        "tp": info.get("tp", 1),
        "pp": info.get("pp", 1),
        "layout": info.get("layout"),
        "dtype": spec.dtype,
        "vocab_size": ckpt.spec.vocab_size,
        "embedding_rows": result.get("vocab_rows"),
        "neoxconv_version": __version__,
    }


def finish_hf_export(tmp: Path, ckpt: Checkpoint, result: dict, plan: TokenizerPlan) -> dict:
    """Tokenizer (with the settings applied) + model card for an HF export in `tmp`. Returns the provenance."""
    from neoxconv.modelcard import write_model_card
    from neoxconv.tokenizer import TiktokenUnsupported, export_tokenizer

    prov = provenance(ckpt, result)
    if result["spec"].family == "custom":  # the model's own code, and what it implements on the card
        from neoxconv.custom.export import copy_code, model_card_section

        copy_code(tmp)
        prov["custom_code"] = model_card_section(result["config"])
    warnings = result.setdefault("warnings", [])
    info = None
    if plan.source is not None:
        try:
            info = export_tokenizer(plan.source, tmp, embedding_rows=result["vocab_rows"],
                                    family=result["spec"].family, model_max_length=result["spec"].max_positions,
                                    settings=plan.text.tokenizer)
        except TiktokenUnsupported as e:
            warnings.append(f"WARNING: tokenizer not exported: {e}")
    if info is not None:
        warnings.extend(f"tokenizer: {w}" for w in info.warnings)
        prov["tokenizer"] = info.to_dict()
        prov["vocab_size"] = info.vocab_size
    write_model_card(tmp, prov, force=True)
    result["provenance"] = prov
    return prov


def neox_tokenizer_yaml(tmp: Path, final_out: Path, ckpt: Checkpoint, plan: TokenizerPlan,
                        warnings: list[str]) -> dict:
    """Copy the tokenizer to tmp/tokenizer/ with the settings record beside it; YAML keys that
    point at its final location. A tokenizer NeoX cannot use from a file (tiktoken) gives ``{}``
    and a warning."""
    from neoxconv.tokenizer import copy_tokenizer_for_neox, tokenizer_size, write_record

    if plan.source is None:
        return {}
    keys = copy_tokenizer_for_neox(plan.source, tmp / "tokenizer", warnings=warnings)
    if not keys:
        return {}
    n = tokenizer_size(keys["vocab_file"])
    if n and n > ckpt.spec.vocab_rows:
        raise NeoxconvError(f"{plan.source}: tokenizer has {n} tokens, more than the model's {ckpt.spec.vocab_rows} "
                            "embedding rows")
    if plan.text.known:
        write_record(tmp / "tokenizer", plan.text)
    keys["vocab_file"] = str(Path(final_out).resolve() / "tokenizer" / Path(keys["vocab_file"]).name)
    return keys


def record_neox_text(tag_dir: Path, text: TextSettings) -> None:
    """Add the settings to the NeoX writer's neoxconv.json."""
    from neoxconv.formats.neox_files import SIDECAR

    if text.known:
        sidecar = read_json(tag_dir / SIDECAR)
        sidecar["text"] = text.to_record()
        write_json(tag_dir / SIDECAR, sidecar)


def finish_meta_export(tmp: Path, plan: TokenizerPlan, warnings: list[str]) -> None:
    """Meta's format holds a tokenizer.model (SentencePiece or tiktoken) and nothing else: no chat
    template, no generation settings (Meta's reference code has them built in)."""
    src = plan.source
    if src is None:
        return
    candidates = [src] if src.is_file() else [src / "tokenizer.model", src / "original" / "tokenizer.model"]
    model = next((p for p in candidates if p.is_file() and p.suffix == ".model"), None)
    if model is None:
        warnings.append(f"WARNING: tokenizer not carried: Meta checkpoints hold a tokenizer.model, {src} has none")
        return
    shutil.copyfile(model, tmp / "tokenizer.model")
    tok = plan.text.tokenizer
    if tok is not None and tok.chat_template is not None:
        warnings.append("WARNING: the chat template is not carried: Meta checkpoints have no place for it")
