"""Small numeric building blocks shared by the reference forwards (NeoX and Meta semantics)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "rotary_cos_sin",
    "apply_rotate_half",
    "apply_interleaved_rotary",
    "causal_mask",
    "attention",
    "layer_norm",
    "rms_norm_neox",
    "rms_norm_neox_legacy",
    "gelu_tanh_neox",
    "activation_fn",
]


def rotary_cos_sin(
    seq_len: int, rot_dims: int, base: float, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX rotary tables [s, rot_dims]: inv_freq = 1/base^(2i/r), freqs duplicated as [f, f],
    cos/sin computed in fp32 then cast to the compute dtype (NX positional_embeddings.py; §4.4).
    A stored ``inv_freq`` buffer is never used (it may be in fp16/bf16)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dims, 2, device=device).float() / rot_dims))
    t = torch.arange(seq_len, device=device).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on the first ``cos.shape[-1]`` dims of x [..., s, d]; rest passes through."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


def apply_interleaved_rotary(x: torch.Tensor, theta: float, dtype: torch.dtype) -> torch.Tensor:
    """Meta Llama rotary (META llama/model.py ``apply_rotary_emb``): adjacent pairs
    (x_2i, x_2i+1) form one complex number multiplied by exp(i·t·f_i), f_i = theta^(-2i/d),
    computed in fp32 and cast back. x: [b, heads, s, d]."""
    d = x.shape[-1]
    s = x.shape[-2]
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device)[: d // 2].float() / d))
    angles = torch.outer(torch.arange(s, device=x.device).float(), freqs)  # [s, d/2]
    cos, sin = angles.cos(), angles.sin()
    xf = x.float().reshape(*x.shape[:-1], d // 2, 2)
    re, im = xf[..., 0], xf[..., 1]
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
    return out.flatten(-2).to(dtype)


def causal_mask(
    seq_len: int, window: int | None, convention: str, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean [s, s] mask, True where query i may attend key j.

    Causal always. With a sliding window W (neox-formats.md §2.3):

    * ``"hf"``: HF eager/sdpa (``kv_idx > q_idx - W``): itself and W-1 earlier keys (W keys).
    * ``"neox_flash"``: NeoX flash-attn ``window_size=(W, -1)``: itself and W earlier (W+1 keys).
    """
    i = torch.arange(seq_len, device=device).unsqueeze(1)
    j = torch.arange(seq_len, device=device).unsqueeze(0)
    allowed = j <= i
    if window is not None:
        if convention == "hf":
            allowed = allowed & (j > i - window)
        elif convention == "neox_flash":
            allowed = allowed & (j >= i - window)
        else:
            raise ValueError(f"unknown sliding-window convention {convention!r}")
    return allowed


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention, q/k/v [b, heads, s, d] (k/v already expanded to q's heads).

    Scores in the compute dtype scaled by 1/sqrt(d) (NeoX ``baddbmm(alpha=1/norm_factor)``),
    masked, softmax in fp32, probabilities cast back, times V."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.float().masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """torch LayerNorm (NeoX ``norm: layernorm``)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm_neox(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Current NeoX RMSNorm (since 2025-05, #1345): fp32 x·rsqrt(mean(x²)+eps)·scale, cast back."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (scale * normed).to(x.dtype)


def rms_norm_neox_legacy(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """NeoX RMSNorm before 2025-05: x / (‖x‖/sqrt(d) + eps) · scale, in the input dtype (T17)."""
    rms = x.norm(2, dim=-1, keepdim=True) * x.shape[-1] ** -0.5
    return (scale * (x / (rms + eps))).to(x.dtype)


def gelu_tanh_neox(x: torch.Tensor) -> torch.Tensor:
    """NeoX ``bias_gelu`` (bias_gelu_fusion: true): the tanh approximation with NeoX's constants."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def activation_fn(name: str, bias_gelu_fusion: bool = False):
    """Elementwise activation by NeoX name (NX ``megatron/model/activations.py``)."""
    if name == "gelu":
        return gelu_tanh_neox if bias_gelu_fusion else F.gelu
    table = {
        "relu": F.relu,
        "silu": F.silu,
        "swish": F.silu,  # NeoX swish(x, beta=1) = x * sigmoid(x)
        "softsign": F.softsign,
        "mish": lambda t: t * torch.tanh(F.softplus(t)),
        "sigmoid": torch.sigmoid,
        "identity": lambda t: t,
    }
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}") from None
