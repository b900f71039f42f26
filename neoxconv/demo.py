"""`neoxconv demo`: the main job end to end on a tiny seeded model, no downloads.

A tiny GPTNeoX (parallel residual, partial rotary, biases) is made on the fly, imported to a
NeoX checkpoint at TP=2, exported back to Hugging Face, and then proven twice: the export's
logits against the original model's (bit-exact), and the NeoX-semantics reference forward run
directly on the TP=2 shards against the export (`neoxconv parity`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table


def run_demo(out: Path | None, console: Console) -> bool:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    from neoxconv.convert import convert
    from neoxconv.tiny import logits, tiny_hf_model

    base = Path(out) if out else Path(tempfile.mkdtemp(prefix="neoxconv-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    src, neox, back = base / "hf-source", base / "neox-tp2", base / "hf-export"
    for d in (neox, back):
        if d.exists():
            import shutil

            shutil.rmtree(d)
    model = tiny_hf_model("gptneox", seed=0)
    if not src.exists():
        model.save_pretrained(src)
    console.print(f"[bold]1.[/bold] tiny GPTNeoX (seed 0) saved to {src}")
    convert(src, neox, to="neox", tp=2, layout="pipeline")
    files = sorted(p.name for p in next(neox.glob("global_step*")).glob("*.pt"))
    console.print(f"[bold]2.[/bold] NeoX checkpoint at TP=2: {neox} ({len(files)} .pt files: {files[0]} ...)")
    convert(neox, back, to="hf")
    console.print(f"[bold]3.[/bold] exported back to Hugging Face: {back}")
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(back, attn_implementation="eager").eval()
    vocab = model.config.vocab_size
    console.print(f"   vocabulary {vocab} padded to {exported.config.vocab_size} rows for TP=2 (NeoX rule); "
                  "padding rows are excluded from the comparison")
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    a, b = logits(model, ids), logits(exported, ids)[..., :vocab]
    diff = (a - b).abs().max().item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    ok = diff == 0.0
    table = Table(title="logits: original vs NeoX round trip")
    for col in ("positions", "max |Δ|", "argmax agreement", "verdict"):
        table.add_column(col)
    table.add_row(str(ids.numel()), f"{diff:.3g}", f"{agree:.0%}", "[green]bit-exact[/green]" if ok else "[red]MISMATCH[/red]")
    console.print(table)
    from neoxconv.parity import render_report, run_parity

    console.print(f"[bold]4.[/bold] neoxconv parity {neox.name} {back.name}: NeoX reference forward on the TP=2 "
                  "shards vs the HF export")
    report = run_parity(neox, back)
    render_report(report, console)
    return ok and report.passed
