"""What makes an export usable beyond its weights: the tokenizer and the model card.

- HF outputs get a working HF tokenizer (from the NeoX config's `vocab-file`, the Meta
  `tokenizer.model`, the HF source's tokenizer, or `--tokenizer PATH`), special-token ids in
  config.json / generation_config.json that follow it (T16), and a README.md model card with
  provenance.
- NeoX outputs get the tokenizer copied to OUT/tokenizer/ and the written YAML's
  `tokenizer-type` / `vocab-file` pointed at it.
- A tokenizer that cannot be carried over (a Llama 3 tiktoken file that does not convert, or
  any tiktoken file for NeoX) is skipped with a one-line warning, never guessed, and never stops
  the weight conversion. HF exports collect warnings in `result["warnings"]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from neoxconv import __version__
from neoxconv.checkpoint import Checkpoint
from neoxconv.errors import NeoxconvError
from neoxconv.io import read_json, write_json


def tokenizer_source(ckpt: Checkpoint, explicit: Path | None = None) -> Path | None:
    """Where the source's tokenizer lives, if anywhere."""
    if explicit:
        if not Path(explicit).exists():
            raise NeoxconvError(f"{explicit}: tokenizer not found")
        return Path(explicit)
    fmt = ckpt.info.get("format")
    if fmt == "neox":
        from neoxconv.tokenizer import find_neox_tokenizer

        return find_neox_tokenizer(ckpt.info.get("neox_args") or {}, Path(ckpt.info["path"]))
    if fmt == "hf":
        d = Path(ckpt.info["path"])
        if any((d / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
            return d
        return None
    tok = ckpt.info.get("tokenizer")
    return Path(tok) if tok else None


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


def finish_hf_export(tmp: Path, ckpt: Checkpoint, result: dict, tokenizer: Path | None = None) -> dict:
    """Tokenizer + special ids + model card for an HF export in `tmp`. Returns the provenance."""
    from neoxconv.modelcard import write_model_card
    from neoxconv.tokenizer import TiktokenUnsupported, apply_special_ids, export_tokenizer

    prov = provenance(ckpt, result)
    src = tokenizer_source(ckpt, tokenizer)
    warnings = result.setdefault("warnings", [])
    info = None
    if src is not None:
        try:
            info = export_tokenizer(src, tmp, embedding_rows=result["vocab_rows"], family=result["spec"].family,
                                    model_max_length=result["spec"].max_positions)
        except TiktokenUnsupported as e:
            warnings.append(f"WARNING: tokenizer not exported: {e}")
    if info is not None:
        warnings.extend(f"tokenizer: {w}" for w in info.warnings)
        cfg, gen = apply_special_ids(read_json(tmp / "config.json"), read_json(tmp / "generation_config.json"), info)
        write_json(tmp / "config.json", cfg)
        write_json(tmp / "generation_config.json", gen)
        prov["tokenizer"] = info.to_dict()
        prov["vocab_size"] = info.vocab_size
    write_model_card(tmp, prov, force=True)
    result["provenance"] = prov
    return prov


def neox_tokenizer_yaml(tmp: Path, final_out: Path, ckpt: Checkpoint, tokenizer: Path | None = None,
                        warnings: list[str] | None = None) -> dict:
    """Copy the tokenizer to tmp/tokenizer/; YAML keys that point at its final location.

    A tokenizer NeoX cannot use from a file (tiktoken) gives ``{}`` and a warning, appended to
    ``warnings`` when given, else printed to stderr."""
    from neoxconv.tokenizer import copy_tokenizer_for_neox

    src = tokenizer_source(ckpt, tokenizer)
    if src is None:
        return {}
    own = [] if warnings is None else warnings
    keys = copy_tokenizer_for_neox(src, tmp / "tokenizer", warnings=own)
    if warnings is None:
        for w in own:  # no result to collect them in: say it here, once, on stderr
            print(f"WARNING: {w}", file=sys.stderr)
    if not keys:
        return {}
    from neoxconv.tokenizer import tokenizer_size

    n = tokenizer_size(keys["vocab_file"])
    if n and n > ckpt.spec.vocab_rows:
        raise NeoxconvError(f"{src}: tokenizer has {n} tokens, more than the model's {ckpt.spec.vocab_rows} "
                            "embedding rows")
    keys["vocab_file"] = str(Path(final_out).resolve() / "tokenizer" / Path(keys["vocab_file"]).name)
    return keys
