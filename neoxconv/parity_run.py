"""`neoxconv parity A B` and the `--verify` flag: prove a conversion on the stored files.

Each side's logits come from the most independent forward available for its format:

* **NeoX**: :func:`neoxconv.reference.neox_reference_logits` on the per-rank tensors exactly as
  stored (fused QKV per rank, per-rank biases, vocab-parallel logits), with the semantics taken
  from the checkpoint's own YAML. The converter's canonical map is never used, so a layout bug
  in the converter cannot cancel out.
* **HF**: transformers (eager attention) on the directory.
* **Meta**: :func:`neoxconv.reference.meta_reference_logits` on ``consolidated.XX.pth`` +
  ``params.json``, shard by shard.

A is the reference, B the candidate: ``|B - A| <= atol + rtol·|A|`` at every position over the
real vocabulary (the smaller tokenizer size of the two; padding rows are excluded), default
tolerances per dtype from :data:`neoxconv.reference.DEFAULT_TOLERANCES`.

Logits cannot see every config error (an RMSNorm eps 100x off moves logits ~4e-5, below fp32
noise bounds), so the report ALSO compares the numerics fields of both sides' ModelSpecs
(:data:`NUMERIC_FIELDS`) and fails with a reason naming each field that differs.

Replicated copies (norms, sequential-residual row biases) that differ across NeoX ranks: the
NeoX side uses each rank's own copy by default (``replicated="own"``), because that is what
NeoX computes and therefore what a conversion must reproduce; an HF export can only hold their
mean, so such a checkpoint fails by the size of that gap, and the report says how large the
drift is. ``replicated="mean"`` makes the reference use exactly what a merged export holds (the
mean of the copies and the sum of gpt-j row-bias parts, rounded to the stored dtype) to check the
layout alone; ``--verify`` uses it.

The NeoX reference computes NeoX's sliding window (W+1 keys on global layers through the training
mask, on flash layers through ``window_size=(W, -1)``), so NeoX ``sliding_window_width`` W must
face HF ``sliding_window`` W+1.
"""

from __future__ import annotations

import json
import os
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from neoxconv.errors import NeoxconvError, ParityFailure
from neoxconv.reference import (
    ParityReport,
    SimulatedGroup,
    compare_logits,
    default_tolerance,
    hf_model_logits,
    load_hf_model,
    make_batch,
    meta_reference_logits,
    neox_reference_logits,
)
from neoxconv.reference.neox_semantics import NeoxSemantics

__all__ = ["NUMERIC_FIELDS", "REPORT_NAME", "logits_for", "run_parity", "render_report", "verifier"]

#: ModelSpec fields that change the numerics without changing any tensor shape.
NUMERIC_FIELDS = ("norm", "norm_eps", "rotary_pct", "rotary_base", "activation", "parallel_residual",
                  "sliding_window")
