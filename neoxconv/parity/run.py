"""`neoxconv parity A B`: the logits of two checkpoints on one batch, and their numerics configs.

A is the reference, B the candidate: ``|B - A| <= atol + rtol·|A|`` at every position over the
real vocabulary (the smaller tokenizer size of the two; padding rows are excluded), default
tolerances per dtype from :data:`neoxconv.reference.DEFAULT_TOLERANCES`.

Logits cannot see every config error (an RMSNorm eps 100x off moves logits ~4e-5, below fp32
noise bounds), so the report ALSO compares the numerics fields of both sides' ModelSpecs
(:data:`.sides.NUMERIC_FIELDS`) and fails with a reason naming each field that differs.

Replicated copies (norms, sequential-residual row biases) that differ across NeoX ranks: the
NeoX side uses each rank's own copy by default (``replicated="own"``), because that is what
NeoX computes and therefore what a conversion must reproduce; an HF export can only hold their
mean, so such a checkpoint fails by the size of that gap, and the report says how large the
drift is. ``replicated="mean"`` makes the reference use exactly what a merged export holds (the
mean of the copies and the sum of gpt-j row-bias parts, rounded to the stored dtype) to check the
layout alone; ``--verify`` uses it.

The NeoX reference computes NeoX's sliding window (W+1 keys on global layers through the training
mask, on flash layers through ``window_size=(W, -1)``), so NeoX ``sliding_window_width`` W must
face HF ``sliding_window`` W+1. ``window_dropped`` compares a model with the same model exported
without its window (``--drop-sliding-window``): on at most W+1 tokens, which the window never cuts,
so both compute the same function, and the missing window is not counted as a config difference.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from neoxconv.errors import NeoxconvError
from neoxconv.reference import ParityReport, compare_logits, default_tolerance, make_batch
from neoxconv.reference.parity import canonical_dtype

from .sides import NUMERIC_FIELDS, Side, launched_by_torchrun, open_side

__all__ = ["logits_for", "run_parity"]

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


def _torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return getattr(torch, canonical_dtype(name))
    except ValueError as e:
        raise NeoxconvError(f"--dtype: {e}") from None


def logits_for(path, tokens: torch.Tensor, *, dtype="fp32", device="cpu", config_files=None, arch: str | None = None,
               qkv_layout: str | None = None, replicated: str = "own") -> torch.Tensor:
    """fp32 logits [b, s, vocab rows] of any checkpoint for ``tokens`` [b, s] (see .sides)."""
    side = open_side(path, config_files, arch, qkv_layout)
    return side.logits(tokens, _torch_dtype(dtype), _device(str(device)), replicated)


def _text_tokens(text: str, sides: list[Side]) -> tuple[torch.Tensor, str]:
    for side in sides:
        if side.fmt == "hf" and any((side.path / n).is_file() for n in ("tokenizer.json", "tokenizer.model",
                                                                         "tokenizer_config.json")):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(side.path, local_files_only=True)
            return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]], dtype=torch.long), str(side.path)
        if side.fmt == "neox":
            from neoxconv.tokenizer import find_neox_tokenizer

            found = find_neox_tokenizer(side.info.get("neox_args") or {}, side.info["path"])
            if found is not None and found.suffix == ".json":
                from tokenizers import Tokenizer

                ids = Tokenizer.from_file(str(found)).encode(text, add_special_tokens=False).ids
                return torch.tensor([ids], dtype=torch.long), str(found)
    raise NeoxconvError("--text needs a tokenizer: neither side has one (an HF directory's tokenizer files, or a "
                        "NeoX HFTokenizer vocab-file); use random tokens instead (--tokens/--batch/--seed)")


def _config_differences(a: Side, b: Side, skip: tuple[str, ...] = ()) -> dict[str, list]:
    diffs = {}
    for f in NUMERIC_FIELDS:
        if f in skip:
            continue
        va, vb = getattr(a.spec, f), getattr(b.spec, f)
        same = (math.isclose(va, vb, rel_tol=1e-6) if isinstance(va, float) and isinstance(vb, float)
                and not isinstance(va, bool) else va == vb)
        if not same:
            diffs[f] = [va, vb]
    return diffs


def _window_length(a: Side, b: Side, notes: list[str]) -> int:
    """The longest sequence on which B = A without its window computes what A computes: A's window keys."""
    from neoxconv.window import terms

    keys = a.spec.sliding_window
    if not keys or b.spec.sliding_window:
        def say(k):
            return terms(k) if k else "no window"

        raise NeoxconvError(f"--window-dropped needs A with a sliding window and B without one (A: "
                            f"{say(keys)}; B: {say(b.spec.sliding_window)})")
    notes.append(f"B is A without its sliding window ({terms(keys)}): compared on sequences of at most {keys} tokens, "
                 "which the window never cuts, so both compute the same function; beyond, they differ")
    return keys


