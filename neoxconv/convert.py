"""The conversion job shared by every command: read, plan, write (concurrently, atomically,
resumably)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from neoxconv.errors import NeoxconvError
from neoxconv.heap import frozen_heap

DTYPES = {"auto": None, "fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}


def parse_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise NeoxconvError(f"unknown --dtype {name!r} (use auto, fp32, fp16 or bf16)")
    return None if DTYPES[name] is None else getattr(torch, DTYPES[name])


@frozen_heap()
def convert(src: Path, out: Path, *, to: str, src_format: str | None = None, config_files: list[Path] | None = None,
            family: str | None = None, qkv_layout: str | None = None, force: bool = False, dtype: str = "auto",
            progress: Callable[[int], None] | None = None, on_read: Callable | None = None,
            on_plan: Callable | None = None, after_write: Callable[[Path, dict], None] | None = None,
            tokenizer: Path | None = None, chat_template: Path | None = None,
            eos_tokens: tuple[str, ...] | list[str] = (), drop_sliding_window: bool = False,
            workers: int | None = None, dry_run: bool = False, resume: bool = False, **write_opts) -> dict:
    """Convert `src` into a new directory `out` in format `to`. Nothing is left at `out` on failure.

    Every output gets the tokenizer and its settings (special tokens, chat template, generation
    config; `chat_template` / `eos_tokens` set them), HF outputs a model card (neoxconv.publish).
    The weights are written by neoxconv.pipeline from a plan made from the source's headers
    (`workers` threads, default neoxconv.pipeline.default_workers(); `progress(nbytes)` after
    each write; `on_plan(plan)` before the first); each weights file is hashed as it is written.
    `dry_run`: return the plan's summary (files, tensors, bytes, predicted memory) and write
    nothing. `resume`: continue an earlier run of the same conversion (neoxconv.resume).
    `after_write(tmp, result)` runs on the finished temporary directory before it is renamed into
    place (the --verify hook). The last step writes neoxconv-manifest.json (`neoxconv verify`
    checks it) from the hashes taken as the files were written. `drop_sliding_window` writes the
    model without its window (neoxconv.window.drop; `result["dropped_window"]` keeps it for
    --verify). The readers validate the source against its spec before anything is planned.
    """
    from neoxconv import graph
    from neoxconv.manifest import write_manifest
    from neoxconv.pipeline import default_workers, execute
    from neoxconv.resume import output_dir

    src, out = Path(src), Path(out)
    if out.exists() and not force and not dry_run:
        raise NeoxconvError(f"{out}: output already exists (pass --force to replace it)")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents \
            or out.resolve() in src.resolve().parents:
        raise NeoxconvError(f"{out}: output must not be the source, inside it, or contain it")
    workers = workers or default_workers()
    if workers < 1:
        raise NeoxconvError(f"--workers must be at least 1, got {workers}")
    ckpt = graph.read(src, fmt=src_format, config_files=config_files, family=family,
                      qkv_layout=qkv_layout if to != "neox" or (src_format or graph.detect(src)) == "neox" else None)
    notes, dropped = [], ckpt.spec.sliding_window if drop_sliding_window else None
    if drop_sliding_window:
        from neoxconv.window import drop

        ckpt.spec, note = drop(ckpt.spec, family)
        notes.append(note)
    from neoxconv import publish

    tok = publish.prepare(ckpt, to, tokenizer=tokenizer, chat_template=chat_template, eos_tokens=eos_tokens)
    ckpt.text = tok.text
    if on_read:
        on_read(ckpt)
    if to == "neox" and (qkv_layout or "out_qkv_layout" in write_opts):
        # --qkv-layout names the source's layout when the source is NeoX, else the target's;
        # out_qkv_layout (NeoX -> NeoX) names the target's when it should change.
        write_opts["qkv_layout"] = write_opts.pop("out_qkv_layout", None) or qkv_layout
    if to == "hf" and family:
        write_opts["family"] = family
    extra_yaml = write_opts.pop("extra_yaml", {}) if to == "neox" else None
    plan = graph.plan(ckpt, to, dtype=parse_dtype(dtype), **write_opts)
    if dry_run:
        return {"dry_run": True, "plan": plan.summary(workers), "source": ckpt, "spec": ckpt.spec,
                "warnings": notes}
    sources = [Path(ckpt.info.get("path") or src), *(config_files or []), *(p for p in (tokenizer, chat_template) if p)]
    with output_dir(out, plan.digest(sources), force=force, resume=resume) as journal:
        tmp = journal.tmp
        if to == "neox":
            plan.late["extra_yaml"] = {**publish.neox_tokenizer_yaml(tmp, out, ckpt, tok, tok.warnings), **extra_yaml}
        if on_plan:
            on_plan(plan, journal.done)
        hashes = execute(plan, tmp, workers=workers, progress=progress, done=journal.done, on_file=journal.record)
        result = plan.finish(tmp)
        result["source"] = ckpt
        result["resumed_files"] = journal.kept
        result.setdefault("warnings", []).extend(notes + source_warnings(ckpt))
        result["dropped_window"] = dropped
        result["model_name"] = out.resolve().name  # the card's title: OUT's name, never the temp dir's
        publish.finish(tmp, ckpt, to, result, tok)
        if after_write:
            after_write(tmp, result)
        write_manifest(tmp, hashes)  # last: size and sha256 of every output file, for `neoxconv verify`
    return result


def scan_source(ckpt, progress: Callable[[int, int], None] | None = None) -> None:
    """Read the data a check of the source needs, when no conversion reads it: NeoX replicated
    copies (their drift across TP ranks) and, with --check-finite, every tensor (NaN/Inf).
    Reading a checkpoint takes headers only; a conversion scans each group as it copies it.
    ``progress(done, total)``: layer groups scanned."""
    from neoxconv.io import check_finite_enabled

    tick = progress or (lambda _done, _total: None)
    if ckpt.info.get("format") == "neox":
        nf = ckpt.info["files"]
        for i, idx in enumerate(nf.indices, 1):
            nf.rank_states(idx)  # drift of the norm copies; NaN/Inf with --check-finite
            tick(i, len(nf.indices))
    elif check_finite_enabled():
        groups = list(ckpt.tensors.groups())
        for i, group in enumerate(groups, 1):
            ckpt.tensors.lazy_group(group)  # the readers scan what they map
            tick(i, len(groups))


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

