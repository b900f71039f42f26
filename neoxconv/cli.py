"""neoxconv command line: parse, call, render. Heavy imports (torch, transformers) happen
inside the commands so `neoxconv --help` stays fast."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from neoxconv.choices import (ComputeDtype, Family, MainBranch, MetaStyle, NeoxLayout, NeoxSchema, Optimizer, OutDtype,
                              QkvLayout, Replicated, Target, value_of)

app = typer.Typer(
    help="Convert GPT-NeoX checkpoints to and from Hugging Face and Meta Llama at any tensor-parallel "
         "degree, and prove each conversion numerically.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out_console = Console()
_state = {"debug": False}

# Choice options take the Enums of neoxconv.choices; commands pass `.value` to the library.
DtypeOpt = Annotated[OutDtype, typer.Option("--dtype", help="Output dtype (auto: keep the source's).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")]
ArchOpt = Annotated[Family, typer.Option("--arch", help="Model family (auto: from the source).")]
ConfigOpt = Annotated[Optional[list[Path]], typer.Option(
    "--config", help="NeoX YAML file(s); default: every YAML in the checkpoint's configs/ folder. Repeatable.")]
QkvOpt = Annotated[Optional[QkvLayout], typer.Option(
    "--qkv-layout", help="NeoX fused-QKV layout for GQA models: gqa_blocked (NeoX since 2024-11, default) "
                         "or gqa_fakehead (NeoX 2024-02..2024-11). MHA models are always interleaved.")]
TokenizerOpt = Annotated[Optional[Path], typer.Option(
    "--tokenizer", help="Tokenizer to carry along: a tokenizer.json, a tokenizer.model or an HF tokenizer dir "
                        "(default: the source's own, e.g. the NeoX config's vocab-file or the HF dir's tokenizer).")]
ChatTemplateOpt = Annotated[Optional[Path], typer.Option(
    "--chat-template", help="Jinja chat template file that replaces the source's default chat template "
                            "(e.g. for Meta Llama 3 Instruct, whose files do not carry one).")]
EosTokenOpt = Annotated[Optional[list[str]], typer.Option(
    "--eos-token", help="End-of-turn token, repeatable: the first becomes the tokenizer's eos_token, and all are "
                        "added to generation_config.json's eos ids (Llama 3 Instruct: --eos-token '<|eot_id|>' "
                        "gives [<|end_of_text|>, <|eot_id|>]). Exit 2 if not in the vocabulary.")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-pickle", help="Load pickled inputs with full unpickling (can run code: only for files you trust).")]
FiniteOpt = Annotated[bool, typer.Option(
    "--check-finite", help="Scan every tensor of the input for NaN/Inf before writing (reads all data once more); "
                           "one is an error naming tensor, rank and file.")]
VerifyOpt = Annotated[bool, typer.Option(
    "--verify", help="After writing, check logit parity of OUT against the source (fp32); on failure exit 1 and "
                     "move the output to OUT.parity-failed/ (report inside). See docs/parity.md.")]
# NeoX-target options, shared by hf-to-neox, llama-to-neox and convert --to neox.
TpOpt = Annotated[int, typer.Option("--tp", help="Tensor-parallel degree to shard for (convert --to meta: number of "
                                                 "model-parallel shards).")]
PpOpt = Annotated[int, typer.Option("--pp", help="Pipeline-parallel degree (pipeline layout only).")]
LayoutOpt = Annotated[NeoxLayout, typer.Option(
    "--layout", help="NeoX on-disk layout: pipeline (layer_XX files) or sequential (mp_rank_XX files).")]
SchemaOpt = Annotated[NeoxSchema, typer.Option(
    "--neox-schema", help="NeoX tensor names: current (mlp.linear1/linear2) or legacy (dense_h_to_4h / w1-w3 and "
                          "inv_freq buffers, for NeoX before 2024-09).")]
VocabMultipleOpt = Annotated[int, typer.Option(
    "--vocab-multiple", help="NeoX make_vocab_size_divisible_by: the vocab is padded to a multiple of this × TP.")]
# HF-target options, shared by neox-to-hf and convert --to hf.
MaxShardOpt = Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors shard, e.g. 5GB, 500MB.")]
TrimOpt = Annotated[bool, typer.Option(
    "--trim-vocab-padding", help="Drop padded embedding rows beyond the real vocabulary.")]


def _version(value: bool) -> None:
    if value:
        from neoxconv import __version__

        print(f"neoxconv {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug


def _family(arch: Family) -> str | None:
    return None if arch.value == "auto" else arch.value


def _progress(total: int, what: str):
    """A rich progress bar advanced once per layer group."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                    TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal)
    task = prog.add_task("", total=total)

    def step(label: str) -> None:
        prog.update(task, advance=1, description=label)

    return prog, step