def run_parity(a, b, *, tokens: int = 64, batch: int = 2, seed: int = 0, text: str | None = None,
               dtype: str = "fp32", device: str = "cpu", atol: float | None = None, rtol: float | None = None,
               config_files=None, config_files_b=None, arch: str | None = None, qkv_layout: str | None = None,
               qkv_layout_b: str | None = None, replicated: str = "own", window_dropped: bool = False,
               progress: Callable[[str, int, int], None] | None = None) -> ParityReport:
    """Compare checkpoint ``b`` (candidate) with ``a`` (reference) on one token batch.

    ``config_files`` are NeoX YAMLs for A (default: A's own configs/), ``config_files_b`` for B;
    ``qkv_layout`` declares the GQA layout of A if A is NeoX, ``qkv_layout_b`` that of B (each
    side's default: the layout neoxconv recorded in its ``neoxconv.json``, else NeoX's history; a
    NeoX -> NeoX layout migration has different layouts on the two sides). Verdict "fail" if the
    logits differ beyond tolerance OR a numerics config field differs (``info["reasons"]`` lists
    why; ``info["logits_verdict"]`` is the logits alone). ``window_dropped``: B is A without A's
    sliding window; the batch is cut to the window's length (see the module doc). ``progress(label,
    done, total)``: layer groups run of each side's forward ("A (neox)", then "B (hf)").
    """
    if tokens < 1 or batch < 1:
        raise NeoxconvError("--tokens and --batch must be at least 1")
    if replicated not in ("own", "mean"):
        raise NeoxconvError(f"--replicated must be own or mean, got {replicated!r}")
    dt, dev = _torch_dtype(dtype), _device(device)
    side_a = open_side(a, config_files, arch, qkv_layout)
    side_b = open_side(b, config_files_b, arch, qkv_layout_b)
    vocab = min(side_a.real_vocab, side_b.real_vocab)
    notes: list[str] = []
    limit = _window_length(side_a, side_b, notes) if window_dropped else None
    longest = min(s.spec.max_positions - s.spec.position_offset for s in (side_a, side_b))
    if text is None and tokens > longest:  # a learned table / local block layout ends there
        notes.append(f"compared on {longest} tokens, the longest sequence the models take (max positions)")
        tokens = longest
    if limit is not None and text is None:
        tokens = min(tokens, limit)
    if text is not None:
        ids, tok_from = _text_tokens(text, [side_a, side_b])
        if ids.numel() == 0:
            raise NeoxconvError("--text encodes to no tokens")
        if limit is not None and ids.shape[1] > limit:
            raise NeoxconvError(f"--text gives {ids.shape[1]} tokens; with the window dropped only sequences of at "
                                f"most {limit} tokens compute the same function")
        if int(ids.max()) >= vocab:
            raise NeoxconvError(f"--text gives token id {int(ids.max())}, outside the shared real vocabulary {vocab}")
        batch_info = {"source": "text", "tokenizer": tok_from, "batch": 1, "tokens": ids.shape[1]}
    else:
        ids = make_batch(vocab, batch, tokens, seed)
        batch_info = {"source": "random", "batch": batch, "tokens": tokens, "seed": seed}
    batch_info["id_range"] = [0, vocab]
    if atol is None and rtol is None and dt == torch.float32:
        stored = max((side_a.spec.dtype, side_b.spec.dtype), key=lambda d: _PRECISION.get(d, 0))
        if stored != "float32" and side_a.spec.dtype != side_b.spec.dtype:
            atol, rtol = default_tolerance(stored)
            notes.append(f"weights are stored as {side_a.spec.dtype} (A) and {side_b.spec.dtype} (B): rounding them is "
                         f"a {stored}-level change even in fp32 compute, so the {stored} tolerances are used")
    def on(label: str, side: Side):
        return None if progress is None else lambda done, total: progress(f"{label} ({side.fmt})", done, total)

    logits_a = side_a.logits(ids, dt, dev, replicated, on("A", side_a))
    logits_b = side_b.logits(ids, dt, dev, replicated, on("B", side_b))
    diffs = _config_differences(side_a, side_b, ("sliding_window",) if window_dropped else ())
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
