"""The conversion commands: neox-to-hf, hf-to-neox, llama-to-neox, convert."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from neoxconv.choices import Family, MetaStyle, NeoxLayout, NeoxSchema, OutDtype, QkvLayout, Target, value_of
from neoxconv.cli.app import app, console
from neoxconv.cli.options import (ArchOpt, ChatTemplateOpt, ConfigOpt, DropWindowOpt, DryRunOpt, DtypeOpt,
                                  EosTokenOpt, FiniteOpt, ForceOpt, JsonOpt, LayoutOpt, MaxShardOpt, PpOpt, QkvOpt,
                                  ResumeOpt, SchemaOpt, TokenizerOpt, TpOpt, TrimOpt, TrustOpt, VerifyOpt,
                                  VocabMultipleOpt, WorkersOpt, family_of)


def _run_conversion(src: Path, out: Path, to: str, trust_pickle: bool, verify: bool = False,
                    check_finite: bool = False, as_json: bool = False, **kw) -> dict:
    from neoxconv.cli.progress import GROUPS, Bar, Bars
    from neoxconv.convert import convert
    from neoxconv.io import set_check_finite, set_trust_pickle

    set_trust_pickle(trust_pickle)
    set_check_finite(check_finite)
    holder: dict = {}
    bars = Bars(GROUPS, quiet=as_json)
    if verify and not kw.get("dry_run"):  # parity of the finished temp dir against the source, before it lands at OUT
        from neoxconv.parity import verifier

        check = verifier(src, out, to=to, config_files=kw.get("config_files"), family=kw.get("family"),
                         qkv_layout=kw.get("qkv_layout"), force=kw.get("force", False), console=console,
                         progress=bars)

        def after_write(tmp: Path, result: dict) -> None:
            if "bar" in holder:
                holder["bar"].stop()
            console.print("verifying: logit parity of the output against the source (fp32) ...")
            check(tmp, result)

        kw["after_write"] = after_write

    def on_plan(plan, done) -> None:
        total = plan.data_bytes(skip=done)
        holder["bar"] = Bar(f"{holder['format']} → {to}", total, quiet=as_json).start()

    try:
        result = convert(src, out, to=to, on_read=lambda ckpt: holder.update(format=ckpt.info["format"]),
                         on_plan=on_plan, progress=lambda n: holder["bar"].advance(n), **kw)
    finally:
        if "bar" in holder:
            holder["bar"].stop()
        bars.stop()
    for warning in result.get("warnings", []):
        text = warning if warning.startswith("WARNING") else f"WARNING: {warning}"
        from rich.markup import escape

        console.print(f"[yellow]{escape(text)}[/yellow]", highlight=False, soft_wrap=True)
    spec = result["spec"]
    params = result["source"].tensors.num_params()
    if result.get("dry_run"):
        _show_plan(result["plan"], out, to, as_json)
        return result
    if as_json:
        import json

        print(json.dumps({"out": str(out), "format": to, "family": spec.family, "layers": spec.layers,
                          "parameters": params, "dtype": spec.dtype, "resumed_files": result["resumed_files"]}))
        return result
    kept = f", {result['resumed_files']} finished file(s) kept from the earlier run" if result["resumed_files"] else ""
    console.print(f"[green]wrote[/green] {out}  ({to}, {spec.family}, {spec.layers} layers, "
                  f"{params / 1e6:.2f}M params, {spec.dtype}{kept})")
    return result


def _show_plan(plan: dict, out: Path, to: str, as_json: bool) -> None:
    """--dry-run: the weights files a run would write, from the source's headers."""
    from neoxconv.cli.app import out_console

    if as_json:
        import json

        print(json.dumps({"out": str(out), "format": to, **plan}, indent=2))
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"dry run: {escape(str(out))} ({to}); nothing written", title_justify="left")
    table.add_column("file")
    table.add_column("tensors", justify="right")
    table.add_column("bytes", justify="right")
    for f in plan["files"]:
        table.add_row(escape(f["path"]), str(f["tensors"]), f"{f['bytes']:,}")
    out_console.print(table)
    from rich.filesize import decimal as size

    out_console.print(f"{len(plan['files'])} weights file(s), {plan['tensors']} tensors, {size(plan['bytes'])} "
                      f"({size(plan['bytes_copied'])} copied from the source, "
                      f"{size(plan['bytes_computed'])} computed); "
                      f"predicted peak memory {size(plan['peak_memory_bytes'])} with {plan['workers']} worker(s); "
                      "configs, tokenizer and manifest besides")


