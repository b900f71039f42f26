"""The conversion job shared by every command: read, (reshard), write atomically."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from neoxconv.errors import NeoxconvError

DTYPES = {"auto": None, "fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}


def parse_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise NeoxconvError(f"unknown --dtype {name!r} (use auto, fp32, fp16 or bf16)")
    return None if DTYPES[name] is None else getattr(torch, DTYPES[name])


def convert(src: Path, out: Path, *, to: str, src_format: str | None = None, config_files: list[Path] | None = None,
            family: str | None = None, qkv_layout: str | None = None, force: bool = False, dtype: str = "auto",
            progress: Callable[[str], None] | None = None, on_read: Callable | None = None,
            after_write: Callable[[Path, dict], None] | None = None, tokenizer: Path | None = None,
            chat_template: Path | None = None, eos_tokens: tuple[str, ...] | list[str] = (),
            drop_sliding_window: bool = False, **write_opts) -> dict:
    """Convert `src` into a new directory `out` in format `to`. Nothing is left at `out` on failure.

    Every output gets the tokenizer and its settings (special tokens, chat template, generation
    config; `chat_template` / `eos_tokens` set them), HF outputs a model card (neoxconv.publish).
    `after_write(tmp, result)` runs on the finished temporary directory before it is renamed into
    place (the --verify hook). The last step hashes every output file into
    neoxconv-manifest.json (`neoxconv verify` checks it). `drop_sliding_window` writes the model
    without its window (neoxconv.window.drop; `result["dropped_window"]` keeps it for --verify).
    """
    from neoxconv import graph
    from neoxconv.io import atomic_output_dir
    from neoxconv.manifest import write_manifest

    src, out = Path(src), Path(out)
    if out.exists() and not force:
        raise NeoxconvError(f"{out}: output already exists (pass --force to replace it)")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents \
            or out.resolve() in src.resolve().parents:
        raise NeoxconvError(f"{out}: output must not be the source, inside it, or contain it")
    ckpt = graph.read(src, fmt=src_format, config_files=config_files, family=family,
                      qkv_layout=qkv_layout if to != "neox" or (src_format or graph.detect(src)) == "neox" else None)
    notes, dropped = [], ckpt.spec.sliding_window if drop_sliding_window else None
    if drop_sliding_window:
        from neoxconv.window import drop

        ckpt.spec, note = drop(ckpt.spec, family)
        notes.append(note)
    from neoxconv import publish

    plan = publish.prepare(ckpt, to, tokenizer=tokenizer, chat_template=chat_template, eos_tokens=eos_tokens)
    ckpt.text = plan.text
    if on_read:
        on_read(ckpt)
    if to == "neox" and (qkv_layout or "out_qkv_layout" in write_opts):
        # --qkv-layout names the source's layout when the source is NeoX, else the target's;
        # out_qkv_layout (NeoX -> NeoX) names the target's when it should change.
        write_opts["qkv_layout"] = write_opts.pop("out_qkv_layout", None) or qkv_layout
    if to == "hf" and family:
        write_opts["family"] = family
    with atomic_output_dir(out, force=force) as tmp:
        if to == "neox":
            write_opts["extra_yaml"] = {**publish.neox_tokenizer_yaml(tmp, out, ckpt, plan, plan.warnings),
                                        **write_opts.get("extra_yaml", {})}
        result = graph.write(ckpt, to, tmp, progress=progress, dtype=parse_dtype(dtype), **write_opts)
        result["source"] = ckpt
        result.setdefault("warnings", []).extend(notes + source_warnings(ckpt))
        result["dropped_window"] = dropped
        result["model_name"] = out.resolve().name  # the card's title: OUT's name, never the temp dir's
        publish.finish(tmp, ckpt, to, result, plan)
        if after_write:
            after_write(tmp, result)
        write_manifest(tmp)  # last: size and sha256 of every output file, for `neoxconv verify`
    return result


def source_warnings(ckpt) -> list[str]:
    """What reading the source found that the user should know (NeoX: replicated copies that
    drifted apart across TP ranks beyond rounding; a sliding window that NeoX's fused softmax may
    have left out in training)."""
    from neoxconv.formats.neox_files import drift_warning
    from neoxconv.window import fused_softmax_warning

    nf = ckpt.info.get("files")
    if nf is None or ckpt.info.get("format") != "neox":
        return []
    spec = ckpt.spec
    texts = [drift_warning(nf), fused_softmax_warning(nf.args, spec.layers, spec.dtype, spec.sliding_window)]
    return [t for t in texts if t]