def _run_conversion(src: Path, out: Path, to: str, trust_pickle: bool, verify: bool = False,
                    check_finite: bool = False, **kw) -> dict:
    from neoxconv.convert import convert
    from neoxconv.io import set_check_finite, set_trust_pickle

    set_trust_pickle(trust_pickle)
    set_check_finite(check_finite)
    holder: dict = {}
    if verify:  # parity of the finished temp dir against the source, before it lands at OUT
        from neoxconv.parity import verifier

        check = verifier(src, out, to=to, config_files=kw.get("config_files"), family=kw.get("family"),
                         qkv_layout=kw.get("qkv_layout"), force=kw.get("force", False), console=console)

        def after_write(tmp: Path, result: dict) -> None:
            if "prog" in holder:
                holder["prog"].stop()
            console.print("verifying: logit parity of the output against the source (fp32) ...")
            check(tmp, result)

        kw["after_write"] = after_write

    def on_read(ckpt) -> None:
        holder["prog"], holder["step"] = _progress(len(ckpt.tensors.groups()), f"{ckpt.info['format']} → {to}")
        holder["prog"].start()

    try:
        result = convert(src, out, to=to, on_read=on_read, progress=lambda s: holder["step"](s), **kw)
    finally:
        if "prog" in holder:
            holder["prog"].stop()
    for warning in result.get("warnings", []):
        text = warning if warning.startswith("WARNING") else f"WARNING: {warning}"
        from rich.markup import escape

        console.print(f"[yellow]{escape(text)}[/yellow]", highlight=False, soft_wrap=True)
    spec = result["spec"]
    src_ckpt = result["source"]
    console.print(f"[green]wrote[/green] {out}  ({to}, {spec.family}, {spec.layers} layers, "
                  f"{src_ckpt.tensors.num_params() / 1e6:.2f}M params, {spec.dtype})")
    return result


@app.command("neox-to-hf")
def neox_to_hf(
    ckpt: Annotated[Path, typer.Argument(help="NeoX save dir (with `latest`) or a global_stepN dir.")],
    out: Annotated[Path, typer.Argument(help="Output Hugging Face model directory (created).")],
    config: ConfigOpt = None,
    arch: ArchOpt = Family.auto,
    dtype: DtypeOpt = OutDtype.auto,
    max_shard_size: MaxShardOpt = "5GB",
    trim_vocab_padding: TrimOpt = False,
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
) -> None:
    """Export a GPT-NeoX checkpoint (pipeline or sequential layout, any TP/PP) to Hugging Face."""
    from neoxconv.io import parse_size

    _run_conversion(ckpt, out, "hf", trust_pickle, src_format="neox", config_files=config, family=_family(arch),
                    qkv_layout=value_of(qkv_layout), force=force, dtype=dtype.value,
                    max_shard_size=parse_size(max_shard_size),
                    trim_vocab_padding=trim_vocab_padding, tokenizer=tokenizer, chat_template=chat_template,
                    eos_tokens=eos_token or [], verify=verify, check_finite=check_finite)
    if push_to_hub:
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
) -> None:
    """Import a Hugging Face model into a GPT-NeoX checkpoint at any TP/PP (the tokenizer is copied beside it)."""
    _run_conversion(hf_dir, out, "neox", trust_pickle, src_format="hf", family=_family(arch),
                    qkv_layout=value_of(qkv_layout), force=force, dtype=dtype.value, tp=tp, pp=pp, layout=layout.value,
                    schema=neox_schema.value,
                    vocab_multiple=vocab_multiple, tokenizer=tokenizer, chat_template=chat_template,
                    eos_tokens=eos_token or [], verify=verify, check_finite=check_finite)


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
) -> None:
    """Import a raw Meta Llama checkpoint (Llama 1/2/3, MHA or GQA) into a GPT-NeoX checkpoint."""
    _run_conversion(meta_dir, out, "neox", trust_pickle, src_format="meta", qkv_layout=value_of(qkv_layout), force=force,
                    dtype=dtype.value, tp=tp, pp=pp, layout=layout.value, schema=neox_schema.value,
                    vocab_multiple=vocab_multiple,
                    tokenizer=tokenizer, chat_template=chat_template,
                    eos_tokens=eos_token or [], verify=verify, check_finite=check_finite)


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
    _run_conversion(src, out, to.value, trust_pickle, config_files=config, family=_family(arch),
                    qkv_layout=value_of(qkv_layout), force=force, dtype=dtype.value, tokenizer=tokenizer, chat_template=chat_template,
                    eos_tokens=eos_token or [], verify=verify, check_finite=check_finite,
                    **opts)


