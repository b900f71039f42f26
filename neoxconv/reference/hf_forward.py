"""Logits from a Hugging Face model directory (or an already loaded model) via transformers.

The model is run with **eager** attention (the plain masked-softmax path, closest to the
reference forward; sdpa/flash kernels add their own rounding and, for sliding windows, may use
other conventions), in eval mode, without cache, and the logits are returned in fp32.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["load_hf_model", "hf_logits", "hf_model_logits"]


def load_hf_model(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    """``AutoModelForCausalLM.from_pretrained`` (local files only) in ``dtype`` with eager attention."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        Path(model_dir), dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    return model.eval()


def hf_model_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits [b, s, vocab] of a loaded HF causal LM for ``tokens`` [b, s]."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=tokens.to(device), use_cache=False)
    return out.logits.float()


def hf_logits(
    model_dir: str | os.PathLike,
    tokens: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> torch.Tensor:
    """fp32 logits [b, s, vocab] of the HF model stored in ``model_dir`` (loaded in ``dtype``)."""
    return hf_model_logits(load_hf_model(model_dir, dtype, attn_implementation), tokens)
