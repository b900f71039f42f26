"""The commands that publish: upload, export-run; and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from neoxconv.choices import MainBranch
from neoxconv.cli.options import DropWindowOpt, TrustOpt
from neoxconv.cli.app import app, console, out_console


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
    drop_sliding_window: DropWindowOpt = False,
    trust_pickle: TrustOpt = False,
) -> None:
    """Export every checkpoint of a training run, one Hub branch (or directory) per step, incrementally:
    steps whose source is unchanged are skipped; exit 1 if any step failed. See docs/publishing.md."""
    from rich.markup import escape
    from transformers.utils import logging as hf_logging

    from neoxconv.cli.progress import BYTES, Bars
    from neoxconv.export_run import export_run, render_report
    from neoxconv.io import set_trust_pickle

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if as_json:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    set_trust_pickle(trust_pickle)
    bars = Bars(BYTES, quiet=as_json)
    try:
        report = export_run(run_dir, out_dir, push_to_hub, steps=steps, branch_template=branch_template,
                            main=main.value, verify=verify, private=private, token=token, endpoint=endpoint,
                            dry_run=dry_run, drop_sliding_window=drop_sliding_window, progress=bars,
                            on_progress=None if as_json else lambda msg: console.print(f"[dim]{escape(msg)}[/dim]"))
    finally:
        bars.stop()
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