@app.command("parity")
def parity_cmd(
    a: Annotated[Path, typer.Argument(help="Reference checkpoint (any format), e.g. the training checkpoint.")],
    b: Annotated[Path, typer.Argument(help="Candidate checkpoint (any format), e.g. the converted output.")],
    tokens: Annotated[int, typer.Option("--tokens", help="Sequence length of the random batch.")] = 64,
    batch: Annotated[int, typer.Option("--batch", help="Sequences in the random batch.")] = 2,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random token ids.")] = 0,
    text: Annotated[Optional[str], typer.Option(
        "--text", help="Compare on this text (tokenized with A's or B's tokenizer) instead of random ids.")] = None,
    dtype: Annotated[ComputeDtype, typer.Option(
        "--dtype", help="Compute dtype of both forwards (fp32: the proof).")] = ComputeDtype.fp32,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda[:N].")] = "cpu",
    atol: Annotated[Optional[float], typer.Option("--atol", help="Absolute tolerance (default: per dtype).")] = None,
    rtol: Annotated[Optional[float], typer.Option("--rtol", help="Relative tolerance (default: per dtype).")] = None,
    json_out: Annotated[Optional[Path], typer.Option(
        "--json", help="Write the JSON report to this file ('-' = stdout; the tables then go to stderr).")] = None,
    config: ConfigOpt = None,
    config_b: Annotated[Optional[list[Path]], typer.Option(
        "--config-b", help="NeoX YAML file(s) for B (--config is for A). Repeatable.")] = None,
    arch: ArchOpt = Family.auto,
    qkv_layout: Annotated[Optional[QkvLayout], typer.Option(
        "--qkv-layout", help="Fused-QKV layout of A if A is a GQA NeoX checkpoint: gqa_blocked or gqa_fakehead "
                             "(default: the layout neoxconv recorded in its neoxconv.json, else gqa_blocked).")] = None,
    qkv_layout_b: Annotated[Optional[QkvLayout], typer.Option(
        "--qkv-layout-b", help="The same for B (--qkv-layout is for A only; e.g. a layout migration).")] = None,
    replicated: Annotated[Replicated, typer.Option(
        "--replicated", help="NeoX norm copies that differ across TP ranks: own (each rank its own, as NeoX "
                             "computes) or mean (what an HF export holds).")] = Replicated.own,
    trust_pickle: TrustOpt = False,
) -> None:
    """Compare the logits of two checkpoints (any formats) on one token batch; exit 0 pass, 1 fail, 2 bad input."""
    from transformers.utils import logging as hf_logging

    from neoxconv.io import set_trust_pickle
    from neoxconv.parity import render_report, run_parity, save_report

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    set_trust_pickle(trust_pickle)
    report = run_parity(a, b, tokens=tokens, batch=batch, seed=seed, text=text, dtype=dtype.value, device=device,
                        atol=atol, rtol=rtol, config_files=config, config_files_b=config_b, arch=_family(arch),
                        qkv_layout=value_of(qkv_layout), qkv_layout_b=value_of(qkv_layout_b), replicated=replicated.value)
    import os

    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank has the report; rank 0 speaks
        raise typer.Exit(0 if report.passed else 1)
    if json_out is not None and str(json_out) == "-":
        print(report.to_json(indent=2))
        render_report(report, console)
    else:
        if json_out is not None:
            save_report(report, json_out)
        render_report(report, out_console)
    raise typer.Exit(0 if report.passed else 1)


