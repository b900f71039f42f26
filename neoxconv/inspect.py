"""`neoxconv inspect`: what a checkpoint is, from headers only (no tensor data is read, unless
--check-finite asks for a NaN/Inf scan). Shows the neoxconv manifest when there is one (checked
by `neoxconv verify`, not here) and NeoX norm copies that drifted apart across TP ranks."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def describe(path: Path, config_files: list[Path] | None = None) -> dict:
    from neoxconv import graph
    from neoxconv.convert import scan_source, source_warnings

    fmt = graph.detect(path)
    ckpt = graph.read(path, fmt=fmt, config_files=config_files)
    scan_source(ckpt)  # norm copies' drift (NeoX); NaN/Inf with --check-finite
    spec, info = ckpt.spec, ckpt.info
    tensors = [{"name": n, "shape": list(ckpt.tensors[n].shape), "dtype": str(ckpt.tensors[n].dtype).removeprefix("torch.")}
               for n in ckpt.tensors]
    out = {
        "path": str(path),
        "format": fmt,
        "layout": info.get("layout"),
        "tp": info.get("tp", 1),
        "pp": info.get("pp", 1),
        "iteration": info.get("iteration"),
        "schema": info.get("schema"),
        "qkv_layout": info.get("qkv_layout"),
        "arch": spec.family,
        "dtype": spec.dtype,
        "parameters": ckpt.tensors.num_params(),
        "spec": spec.to_dict(),
        "tensors": tensors,
        "manifest": _manifest(path),
        "warnings": source_warnings(ckpt) or None,
    }
    return {k: v for k, v in out.items() if v is not None}


def _manifest(path: Path) -> dict | None:
    from neoxconv.errors import NeoxconvError
    from neoxconv.manifest import find_manifest, read_manifest

    file = find_manifest(Path(path))
    if file is None:
        return None
    try:
        m = read_manifest(file)
    except NeoxconvError as e:
        return {"file": str(file), "error": str(e)}
    return {"file": str(file), "files": len(m["files"]), "bytes": sum(v["size"] for v in m["files"].values()),
            "neoxconv": m.get("neoxconv")}


def _numerics(spec: dict) -> str:
    """One line of what the model computes; the custom export's features only where they are set."""
    position = spec.get("position", "rotary")
    pos = f"rotary {spec['rotary_pct']}×d base {spec['rotary_base']:g}" if position == "rotary" else \
        f"{position} positions"
    extras = [what for what, on in (
        ("QK-norm", spec.get("qk_norm")), ("gpt_j_tied", spec.get("parallel_norms_tied")),
        (f"sliding window {spec.get('sliding_window')} keys", spec.get("sliding_window")),
        (f"attention {'/'.join(spec.get('attention_types') or ())}",
         set(spec.get("attention_types") or ()) - {"global"})) if on]
    return (f"{spec['norm']} eps={spec['norm_eps']}, {spec['activation']}, {pos}, parallel residual "
            f"{spec['parallel_residual']}, tied {spec['tied']}" + "".join(f", {e}" for e in extras))


def render(d: dict, console: Console) -> None:
    head = Table(show_header=False, title=d["path"])
    for key in ("format", "layout", "tp", "pp", "iteration", "schema", "qkv_layout", "arch", "dtype"):
        if key in d:
            head.add_row(key, str(d[key]))
    head.add_row("parameters", f"{d['parameters']:,}")
    spec = d["spec"]
    head.add_row("shape", f"{spec['layers']} layers, hidden {spec['hidden']}, {spec['heads']} heads "
                          f"({spec['kv_heads']} KV), MLP {spec['intermediate']}, vocab {spec['vocab_size']} "
                          f"(rows {spec['vocab_rows']})")
    if "manifest" in d:
        m = d["manifest"]
        head.add_row("manifest", m.get("error") or f"{m['files']} files, {m['bytes']:,} bytes, written by neoxconv "
                                                   f"{m['neoxconv']} (`neoxconv verify` checks them)")
    head.add_row("numerics", _numerics(spec))
    console.print(head)
    for w in d.get("warnings", []):
        console.print(f"[yellow]WARNING:[/yellow] {w}", highlight=False, soft_wrap=True)
    t = Table(title="canonical tensors")
    for col in ("name", "shape", "dtype"):
        t.add_column(col)
    for row in d["tensors"]:
        t.add_row(row["name"], "×".join(map(str, row["shape"])), row["dtype"])
    console.print(t)
