"""The parity report for people: two rich tables (logits, numerics config A vs B), reasons and
notes; and the JSON file."""

from __future__ import annotations

from pathlib import Path

from neoxconv.reference import ParityReport

from .sides import NUMERIC_FIELDS

__all__ = ["render_report", "save_report"]


def render_report(report: ParityReport, console) -> None:
    """Two rich tables (logits, config A vs B) plus reasons and notes."""
    from rich.table import Table

    info = report.info
    a, b = info.get("a", {}), info.get("b", {})
    ok = report.passed
    t = Table(title=f"parity: {'[green]PASS[/green]' if ok else '[red]FAIL[/red]'}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("A (reference)", f"{a.get('path')} ({a.get('format')}{', tp ' + str(a['tp']) if 'tp' in a else ''})")
    t.add_row("B (candidate)", f"{b.get('path')} ({b.get('format')}{', tp ' + str(b['tp']) if 'tp' in b else ''})")
    bt = info.get("batch", {})
    t.add_row("compared", f"{report.positions} positions x {report.vocab} vocab ({bt.get('source')} tokens, "
                          f"batch {bt.get('batch')} x {bt.get('tokens')})")
    t.add_row("max |Δ|", f"{report.max_abs_diff:.3g}")
    t.add_row("mean |Δ|", f"{report.mean_abs_diff:.3g}")
    t.add_row("argmax agreement", f"{report.argmax_agreement:.2%}")
    t.add_row("tolerance", f"{report.dtype}: atol {report.atol:g}, rtol {report.rtol:g}")
    t.add_row("logits", info.get("logits_verdict", report.verdict))
    t.add_row("config", info.get("config_check", {}).get("verdict", "?"))
    console.print(t)
    c = Table(title="numerics config")
    for col in ("field", "A", "B"):
        c.add_column(col)
    diffs = info.get("config_check", {}).get("differences", {})
    for f in NUMERIC_FIELDS:
        va, vb = a.get("config", {}).get(f), b.get("config", {}).get(f)
        style = "red" if f in diffs else None
        c.add_row(f, str(va), str(vb), style=style)
    c.add_row("qkv layout", str(a.get("qkv_layout", "-")), str(b.get("qkv_layout", "-")))
    console.print(c)
    for r in info.get("reasons", []):
        console.print(f"[red]✗[/red] {r}", highlight=False)
    for n in info.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {n}", highlight=False)


def save_report(report: ParityReport, path: Path) -> None:
    Path(path).write_text(report.to_json(indent=2) + "\n")