@app.command("neox-to-hf")
def neox_to_hf(
    ckpt: Annotated[Path, typer.Argument(help="NeoX save dir (with `latest`) or a global_stepN dir.")],
    out: Annotated[Path, typer.Argument(help="Output Hugging Face model directory (created).")],
    config: ConfigOpt = None,
    arch: ArchOpt = Family.auto,
    dtype: DtypeOpt = OutDtype.auto,
    max_shard_size: MaxShardOpt = "5GB",
    trim_vocab_padding: TrimOpt = False,
    drop_sliding_window: DropWindowOpt = False,
    qkv_layout: QkvOpt = None,
    tokenizer: TokenizerOpt = None,
    chat_template: ChatTemplateOpt = None,
    eos_token: EosTokenOpt = None,
    push_to_hub: Annotated[Optional[str], typer.Option(
        "--push-to-hub", help="After converting, upload OUT to this Hub repo (namespace/name) in one commit.")] = None,
    revision: Annotated[Optional[str], typer.Option(
        "--revision", help="Branch for --push-to-hub, created if missing (e.g. step143000).")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the Hub repo as private (--push-to-hub).")] = False,
    force: ForceOpt = False,
    trust_pickle: TrustOpt = False,
    verify: VerifyOpt = False,
    check_finite: FiniteOpt = False,
    workers: WorkersOpt = None,
    dry_run: DryRunOpt = False,
    resume: ResumeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export a GPT-NeoX checkpoint (pipeline or sequential layout, any TP/PP) to Hugging Face."""
    from neoxconv.io import parse_size

    _run_conversion(ckpt, out, "hf", trust_pickle, src_format="neox", config_files=config, family=family_of(arch),
                    qkv_layout=value_of(qkv_layout), force=force, dtype=dtype.value,
                    max_shard_size=parse_size(max_shard_size),
                    trim_vocab_padding=trim_vocab_padding, tokenizer=tokenizer, chat_template=chat_template,
                    eos_tokens=eos_token or [], verify=verify, check_finite=check_finite,
                    drop_sliding_window=drop_sliding_window,
                    workers=workers, dry_run=dry_run, resume=resume, as_json=as_json)
    if push_to_hub and not dry_run:
        from neoxconv.hub import upload_command

        upload_command(out, push_to_hub, revision=revision, private=private, console=console)


@app.command("hf-to-neox")
def hf_to_neox(
    hf_dir: Annotated[Path, typer.Argument(help="Hugging Face model directory (config.json + weights).")],
    out: Annotated[Path, typer.Argument(help="Output NeoX save directory (created; gets `latest`).")],
    tp: TpOpt = 1,
    pp: PpOpt = 1,
    layout: LayoutOpt = NeoxLayout.pipeline,
    neox_schema: SchemaOpt = NeoxSchema.current,
    dtype: DtypeOpt = OutDtype.auto,
    vocab_multiple: VocabMultipleOpt = 128,
    arch: ArchOpt = Family.auto,
    qkv_layout: QkvOpt = None,
    tokenizer: TokenizerOpt = None,
    chat_template: ChatTemplateOpt = None,
    eos_token: EosTokenOpt = None,
    force: ForceOpt = False,
    trust_pickle: TrustOpt = False,
    verify: VerifyOpt = False,
    check_finite: FiniteOpt = False,
    workers: WorkersOpt = None,
    dry_run: DryRunOpt = False,
    resume: ResumeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Import a Hugging Face model into a GPT-NeoX checkpoint at any TP/PP (the tokenizer is copied beside it)."""
    _run_conversion(hf_dir, out, "neox", trust_pickle, src_format="hf", family=family_of(arch),
                    qkv_layout=value_of(qkv_layout), force=force, dtype=dtype.value, tp=tp, pp=pp, layout=layout.value,
                    schema=neox_schema.value,
                    vocab_multiple=vocab_multiple, tokenizer=tokenizer, chat_template=chat_template,
                    eos_tokens=eos_token or [], verify=verify, check_finite=check_finite,
                    workers=workers, dry_run=dry_run, resume=resume, as_json=as_json)


@app.command("llama-to-neox")
def llama_to_neox(
    meta_dir: Annotated[Path, typer.Argument(help="Meta Llama directory: params.json + consolidated.XX.pth (any shard count).")],
    out: Annotated[Path, typer.Argument(help="Output NeoX save directory (created; gets `latest`).")],
    tp: TpOpt = 1,
    pp: PpOpt = 1,
    layout: LayoutOpt = NeoxLayout.pipeline,
    neox_schema: SchemaOpt = NeoxSchema.current,
    dtype: DtypeOpt = OutDtype.auto,
    vocab_multiple: VocabMultipleOpt = 128,
    qkv_layout: QkvOpt = None,
    tokenizer: TokenizerOpt = None,
    chat_template: ChatTemplateOpt = None,
    eos_token: EosTokenOpt = None,
    force: ForceOpt = False,
    trust_pickle: TrustOpt = False,
    verify: VerifyOpt = False,
    check_finite: FiniteOpt = False,
    workers: WorkersOpt = None,
    dry_run: DryRunOpt = False,
    resume: ResumeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Import a raw Meta Llama checkpoint (Llama 1/2/3, MHA or GQA) into a GPT-NeoX checkpoint."""
    _run_conversion(meta_dir, out, "neox", trust_pickle, src_format="meta", qkv_layout=value_of(qkv_layout), force=force,
                    dtype=dtype.value, tp=tp, pp=pp, layout=layout.value, schema=neox_schema.value,
                    vocab_multiple=vocab_multiple,
                    tokenizer=tokenizer, chat_template=chat_template,
                    eos_tokens=eos_token or [], verify=verify, check_finite=check_finite,
                    workers=workers, dry_run=dry_run, resume=resume, as_json=as_json)


@app.command("convert")
def convert_cmd(
    src: Annotated[Path, typer.Argument(help="Any supported checkpoint (format auto-detected).")],
    out: Annotated[Path, typer.Argument(help="Output directory (created).")],
    to: Annotated[Target, typer.Option("--to", help="Target format.")],
    tp: TpOpt = 1,
    pp: PpOpt = 1,
    layout: LayoutOpt = NeoxLayout.pipeline,
    neox_schema: SchemaOpt = NeoxSchema.current,
    vocab_multiple: VocabMultipleOpt = 128,
    config: ConfigOpt = None,
    arch: ArchOpt = Family.auto,
    dtype: DtypeOpt = OutDtype.auto,
    max_shard_size: MaxShardOpt = "5GB",
    trim_vocab_padding: TrimOpt = False,
    drop_sliding_window: DropWindowOpt = False,
    qkv_layout: QkvOpt = None,
    out_qkv_layout: Annotated[Optional[QkvLayout], typer.Option(
        "--out-qkv-layout", help="NeoX → NeoX only: QKV layout to write when it differs from the source's "
                                 "(e.g. migrate a gqa_fakehead checkpoint of 2024 to gqa_blocked).")] = None,
    meta_style: Annotated[Optional[MetaStyle], typer.Option(
        "--meta-style", help="--to meta: llama3 (embedding split on the vocab, default) or llama2 (split on the "
                             "hidden dim, params.json keys Llama 1/2 code accepts). Default: the source's, if Meta.")] = None,
    tokenizer: TokenizerOpt = None,
    chat_template: ChatTemplateOpt = None,
    eos_token: EosTokenOpt = None,
    force: ForceOpt = False,
    trust_pickle: TrustOpt = False,
    verify: VerifyOpt = False,
    check_finite: FiniteOpt = False,
    workers: WorkersOpt = None,
    dry_run: DryRunOpt = False,
    resume: ResumeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Convert any supported checkpoint to any target, including NeoX → NeoX resharding."""
    from neoxconv.io import parse_size

    if to is Target.neox:
        opts = dict(tp=tp, pp=pp, layout=layout.value, schema=neox_schema.value, vocab_multiple=vocab_multiple)
        if out_qkv_layout:
            opts["out_qkv_layout"] = out_qkv_layout.value
    elif to is Target.hf:
        opts = dict(max_shard_size=parse_size(max_shard_size), trim_vocab_padding=trim_vocab_padding)
    else:
        opts = dict(shards=tp, style=value_of(meta_style))
    _run_conversion(src, out, to.value, trust_pickle, config_files=config, family=family_of(arch),
                    qkv_layout=value_of(qkv_layout), force=force, dtype=dtype.value, tokenizer=tokenizer, chat_template=chat_template,
                    eos_tokens=eos_token or [], verify=verify, check_finite=check_finite,
                    drop_sliding_window=drop_sliding_window,
                    workers=workers, dry_run=dry_run, resume=resume, as_json=as_json, **opts)