REPORT_NAME = "parity-report.json"
FAILED_SUFFIX = ".parity-failed"
_NORM_PREFIXES = ("input_layernorm.", "post_attention_layernorm.", "norm.")
_ROW_BIASES = ("attention.dense.bias", "mlp.linear2.bias", "mlp.dense_4h_to_h.bias")
_PRECISION = {"float32": 0, "float16": 1, "bfloat16": 2}  # looser tolerance = higher rank


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise NeoxconvError(f"unknown --device {name!r} (use cpu or cuda[:N])") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NeoxconvError(f"--device {name}: CUDA is not available on this machine "
                            "(torch.cuda.is_available() is False); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise NeoxconvError(f"--device {name}: only cpu and cuda are supported")
    return dev


def _torch_dtype(name: str) -> torch.dtype:
    from neoxconv.reference.parity import canonical_dtype

    try:
        return getattr(torch, canonical_dtype(name))
    except ValueError as e:
        raise NeoxconvError(f"--dtype: {e}") from None


class _DriftWatch:
    """The NeoX shard source handed to the reference, measuring how far replicated copies differ."""

    def __init__(self, files, gpt_j: bool):
        self.files, self.gpt_j = files, gpt_j
        self.tp, self.num_layers, self.args, self.qkv_layout = files.tp, files.num_layers, files.args, files.qkv_layout
        self.max_drift, self.drifted = 0.0, 0

    def rank_states(self, idx: int) -> list[dict[str, torch.Tensor]]:
        states = self.files.rank_states(idx)
        for k in states[0]:
            if k.startswith(_NORM_PREFIXES) or (k in _ROW_BIASES and not self.gpt_j):
                d = max(((st[k].float() - states[0][k].float()).abs().max().item() for st in states[1:]), default=0.0)
                self.drifted += d > 0
                self.max_drift = max(self.max_drift, d)
        return states


class _Side:
    """One checkpoint: its format, ModelSpec (the converter's reading) and how to get its logits."""

    def __init__(self, path: Path, config_files=None, arch: str | None = None, qkv_layout: str | None = None):
        from neoxconv import graph

        self.path = Path(path)
        self.fmt = graph.detect(self.path)
        if self.fmt == "neox" and not qkv_layout:
            qkv_layout = _sidecar_layout(self.path)
        self.ckpt = graph.read(self.path, fmt=self.fmt, config_files=config_files, family=arch, qkv_layout=qkv_layout)
        self.spec = self.ckpt.spec
        self.notes: list[str] = []

    @property
    def real_vocab(self) -> int:
        return int(self.spec.vocab_size)

    def summary(self) -> dict[str, Any]:
        info = self.ckpt.info
        out: dict[str, Any] = {"path": str(self.path), "format": self.fmt, "family": self.spec.family,
                               "real_vocab": self.real_vocab, "vocab_rows": self.spec.vocab_rows,
                               "stored_dtype": self.spec.dtype}
        for key in ("layout", "tp", "pp", "qkv_layout"):
            if info.get(key) is not None:
                out[key] = info[key]
        out["config"] = {f: getattr(self.spec, f) for f in NUMERIC_FIELDS}
        return out

    def logits(self, tokens: torch.Tensor, dtype: torch.dtype, device: torch.device, replicated: str) -> torch.Tensor:
        if self.fmt == "hf":
            model = load_hf_model(self.path, dtype).to(device)
            return hf_model_logits(model, tokens).cpu()
        if self.fmt == "meta":
            from neoxconv.io import load_pickle, read_json

            files = sorted((int(m[1]), p) for p in self.path.iterdir()
                           if (m := re.match(r"^consolidated\.(\d+)\.pth$", p.name)))
            shards = [load_pickle(p) for _, p in files]
            params = read_json(self.path / "params.json")
            return meta_reference_logits(shards, params, tokens, group=SimulatedGroup(len(shards), device),
                                         dtype=dtype).cpu()
        files = self.ckpt.info["files"]
        sem = NeoxSemantics.from_args(files.args, files.qkv_layout, files.num_layers)
        source = _DriftWatch(files, sem.gpt_j_residual)
        out = neox_reference_logits(source, tokens, group=rank_group(files.tp, device), dtype=dtype,
                                    replicated=replicated).cpu()
        if source.max_drift > 0:
            self.notes.append(
                f"{self.path}: {source.drifted} replicated tensor(s) (norms"
                f"{'' if sem.gpt_j_residual else ', row biases'}) differ across the {files.tp} TP ranks, by up to "
                f"{source.max_drift:.3g}. The reference used "
                + ("each rank's own copy (what NeoX computes; an HF export holds their mean, so the gap shows in "
                   "the logits; rerun with --replicated mean to check the layout alone)." if replicated == "own"
                   else "their mean (what an HF export holds); NeoX itself uses each rank's own copy."))
        if sem.gpt_j_residual and files.tp > 1 and self.spec.dtype != "float32" and replicated == "own":
            self.notes.append(
                f"{self.path}: the gpt_j_residual row biases are stored as {files.tp} per-rank {self.spec.dtype} parts; "
                f"a merged export holds their sum rounded to {self.spec.dtype}, which differs from the parts NeoX adds "
                "by that rounding (rerun with --replicated mean to model the export exactly).")
        return out


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def rank_group(tp: int, device: torch.device):
    """Ranks simulated in this process, or, under torchrun, one real process per TP rank
    (gloo on CPU, NCCL on CUDA): the NeoX reference then runs with real collectives."""
    if not launched_by_torchrun():
        return SimulatedGroup(tp, device)
    world = int(os.environ["WORLD_SIZE"])
    if world != tp:
        raise NeoxconvError(f"torchrun started {world} processes, but the NeoX checkpoint has TP {tp}: "
                            f"use --nproc-per-node {tp}")
    from neoxconv.reference.ranks import DistributedGroup

    return DistributedGroup.from_env()


def _sidecar_layout(path: Path) -> str | None:
    """The GQA layout neoxconv recorded next to a NeoX checkpoint it wrote (neoxconv.json)."""
    from neoxconv.formats.neox_files import read_sidecar, resolve_tag_dir

    layout = read_sidecar(resolve_tag_dir(path)).get("qkv_layout")
    return layout if layout in ("gqa_blocked", "gqa_fakehead") else None


def logits_for(path, tokens: torch.Tensor, *, dtype="fp32", device="cpu", config_files=None, arch: str | None = None,
               qkv_layout: str | None = None, replicated: str = "own") -> torch.Tensor:
    """fp32 logits [b, s, vocab rows] of any checkpoint for ``tokens`` [b, s] (see module doc)."""
    dt = dtype if isinstance(dtype, torch.dtype) else _torch_dtype(dtype)
    return _Side(path, config_files, arch, qkv_layout).logits(tokens, dt, _device(str(device)), replicated)


def _text_tokens(text: str, sides: list[_Side]) -> tuple[torch.Tensor, str]:
    for side in sides:
        if side.fmt == "hf" and any((side.path / n).is_file() for n in ("tokenizer.json", "tokenizer.model",
                                                                         "tokenizer_config.json")):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(side.path, local_files_only=True)
            return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]], dtype=torch.long), str(side.path)
        if side.fmt == "neox":
            from neoxconv.tokenizer import find_neox_tokenizer

            found = find_neox_tokenizer(side.ckpt.info.get("neox_args") or {}, side.ckpt.info["path"])
            if found is not None and found.suffix == ".json":
                from tokenizers import Tokenizer

                ids = Tokenizer.from_file(str(found)).encode(text, add_special_tokens=False).ids
                return torch.tensor([ids], dtype=torch.long), str(found)
    raise NeoxconvError("--text needs a tokenizer: neither side has one (an HF directory's tokenizer files, or a "
                        "NeoX HFTokenizer vocab-file); use random tokens instead (--tokens/--batch/--seed)")


