"""Small numeric building blocks shared by the reference forwards (NeoX and Meta semantics)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "alibi_bias",
    "alibi_slopes",
    "local_mask",
    "rotary_cos_sin",
    "apply_rotate_half",
    "apply_interleaved_rotary",
    "causal_mask",
    "attention",
    "layer_norm",
    "rms_norm_neox",
    "rms_norm_neox_legacy",
    "scale_norm",
    "sinusoidal_positions",
    "gelu_tanh_neox",
    "gelu_onnx_neox",
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


def local_mask(seq_len: int, block: int, layout: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [heads, s, s]: key j is in a block that DeepSpeed's block layout [heads, nb, nb]
    lets query i's block attend (sparse attention computes only those blocks)."""
    blocks = torch.arange(seq_len, device=device) // block
    layout = layout.to(device).bool()
    return layout[:, blocks[:, None], blocks[None, :]]


def alibi_slopes(n: int) -> list[float]:
    """ALiBi head slopes (NX positional_embeddings.py AliBi._get_slopes): for n a power of two
    start^(i+1) with start = 2^(-2^-(log2 n - 3)); otherwise the closest lower power of two's
    slopes, then every other slope of twice that many, as many as are missing."""

    def power_of_2(k: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(k) - 3)))
        return [start * start**i for i in range(k)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    p = 2 ** math.floor(math.log2(n))
    return power_of_2(p) + alibi_slopes(2 * p)[0::2][: n - p]


def alibi_bias(seq_len: int, slopes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """NeoX AliBi.forward's bias [heads, s, s]: -(i - j) for j <= i (0 above the diagonal) in
    ``dtype``, times the slopes cast to ``dtype``."""
    i = torch.arange(seq_len, device=slopes.device)
    distance = -torch.tril(i[:, None] - i[None, :])
    return distance.to(dtype) * slopes.to(dtype).view(-1, 1, 1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention, q/k/v [b, heads, s, d] (k/v already expanded to q's heads).

    Scores in the compute dtype scaled by 1/sqrt(d) (NeoX ``baddbmm(alpha=1/norm_factor)``),
    plus ``bias`` (ALiBi) in the compute dtype, masked, softmax in fp32, probabilities cast back,
    times V."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if bias is not None:
        scores = scores + bias
    scores = scores.float().masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               dims: int = 1) -> torch.Tensor:
    """torch LayerNorm over the last ``dims`` dims (NeoX ``norm: layernorm``; without weight and
    bias ``non_parametric_layernorm``; ``dims=2``: the QK-norm over [heads per rank, head dim])."""
    return F.layer_norm(x, tuple(x.shape[-dims:]), weight, bias, eps)


def rms_norm_neox(x: torch.Tensor, scale: torch.Tensor, eps: float, dims: int = 1) -> torch.Tensor:
    """Current NeoX RMSNorm (since 2025-05, #1345): fp32 x·rsqrt(mean(x²)+eps)·scale, cast back.
    Mean over the last dim; ``dims=2``: over the last two (apex's fused RMSNorm of shape [np, d])."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(tuple(range(-dims, 0)), keepdim=True) + eps)
    return (scale * normed).to(x.dtype)


def scale_norm(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """NeoX ScaleNorm: x / clamp(‖x‖₂ over the last dim, min=eps) · g (one scalar g), in x's dtype."""
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps) * g


def sinusoidal_positions(seq_len: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """NeoX SinusoidalPositionalEmbedding [s, h]: t = arange(s) in inv_freq's dtype, angles
    t ⊗ inv_freq, [sin, cos] concatenated, all in that dtype."""
    t = torch.arange(seq_len, device=inv_freq.device).type_as(inv_freq)
    angles = torch.einsum("i,j->ij", t, inv_freq)
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def rms_norm_neox_legacy(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """NeoX RMSNorm before 2025-05: x / (‖x‖/sqrt(d) + eps) · scale, in the input dtype (T17)."""
    rms = x.norm(2, dim=-1, keepdim=True) * x.shape[-1] ** -0.5
    return (scale * (x / (rms + eps))).to(x.dtype)


def gelu_tanh_neox(x: torch.Tensor) -> torch.Tensor:
    """NeoX ``bias_gelu`` (bias_gelu_fusion: true): the tanh approximation with NeoX's constants."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def gelu_onnx_neox(x: torch.Tensor) -> torch.Tensor:
    """NeoX ``erf_gelu`` (``onnx_safe: true``): x·0.5·(erf(x / 1.41421) + 1) (1.41421, not √2)."""
    return x * 0.5 * (torch.erf(x / 1.41421) + 1.0)


def activation_fn(name: str, bias_gelu_fusion: bool = False, onnx_safe: bool = False):
    """Elementwise activation by NeoX name (NX ``megatron/model/activations.py``)."""
    if name == "gelu":
        return gelu_tanh_neox if bias_gelu_fusion else gelu_onnx_neox if onnx_safe else F.gelu
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