@app.command("train-check")
def train_check_cmd(
    ckpt: Annotated[Path, typer.Argument(help="NeoX checkpoint (save dir with `latest`, or a global_stepN dir).")],
    hf: Annotated[Optional[Path], typer.Option(
        "--hf", help="HF model to compare with (default: the checkpoint converted by neoxconv into a temp dir).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Training steps on both sides.")] = 1,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate.")] = 1e-3,
    optimizer: Annotated[Optimizer, typer.Option(
        "--optimizer", help="torch.optim optimizer, the same on both sides.")] = Optimizer.sgd,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="Weight decay of the optimizer.")] = 0.0,
    batch: Annotated[int, typer.Option("--batch", help="Sequences per step.")] = 2,
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens per sequence (next-token loss on tokens-1).")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random token batches (step k uses seed+k-1).")] = 0,
    dtype: Annotated[ComputeDtype, typer.Option(
        "--dtype", help="Compute dtype of both sides (fp32: the proof).")] = ComputeDtype.fp32,
    device: Annotated[str, typer.Option("--device", help="cpu (gloo) or cuda (NCCL, one GPU per TP rank).")] = "cpu",
    save: Annotated[Optional[Path], typer.Option(
        "--save", help="Write the updated weights as a NeoX checkpoint (same TP and layout) here, if the check passes.")] = None,
    json_out: Annotated[Optional[Path], typer.Option(
        "--json", help="Write the JSON report to this file ('-' = stdout; the table then goes to stderr).")] = None,
    config: ConfigOpt = None,
    qkv_layout: QkvOpt = None,
    trust_pickle: TrustOpt = False,
) -> None:
    """Tensor-parallel training step(s) on a NeoX checkpoint, one process per TP rank, with loss and
    gradient parity against the HF model doing the same steps; exit 0 pass, 1 fail, 2 bad input.
    Runs its own local processes, or joins a torchrun launch. See docs/training.md."""
    from neoxconv.traincheck import TrainCheckOptions, cli_main

    opts = TrainCheckOptions(ckpt=ckpt, hf=hf, steps=steps, lr=lr, optimizer=optimizer.value,
                             weight_decay=weight_decay, batch=batch, tokens=tokens, seed=seed, dtype=dtype.value,
                             device=device, save=save, config_files=tuple(config or ()), qkv_layout=value_of(qkv_layout),
                             trust_pickle=trust_pickle)
    to_stdout = json_out is not None and str(json_out) == "-"
    cli_main(opts, json_out, console if to_stdout else out_console)


@app.command("inspect")
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="A checkpoint directory of any supported format.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")] = False,
    config: ConfigOpt = None,
    trust_pickle: TrustOpt = False,
    check_finite: Annotated[bool, typer.Option(
        "--check-finite", help="Also read all tensor data and fail (exit 2) on NaN/Inf, naming tensor, rank and file.")] = False,
) -> None:
    """Show format, layout, TP/PP, architecture, dtype, parameter count and the tensors."""
    from neoxconv.inspect import describe, render
    from neoxconv.io import set_check_finite, set_trust_pickle

    set_trust_pickle(trust_pickle)
    set_check_finite(check_finite)
    info = describe(path, config_files=config)
    if as_json:
        import json

        print(json.dumps(info, indent=2))
    else:
        render(info, out_console)


