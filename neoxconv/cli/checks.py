"""The commands that check: parity, train-check, inspect, verify."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from neoxconv.choices import ComputeDtype, Family, Optimizer, QkvLayout, Replicated, value_of
from neoxconv.cli.app import app, console, out_console
from neoxconv.cli.options import ArchOpt, ConfigOpt, QkvOpt, TrustOpt, family_of


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
    window_dropped: Annotated[bool, typer.Option(
        "--window-dropped", help="B is A exported with --drop-sliding-window: compare on at most A's window length "
                                 "(sliding_window_width + 1 tokens), where both compute the same function.")] = False,
    trust_pickle: TrustOpt = False,
) -> None:
    """Compare the logits of two checkpoints (any formats) on one token batch; exit 0 pass, 1 fail, 2 bad input."""
    import os

    from transformers.utils import logging as hf_logging

    from neoxconv.cli.progress import GROUPS, Bars
    from neoxconv.io import set_trust_pickle
    from neoxconv.parity import render_report, run_parity, save_report

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    set_trust_pickle(trust_pickle)
    bars = Bars(GROUPS, quiet=(json_out is not None and str(json_out) == "-")
                or int(os.environ.get("RANK", "0")) != 0)
    try:
        report = run_parity(a, b, tokens=tokens, batch=batch, seed=seed, text=text, dtype=dtype.value,
                            device=device, atol=atol, rtol=rtol, config_files=config, config_files_b=config_b,
                            arch=family_of(arch), qkv_layout=value_of(qkv_layout),
                            qkv_layout_b=value_of(qkv_layout_b), replicated=replicated.value,
                            window_dropped=window_dropped, progress=bars)
    finally:
        bars.stop()

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
    from neoxconv.cli.progress import BYTES, GROUPS, Bars
    from neoxconv.io import set_trust_pickle
    from neoxconv.verify import render, verify

    set_trust_pickle(trust_pickle)
    bars = Bars(GROUPS, quiet=as_json)
    units = {"hash": ("hashing (sha256)", BYTES), "scan": ("reading, checking values", GROUPS)}
    try:
        report = verify(path, config_files=config,
                        progress=lambda phase, done, total: bars(units[phase][0], done, total, units[phase][1]))
    finally:
        bars.stop()
    if as_json:
        import json

        print(json.dumps(report.to_dict(), indent=2))
    else:
        render(report, out_console)
    raise typer.Exit(report.exit_code)
