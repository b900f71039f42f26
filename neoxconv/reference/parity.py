"""Logit parity: compare two logit tensors and record the verdict in a JSON-able report.

Rule: over **all** positions and the first ``real_vocab`` columns (padding rows of the vocab are
excluded: they are zero rows whose logits carry no information, and HF may have fewer of them),
``pass`` iff ``|a - b| <= atol + rtol·|b|`` everywhere (``b`` is the reference side) and no
value is NaN/inf. The default tolerances per dtype are :data:`DEFAULT_TOLERANCES`; the
justification is in ``docs/parity-tolerances.md``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = [
    "DEFAULT_TOLERANCES",
    "ParityReport",
    "canonical_dtype",
    "compare_logits",
    "default_tolerance",
    "make_batch",
]

#: (atol, rtol) on fp32 logits, keyed by the dtype both forwards *computed* in (not the stored
#: dtype: fp16/bf16 weights upcast to fp32 exactly, and fp32 compute is the tight check).
#: Both sides run the same weights in the same dtype, so what remains is rounding from another
#: summation order (TP partial sums, fused vs split projections, kernels). Measured on seeded
#: models up to 32 layers / hidden 2048 (docs/parity-tolerances.md): fp32 max |Δ| <= 3.3e-5;
#: fp16 <= 0.09; bf16 <= 0.86 -- in low precision as large as HF-in-fp16/bf16 vs HF-in-fp32,
#: i.e. the dtype's own noise, and nearly additive (rtol barely helps).
#: * fp32 (2e-4, 1e-4): ~6x the worst noise at small logits (+1e-4 relative for logits up to
#:   ~50) and still below the smallest semantic bug measured (tanh vs exact GELU, 1.1e-3).
#: * fp16 (0.25, 0.02): ~3x the worst noise; catches layout and bias bugs, not the GELU variant.
#: * bf16 (1.0, 0.05): ~1.2x the worst noise at 32 layers; catches layout bugs only. A deeper
#:   model may exceed it: bf16 verdicts are smoke tests, prove conversions in fp32.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (2e-4, 1e-4),
    "float16": (2.5e-1, 2e-2),
    "bfloat16": (1.0, 5e-2),
}

_DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def canonical_dtype(dtype: torch.dtype | str) -> str:
    """``torch.float16`` / ``"fp16"`` / ``"half"`` ... -> ``"float16"`` (one of the table keys)."""
    name = str(dtype).removeprefix("torch.").lower()
    try:
        return _DTYPE_ALIASES[name]
    except KeyError:
        raise ValueError(f"no parity tolerance for dtype {dtype!r}; expected fp32, fp16 or bf16") from None


def default_tolerance(dtype: torch.dtype | str) -> tuple[float, float]:
    """(atol, rtol) from :data:`DEFAULT_TOLERANCES`."""
    return DEFAULT_TOLERANCES[canonical_dtype(dtype)]


@dataclass
class ParityReport:
    """Result of one logit comparison. ``to_json()`` gives the machine-readable form."""

    max_abs_diff: float
    mean_abs_diff: float
    argmax_agreement: float  #: fraction of positions where both argmaxes agree
    positions: int  #: batch x sequence positions compared
    vocab: int  #: leading vocab columns compared (real vocab; padding excluded)
    atol: float
    rtol: float
    dtype: str
    verdict: str  #: "pass" | "fail"
    max_excess: float  #: max(|a-b| - (atol + rtol|b|)); <= 0 iff within tolerance
    worst: dict[str, int] = field(default_factory=dict)  #: location of the largest |a-b|
    nonfinite: int = 0  #: NaN/inf entries (in either tensor); any makes the verdict "fail"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), default=str, **kwargs)

    def summary(self) -> str:
        """One line for logs."""
        return (
            f"{self.verdict.upper()}: max|Δ|={self.max_abs_diff:.3g} mean|Δ|={self.mean_abs_diff:.3g} "
            f"argmax={self.argmax_agreement:.4f} over {self.positions} positions x {self.vocab} vocab "
            f"({self.dtype}, atol={self.atol:g}, rtol={self.rtol:g})"
        )


def compare_logits(
    a: torch.Tensor,
    b: torch.Tensor,
    real_vocab: int,
    dtype: torch.dtype | str,
    atol: float | None = None,
    rtol: float | None = None,
    info: dict[str, Any] | None = None,
) -> ParityReport:
    """Compare logits ``a`` (candidate, e.g. converted HF model) with ``b`` (reference).

    ``a`` and ``b`` are [..., vocab_a] / [..., vocab_b] with equal leading shapes and both
    vocab widths >= ``real_vocab``; only columns ``[:real_vocab]`` are compared. ``dtype`` is
    the dtype both forwards ran in and selects the default tolerances; ``atol``/``rtol``
    override them.
    """
    if a.shape[:-1] != b.shape[:-1]:
        raise ValueError(f"logit shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if real_vocab < 1 or real_vocab > min(a.shape[-1], b.shape[-1]):
        raise ValueError(f"real_vocab {real_vocab} outside 1..{min(a.shape[-1], b.shape[-1])}")
    name = canonical_dtype(dtype)
    d_atol, d_rtol = DEFAULT_TOLERANCES[name]
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)

    a = a[..., :real_vocab].detach().double().cpu()
    b = b[..., :real_vocab].detach().double().cpu()
    finite = torch.isfinite(a) & torch.isfinite(b)
    nonfinite = int((~finite).sum())
    diff = (a - b).abs()
    safe = torch.where(finite, diff, torch.zeros_like(diff))
    excess = torch.where(finite, diff - (atol + rtol * b.abs()), torch.full_like(diff, float("inf")))
    flat = int(torch.argmax(safe).item())
    lead = a.shape[:-1]
    worst_idx = list(torch.unravel_index(torch.tensor(flat), a.shape))
    worst = {f"dim{i}": int(v) for i, v in enumerate(worst_idx[:-1])}
    worst["vocab"] = int(worst_idx[-1])
    positions = int(torch.tensor(lead).prod().item()) if len(lead) else 1
    agree = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    max_excess = float(excess.max().item())
    verdict = "pass" if nonfinite == 0 and max_excess <= 0 else "fail"
    return ParityReport(
        max_abs_diff=float(safe.max().item()),
        mean_abs_diff=float(safe.mean().item()),
        argmax_agreement=float(agree),
        positions=positions,
        vocab=real_vocab,
        atol=atol,
        rtol=rtol,
        dtype=name,
        verdict=verdict,
        max_excess=max_excess,
        worst=worst,
        nonfinite=nonfinite,
        info=dict(info or {}),
    )


def make_batch(vocab: int, batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """A reproducible [batch, tokens] int64 batch of token ids uniform in ``[0, vocab)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, tokens), generator=g, dtype=torch.long)
