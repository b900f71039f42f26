"""Options of ``neoxconv train-check`` and its tolerances; every check that can run before any
process starts (exit 2 on bad input)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from neoxconv.errors import NeoxconvError
from neoxconv.reference.parity import canonical_dtype

__all__ = ["DEVICES", "OPTIMIZERS", "TOLERANCES", "TrainCheckOptions"]

#: Per compute dtype. fp32: both sides run the same fp32 weights; what remains is summation order
#: (TP partial sums, vocab-parallel softmax, fused vs split projections). Measured on the tiny test
#: models (2 layers, TP 2 and 4, SGD and AdamW, 2-3 steps): loss |Δ| <= 1e-6, gradient relative
#: error <= 1e-5, update error <= 2e-4. (1e-5, 1e-4, 1e-3) keeps a 10x margin and still fails
#: every layout or bias-rule error tried (gradient errors >= 0.5, see tests/test_train.py).
#: fp16/bf16 (fp32 master weights on both sides) measured fp16 <= (1.1e-4, 6.2e-3, 6.9e-3) and
#: bf16 <= (6e-4, 4e-2, 2.3e-2); the tolerances below are ~5-20x that. They are smoke tests whose
#: noise grows with depth (docs/training.md): prove conversions in fp32.
TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"loss_abs": 1e-5, "grad_rel": 1e-4, "update_rel": 1e-3},
    "float16": {"loss_abs": 2e-3, "grad_rel": 5e-2, "update_rel": 5e-2},
    "bfloat16": {"loss_abs": 1e-2, "grad_rel": 2e-1, "update_rel": 2e-1},
}
OPTIMIZERS = ("sgd", "adamw")
DEVICES = ("cpu", "cuda")


@dataclass
class TrainCheckOptions:
    ckpt: Path
    hf: Path | None = None
    steps: int = 1
    lr: float = 1e-3
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    batch: int = 2
    tokens: int = 64
    seed: int = 0
    dtype: str = "fp32"
    device: str = "cpu"
    save: Path | None = None
    config_files: tuple[Path, ...] = ()
    qkv_layout: str | None = None
    trust_pickle: bool = False
    #: how to step the additive bias parts of gpt_j_residual models: "logical" (the summed bias
    #: takes the single-device step, = HF) or "neox" (each part stepped as a whole bias, what NeoX
    #: does: p times the step at TP=p; the update check then fails). See .train.make_optimizer.
    partial_bias_step: str = "logical"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, canonical_dtype(self.dtype))

    def validate(self) -> None:
        """Everything that can be checked before starting processes (exit 2 on bad input)."""
        from neoxconv.formats.hf import is_hf_dir
        from neoxconv.formats.neox_files import resolve_tag_dir
        from neoxconv.fusing import QKV_LAYOUTS

        tag_dir = resolve_tag_dir(Path(self.ckpt))
        if self.hf is not None and not is_hf_dir(Path(self.hf)):
            raise NeoxconvError(f"--hf {self.hf}: not a Hugging Face model directory (config.json + weights)")
        for name, value, low in (("--steps", self.steps, 1), ("--batch", self.batch, 1), ("--tokens", self.tokens, 2)):
            if int(value) < low:
                raise NeoxconvError(f"{name} must be at least {low}, got {value}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise NeoxconvError(f"--lr must be a positive number, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise NeoxconvError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise NeoxconvError(f"unknown --optimizer {self.optimizer!r} (use {' or '.join(OPTIMIZERS)})")
        try:
            canonical_dtype(self.dtype)
        except ValueError:
            raise NeoxconvError(f"unknown --dtype {self.dtype!r} (use fp32, fp16 or bf16)") from None
        if self.device not in DEVICES:
            raise NeoxconvError(f"unknown --device {self.device!r} (use cpu or cuda)")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise NeoxconvError("--device cuda: CUDA is not available on this machine (use --device cpu)")
        if self.partial_bias_step not in ("logical", "neox"):
            raise NeoxconvError(f"partial_bias_step must be 'logical' or 'neox', got {self.partial_bias_step!r}")
        if self.qkv_layout is not None and self.qkv_layout not in QKV_LAYOUTS:
            raise NeoxconvError(f"unknown --qkv-layout {self.qkv_layout!r} (known: {', '.join(QKV_LAYOUTS)})")
        for f in self.config_files:
            if not Path(f).is_file():
                raise NeoxconvError(f"--config {f}: file not found")
        if self.save is not None:
            out = Path(self.save)
            if out.exists():
                raise NeoxconvError(f"--save {out}: already exists (choose a new directory)")
            src = tag_dir.resolve()
            if out.resolve() == src or src in out.resolve().parents:
                raise NeoxconvError(f"--save {out}: must not be inside the source checkpoint")