def _config_differences(a: _Side, b: _Side) -> dict[str, list]:
    diffs = {}
    for f in NUMERIC_FIELDS:
        va, vb = getattr(a.spec, f), getattr(b.spec, f)
        same = (math.isclose(va, vb, rel_tol=1e-6) if isinstance(va, float) and isinstance(vb, float)
                and not isinstance(va, bool) else va == vb)
        if not same:
            diffs[f] = [va, vb]
    return diffs


def run_parity(a, b, *, tokens: int = 64, batch: int = 2, seed: int = 0, text: str | None = None,
               dtype: str = "fp32", device: str = "cpu", atol: float | None = None, rtol: float | None = None,
               config_files=None, config_files_b=None, arch: str | None = None, qkv_layout: str | None = None,
               qkv_layout_b: str | None = None, replicated: str = "own") -> ParityReport:
    """Compare checkpoint ``b`` (candidate) with ``a`` (reference) on one token batch.

    ``config_files`` are NeoX YAMLs for A (default: A's own configs/), ``config_files_b`` for B;
    ``qkv_layout`` declares the GQA layout of A if A is NeoX, ``qkv_layout_b`` that of B (each
    side's default: the layout neoxconv recorded in its ``neoxconv.json``, else gqa_blocked; a
    NeoX -> NeoX layout migration has different layouts on the two sides). Verdict "fail" if the logits differ beyond tolerance OR a numerics config field
    differs (``info["reasons"]`` lists why; ``info["logits_verdict"]`` is the logits alone).
    """
    if tokens < 1 or batch < 1:
        raise NeoxconvError("--tokens and --batch must be at least 1")
    if replicated not in ("own", "mean"):
        raise NeoxconvError(f"--replicated must be own or mean, got {replicated!r}")
    dt, dev = _torch_dtype(dtype), _device(device)
    side_a = _Side(a, config_files, arch, qkv_layout)
    side_b = _Side(b, config_files_b, arch, qkv_layout_b)
    vocab = min(side_a.real_vocab, side_b.real_vocab)
    if text is not None:
        ids, tok_from = _text_tokens(text, [side_a, side_b])
        if ids.numel() == 0:
            raise NeoxconvError("--text encodes to no tokens")
        if int(ids.max()) >= vocab:
            raise NeoxconvError(f"--text gives token id {int(ids.max())}, outside the shared real vocabulary {vocab}")
        batch_info = {"source": "text", "tokenizer": tok_from, "batch": 1, "tokens": ids.shape[1]}
    else:
        ids = make_batch(vocab, batch, tokens, seed)
        batch_info = {"source": "random", "batch": batch, "tokens": tokens, "seed": seed}
    batch_info["id_range"] = [0, vocab]
    notes: list[str] = []
    if atol is None and rtol is None and dt == torch.float32:
        stored = max((side_a.spec.dtype, side_b.spec.dtype), key=lambda d: _PRECISION.get(d, 0))
        if stored != "float32" and side_a.spec.dtype != side_b.spec.dtype:
            atol, rtol = default_tolerance(stored)
            notes.append(f"weights are stored as {side_a.spec.dtype} (A) and {side_b.spec.dtype} (B): rounding them is "
                         f"a {stored}-level change even in fp32 compute, so the {stored} tolerances are used")
    logits_a = side_a.logits(ids, dt, dev, replicated)
    logits_b = side_b.logits(ids, dt, dev, replicated)
    diffs = _config_differences(side_a, side_b)
    backend = (f"torch.distributed ({os.environ['WORLD_SIZE']} processes)" if launched_by_torchrun()
               else "simulated ranks (one process)")
    info = {"a": side_a.summary(), "b": side_b.summary(), "batch": batch_info, "replicated": replicated,
            "neox_backend": backend,
            "config_check": {"verdict": "fail" if diffs else "pass", "fields": list(NUMERIC_FIELDS),
                             "differences": diffs}}
    report = compare_logits(logits_b, logits_a, vocab, dt, atol, rtol, info)
    reasons = []
    if not report.passed:
        reasons.append(f"logits differ beyond tolerance: max |Δ| {report.max_abs_diff:.3g} "
                       f"(atol {report.atol:g}, rtol {report.rtol:g})" if report.nonfinite == 0
                       else f"{report.nonfinite} non-finite logits")
    reasons += [f"config differs: {f} = {va!r} (A) vs {vb!r} (B)" for f, (va, vb) in diffs.items()]
    report.info.update(logits_verdict=report.verdict, reasons=reasons, notes=notes + side_a.notes + side_b.notes)
    report.verdict = "fail" if reasons else "pass"
    return report


