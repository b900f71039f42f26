"""`neoxconv verify PATH`: is a checkpoint on disk sound? Exit 0 sound, 1 damaged, 2 unreadable.

What is checked, for any format (NeoX either layout, HF, Meta):

1. If neoxconv wrote it (`neoxconv-manifest.json` at its root): every listed file is present,
   with the listed size and sha256. This is the only check that sees a changed byte anywhere.
2. The checkpoint is read as a conversion reads it: every referenced file present, inside the
   directory and readable; headers and configs parse; shapes and dtypes consistent across TP
   ranks and layers (neox_files) and with the config (neoxconv.validate, which every reader
   runs); and every floating-point value finite (the --check-finite scan over all tensor data).

"Damaged" (1): a manifest mismatch, a file missing, truncated or unreadable, shards that
disagree, shapes that contradict the config, non-finite values (`DamagedInput` from the
readers). "Unreadable" (2): not a checkpoint at all, a config that does not parse or describes
something neoxconv does not read, a pickle that needs --trust-pickle. When the manifest
already shows damage, any later error is counted as part of it.

Without a manifest (a checkpoint neoxconv did not write), only damage that breaks structure or
makes values non-finite can be seen: a flipped bit in the middle of a weight usually leaves a
finite, plausible number.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from neoxconv.errors import DamagedInput, NeoxconvError

EXIT = {"sound": 0, "damaged": 1, "unreadable": 2}


@dataclass
class VerifyReport:
    path: str
    format: str | None = None
    problems: list[str] = field(default_factory=list)  # damage, one line each (file, tensor, rank)
    error: str | None = None  # why the checkpoint could not be read as one
    notes: list[str] = field(default_factory=list)
    manifest: dict | None = None
    tensors: int = 0

    @property
    def verdict(self) -> str:
        return "damaged" if self.problems else "unreadable" if self.error else "sound"

    @property
    def exit_code(self) -> int:
        return EXIT[self.verdict]

    def to_dict(self) -> dict:
        return {"path": self.path, "verdict": self.verdict, "exit_code": self.exit_code, "format": self.format,
                "problems": self.problems, "error": self.error, "notes": self.notes, "manifest": self.manifest,
                "tensors": self.tensors}


def verify(path: Path, config_files: list[Path] | None = None,
           progress: Callable[[str, int, int], None] | None = None) -> VerifyReport:
    """``progress(phase, done, total)``: phase "hash" (bytes of the manifest's files hashed), then
    "scan" (layer groups read and checked)."""
    path = Path(path)
    report = VerifyReport(str(path))
    on = (lambda phase: None) if progress is None else (lambda phase: lambda d, t: progress(phase, d, t))
    _check_manifest(path, report, on("hash"))
    from neoxconv.io import check_finite_enabled, set_check_finite

    before = check_finite_enabled()
    set_check_finite(True)
    try:
        _check_contents(path, config_files, report, on("scan"))
    except DamagedInput as e:
        report.problems.append(str(e))
    except NeoxconvError as e:
        if report.problems:  # the manifest already shows damage: this is part of it
            report.problems.append(str(e))
        else:
            report.error = str(e)
    finally:
        set_check_finite(before)
    return report


def _check_manifest(path: Path, report: VerifyReport, progress=None) -> None:
    from neoxconv.manifest import check_manifest, find_manifest

    file = find_manifest(path) if path.is_dir() else None
    if file is None:
        report.notes.append("no neoxconv-manifest.json (not written by neoxconv): file hashes cannot be checked; "
                            "structure, shapes and finite values are")
        return
    try:
        manifest, problems, unlisted = check_manifest(file, progress)
    except DamagedInput as e:
        report.problems.append(str(e))
        return
    report.manifest = {"file": str(file), "files": len(manifest["files"]), "neoxconv": manifest.get("neoxconv")}
    report.problems += [f"{p['file']}: {p['problem']}" for p in problems]
    if unlisted:
        report.notes.append(f"{len(unlisted)} file(s) not in the manifest, added after the conversion: "
                            f"{', '.join(unlisted[:5])}{' ...' if len(unlisted) > 5 else ''}")


def _check_contents(path: Path, config_files, report: VerifyReport, progress=None) -> None:
    from neoxconv import graph
    from neoxconv.io import load_pickle

    report.format = fmt = graph.detect(path)
    if fmt == "hf":  # JSON files beside the weights (tokenizer, generation config) must parse too
        for f in sorted(path.glob("*.json")):
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise DamagedInput(f"{f}: does not parse as JSON ({e})") from None
    ckpt = graph.read(path, fmt=fmt, config_files=config_files)  # the readers check shapes against the spec
    report.tensors = len(list(ckpt.tensors))
    from neoxconv.convert import scan_source, source_warnings

    scan_source(ckpt, progress)  # every tensor's data: NaN/Inf (and NeoX drift); reading took headers only
    if fmt != "neox":
        return
    nf = ckpt.info["files"]
    if nf.layout == "pipeline":  # DeepSpeed's model-states files hold no weights here, but must load
        for f in sorted(nf.tag_dir.glob("mp_rank_*_model_states.pt")):
            load_pickle(f)
    report.notes += source_warnings(ckpt)  # drifted norm copies, a window training may have skipped


def render(report: VerifyReport, console) -> None:
    from rich.markup import escape

    style = {"sound": "green", "damaged": "red", "unreadable": "red"}[report.verdict]
    head = f"[{style}]{report.verdict.upper()}[/{style}] {escape(report.path)}"
    if report.format:
        head += f" ({report.format}, {report.tensors} tensors"
        if report.manifest:
            head += f", {report.manifest['files']} files in the manifest"
        head += ")"
    console.print(head, highlight=False, soft_wrap=True)
    for line in report.problems:
        console.print(f"  damaged: {escape(line)}", highlight=False, soft_wrap=True)
    if report.error:
        console.print(f"  error: {escape(report.error)}", highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"  note: {escape(note)}", highlight=False, soft_wrap=True)