@app.command("verify")
def verify_cmd(
    path: Annotated[Path, typer.Argument(help="A checkpoint directory of any supported format.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    config: ConfigOpt = None,
    trust_pickle: TrustOpt = False,
) -> None:
    """Check a checkpoint on disk: files present and readable, headers, shapes across ranks and against the config,
    finite values, and the sha256 of every file where neoxconv wrote a manifest. Exit 0 sound, 1 damaged,
    2 unreadable."""
    from neoxconv.io import set_trust_pickle
    from neoxconv.verify import render, verify

    set_trust_pickle(trust_pickle)
    report = verify(path, config_files=config)
    if as_json:
        import json

        print(json.dumps(report.to_dict(), indent=2))
    else:
        render(report, out_console)
    raise typer.Exit(report.exit_code)


@app.command("upload")
def upload_cmd(
    directory: Annotated[Path, typer.Argument(help="Exported Hugging Face directory (config.json, weights, tokenizer, README.md).")],
    repo_id: Annotated[str, typer.Argument(help="Hub repository, namespace/name (a bare name uses the token owner's namespace).")],
    revision: Annotated[Optional[str], typer.Option("--revision", "-r", help="Branch to push to, created from main if missing; one per training step, e.g. step143000. Default: main.")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private; refuse to upload if it already exists and is public.")] = False,
    commit_message: Annotated[Optional[str], typer.Option("--commit-message", "-m", help="Commit title. Default: 'Upload <dir name> with neoxconv <version>'.")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request against main instead of pushing (not with --revision).")] = False,
    token: Annotated[Optional[str], typer.Option("--token", help="Hugging Face token. Default: $HF_TOKEN, then the stored login.")] = None,
    endpoint: Annotated[Optional[str], typer.Option("--endpoint", help="Hub URL, e.g. a mirror. Default: $HF_ENDPOINT or https://huggingface.co.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and list the files and sizes that would be uploaded; send nothing.")] = False,
) -> None:
    """Upload an exported model to the Hugging Face Hub in one commit (validated first)."""
    from neoxconv.hub import upload_command

    upload_command(directory, repo_id, revision=revision, private=private, commit_message=commit_message,
                   create_pr=create_pr, token=token, endpoint=endpoint, dry_run=dry_run, console=console)


@app.command("export-run")
def export_run_cmd(
    run_dir: Annotated[Path, typer.Argument(help="NeoX save dir of a training run (its global_stepN directories).")],
    out_dir: Annotated[Optional[Path], typer.Argument(
        help="Local output: one complete HF export per step in OUT_DIR/step{N}/ (or use --push-to-hub).")] = None,
    push_to_hub: Annotated[Optional[str], typer.Option(
        "--push-to-hub", help="Hub repository (namespace/name, created if missing): one branch per step.")] = None,
    steps: Annotated[str, typer.Option(
        "--steps", help="Steps to export: all, a list (1000,2000) or START:STOP:STRIDE (STOP exclusive, like "
                        "Python; items can be mixed: 0,1,2,1000:144000:1000).")] = "all",
    branch_template: Annotated[str, typer.Option(
        "--branch-template", help="Branch (or directory) name per step; {step} is the step number.")] = "step{step}",
    main: Annotated[MainBranch, typer.Option(
        "--main", help="latest: main holds the newest exported step (Hub); none: main is left alone.")] = MainBranch.latest,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Check each step's logit parity against its NeoX source (fp32); the result goes in the "
                         "card, a failing step is not uploaded.")] = False,
    private: Annotated[bool, typer.Option("--private", help="Create the Hub repo as private; refuse a public one.")] = False,
    token: Annotated[Optional[str], typer.Option("--token", help="Hugging Face token. Default: $HF_TOKEN, then the stored login.")] = None,
    endpoint: Annotated[Optional[str], typer.Option("--endpoint", help="Hub URL. Default: $HF_ENDPOINT or https://huggingface.co.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List what would be converted, uploaded and skipped; convert and send nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout (no progress).")] = False,
    trust_pickle: TrustOpt = False,
) -> None:
    """Export every checkpoint of a training run, one Hub branch (or directory) per step, incrementally:
    steps whose source is unchanged are skipped; exit 1 if any step failed. See docs/publishing.md."""
    from rich.markup import escape
    from transformers.utils import logging as hf_logging

    from neoxconv.export_run import export_run, render_report
    from neoxconv.io import set_trust_pickle

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if as_json:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    set_trust_pickle(trust_pickle)
    report = export_run(run_dir, out_dir, push_to_hub, steps=steps, branch_template=branch_template, main=main.value,
                        verify=verify, private=private, token=token, endpoint=endpoint, dry_run=dry_run,
                        on_progress=None if as_json else lambda msg: console.print(f"[dim]{escape(msg)}[/dim]"))
    if as_json:
        import json

        print(json.dumps(report.to_dict(), indent=2))
    else:
        render_report(report, out_console)
    raise typer.Exit(1 if report.failed else 0)


@app.command("demo")
def demo_cmd(
    out: Annotated[Optional[Path], typer.Argument(help="Where to keep the demo files (default: a temp dir).")] = None,
) -> None:
    """Run the main job on a tiny seeded model: HF → NeoX (TP=2) → HF, logits compared."""
    from neoxconv.demo import run_demo

    ok = run_demo(out, out_console)
    raise typer.Exit(0 if ok else 1)


def _click_exceptions():
    """The exception module of the click that typer runs on. typer >= 0.24 vendors click as
    `typer._click`, whose UsageError is not the separately installed `click`'s: matching on
    `click.exceptions` turned every usage mistake into an "internal error" (exit 3)."""
    import importlib

    return importlib.import_module(typer.BadParameter.__module__)


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    clicks = _click_exceptions()
    try:
        rc = app(standalone_mode=False, prog_name="neoxconv")
    except SystemExit:
        raise
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("[red]aborted[/red]")
        sys.exit(130)
    except clicks.ClickException as e:  # usage errors: usage line, --help hint, exit 2
        if debug:
            console.print_exception()
        e.show()
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - the top level turns every error into one line
        from neoxconv.errors import NeoxconvError

        if debug:
            console.print_exception()
        if isinstance(e, NeoxconvError):
            console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        console.print(f"[red]internal error:[/red] {type(e).__name__}: {e} (run with --debug for a traceback)",
                      highlight=False, soft_wrap=True)
        sys.exit(3)
    if rc == 130:  # typer turns Ctrl-C inside a command into exit code 130
        console.print("[red]aborted[/red]")
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