# ------------------------------------------------------------------------------------------
# rendering and --verify


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


def failed_dir(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + FAILED_SUFFIX)


def check_verify_target(out: Path) -> None:
    """Before converting: OUT.parity-failed may only be replaced if it is ours (has a report)."""
    failed = failed_dir(out)
    if failed.exists() and not (failed / REPORT_NAME).is_file():
        raise NeoxconvError(f"{failed}: exists and is not a neoxconv parity-failed output; move it away first "
                            "(--verify puts a failed output there)")


def verifier(src: Path, out: Path, *, to: str, config_files=None, family: str | None = None,
             qkv_layout: str | None = None, force: bool = False, console=None) -> Callable[[Path, dict], None]:
    """The ``after_write`` hook of ``--verify``: parity between ``src`` and the finished temp dir.

    ``qkv_layout`` is the conversion's ``--qkv-layout``: the SOURCE's layout (side A) when the
    source is NeoX; the output (side B) is read with the layout its writer recorded in its
    ``neoxconv.json`` (``--out-qkv-layout`` for a NeoX -> NeoX migration), never with A's.

    Pass: ``parity-report.json`` is written inside the output (and, for HF outputs, the report
    joins the model card's provenance); the output then lands at ``out`` as usual.
    Fail: the report is written inside the output, the output is renamed to
    ``OUT.parity-failed`` (replacing an earlier one), nothing is written to ``out``: an existing
    ``out`` (that --force was to replace) is left untouched, and :class:`ParityFailure` (exit 1)
    is raised.
    """
    check_verify_target(out)

    def after_write(tmp: Path, result: dict) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        # A conversion can only hold the mean of norm copies that drifted across NeoX ranks, so
        # --verify checks the conversion against that ("mean"); the drift itself is reported in
        # the notes and measured by `neoxconv parity` (default "own").
        from neoxconv import graph

        src_layout = qkv_layout if graph.detect(Path(src)) == "neox" else None
        report = run_parity(src, tmp, config_files=config_files, arch=family, qkv_layout=src_layout,
                            replicated="mean")
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
    try:
        from neoxconv.modelcard import write_model_card
    except ImportError:  # pragma: no cover - the publishing module is optional
        return
    prov = dict(result.get("provenance") or {})
    prov["parity"] = {k: v for k, v in report.to_dict().items() if k != "info"} | {
        "config_check": report.info["config_check"]["verdict"], "report_file": REPORT_NAME}
    write_model_card(tmp, prov, force=True)
    result["provenance"] = prov
