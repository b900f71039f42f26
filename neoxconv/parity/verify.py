"""The ``--verify`` flag of the conversion commands: parity of the finished output against the
source before it lands (docs/parity.md, "--verify on conversions")."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from neoxconv import graph
from neoxconv.errors import NeoxconvError, ParityFailure
from neoxconv.reference import ParityReport

from .report import render_report, save_report
from .run import run_parity

__all__ = ["FAILED_SUFFIX", "REPORT_NAME", "check_verify_target", "failed_dir", "verifier"]

REPORT_NAME = "parity-report.json"
FAILED_SUFFIX = ".parity-failed"


def failed_dir(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + FAILED_SUFFIX)


def check_verify_target(out: Path) -> None:
    """Before converting: OUT.parity-failed may only be replaced if it is ours (has a report)."""
    failed = failed_dir(out)
    if failed.exists() and not (failed / REPORT_NAME).is_file():
        raise NeoxconvError(f"{failed}: exists and is not a neoxconv parity-failed output; move it away first "
                            "(--verify puts a failed output there)")


def verifier(src: Path, out: Path, *, to: str, config_files=None, family: str | None = None,
             qkv_layout: str | None = None, force: bool = False, console=None,
             progress: Callable[[str, int, int], None] | None = None) -> Callable[[Path, dict], None]:
    """The ``after_write`` hook of ``--verify``: parity between ``src`` and the finished temp dir.

    ``qkv_layout`` is the conversion's ``--qkv-layout``: the SOURCE's layout (side A) when the
    source is NeoX; the output (side B) is read with the layout its writer recorded in its
    ``neoxconv.json`` (``--out-qkv-layout`` for a NeoX -> NeoX migration), never with A's.

    Pass: ``parity-report.json`` is written inside the output (and, for HF outputs, the report
    joins the model card's provenance); the output then lands at ``out`` as usual.
    Fail: the report is written inside the output, the output is renamed to
    ``OUT.parity-failed`` (replacing an earlier one), nothing is written to ``out``: an existing
    ``out`` (that --force was to replace) is left untouched, and :class:`ParityFailure` (exit 1)
    is raised. ``progress``: as in :func:`run_parity`.
    """
    check_verify_target(out)

    def after_write(tmp: Path, result: dict) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        result["source"].tensors.release()  # the conversion's last group: parity needs the memory
        # A conversion can only hold the mean of norm copies that drifted across NeoX ranks, so
        # --verify checks the conversion against that ("mean"); the drift itself is reported in
        # the notes and measured by `neoxconv parity` (default "own").
        src_layout = qkv_layout if graph.detect(Path(src)) == "neox" else None
        # --drop-sliding-window: compared within the window's length, where nothing changed.
        report = run_parity(src, tmp, config_files=config_files, arch=family, qkv_layout=src_layout,
                            replicated="mean", window_dropped=bool(result.get("dropped_window")), progress=progress)
        failed = failed_dir(out)
        report.info["b"]["path"] = str(out if report.passed else failed)
        save_report(report, tmp / REPORT_NAME)
        if report.passed and to == "hf":
            _card_with_report(tmp, result, report)
        if console is not None:
            render_report(report, console)
        if report.passed:
            return
        if failed.exists():
            shutil.rmtree(failed)
        tmp.rename(failed)
        kept = f" (the existing {out} is unchanged)" if Path(out).exists() else ""
        raise ParityFailure(f"parity check failed ({'; '.join(report.info['reasons'])}); the output was moved to "
                            f"{failed} with {REPORT_NAME} inside, nothing was written to {out}{kept}")

    return after_write


def _card_with_report(tmp: Path, result: dict, report: ParityReport) -> None:
    from neoxconv.modelcard import write_model_card

    prov = dict(result.get("provenance") or {})
    prov["parity"] = {k: v for k, v in report.to_dict().items() if k != "info"} | {
        "config_check": report.info["config_check"]["verdict"], "report_file": REPORT_NAME}
    write_model_card(tmp, prov, force=True)
    result["provenance"] = prov
