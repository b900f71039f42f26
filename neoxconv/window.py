"""The sliding window in the user's own terms, the way out when no Hugging Face class holds it, and
what a NeoX config says about whether training applied it.

Terms: NeoX `sliding_window_width` W lets a token attend to itself and the W tokens before it
(W + 1 keys, on global and flash layers alike); the canonical form (ModelSpec.sliding_window) and
Hugging Face count the keys, W + 1. A sequence of at most W + 1 tokens never reaches the window,
so a model without it computes the same logits on such sequences (tests/test_window.py checks
this on the reference forward: identical at W + 1 tokens, different at W + 2).

The ways out: HF Mistral is the only stock class with a window, and it has no biases; HF Llama has
biases but no window; GPTNeoX neither. A model that Mistral cannot hold (GPT-NeoX's own
configs/mistral/7B.yml leaves `use_bias_in_mlp` true) exports as neoxconv's custom code
(`--arch custom`, chosen by itself when no stock class holds the model), which implements the
window exactly; `--drop-sliding-window` instead exports it to a stock class without the window,
which is exact up to that length.
"""

from __future__ import annotations

from neoxconv.errors import NeoxconvError
from neoxconv.spec import ModelSpec


def terms(keys: int) -> str:
    """A window of `keys` keys as NeoX and HF say it."""
    return f"NeoX sliding_window_width {keys - 1}, i.e. HF sliding_window {keys}"


def exact_up_to(keys: int) -> str:
    return (f"its logits are identical for sequences of at most {keys} tokens (sliding_window_width {keys - 1} "
            "+ 1, prompt and generated tokens together) and differ beyond")


def mistral_refusal(spec: ModelSpec) -> str | None:
    """Why HF Mistral, the one stock class with a window, cannot hold this model (window aside)."""
    if spec.norm != "rmsnorm" or spec.activation != "swiglu":
        return f"needs RMSNorm and a SwiGLU MLP (this model: {spec.norm}, {spec.activation})"
    if spec.position != "rotary" or spec.qk_norm or spec.local_layers:
        return "has rotary positions, dense attention and no QK-norm (this model is a custom GPT-NeoX one)"
    if spec.rotary_pct != 1.0:
        return f"rotates whole heads (this model: rotary_pct {spec.rotary_pct})"
    if spec.parallel_residual:
        return "has no parallel (GPT-J) residual"
    biases = " and ".join(what for what, has in (("attention", spec.attn_bias), ("MLP", spec.mlp_bias)) if has)
    return f"has no {biases} biases" if biases else None


def way_out(spec: ModelSpec, cls: str) -> str:
    """Why HF class `cls` refuses a model with a sliding window, and what to do instead."""
    keys = spec.sliding_window
    why = mistral_refusal(spec)
    if why is None:
        return (f"HF {cls} has no sliding-window attention ({terms(keys)}): export as mistral (--arch mistral) or "
                f"custom (--arch custom), or pass --drop-sliding-window to export without the window "
                f"({exact_up_to(keys)})")
    lead = (f"HF Mistral, the only stock class with a sliding window ({terms(keys)}), {why}" if cls == "Mistral" else
            f"HF {cls} has no sliding-window attention ({terms(keys)}), and HF Mistral, the only stock class with "
            f"one, {why}")
    return (f"{lead}: export as custom (--arch custom; neoxconv's own code implements the window), or pass "
            f"--drop-sliding-window to export it without the window (as {_family_without(spec)}; "
            f"{exact_up_to(keys)})")


def _family_without(spec: ModelSpec) -> str:
    from neoxconv import archs

    return archs.family_for(spec.replace(sliding_window=None))


def drop(spec: ModelSpec, family: str | None) -> tuple[ModelSpec, str]:
    """--drop-sliding-window: the spec without its window (family: `family`, else the first that holds
    the window-less model) and the warning that says up to which length nothing changes."""
    keys = spec.sliding_window
    if not keys:
        raise NeoxconvError("--drop-sliding-window: the model has no sliding window")
    out = spec.replace(sliding_window=None, family=family or _family_without(spec))
    return out, (f"WARNING: --drop-sliding-window: the export attends to all earlier tokens, while the model was "
                 f"trained with a sliding window ({terms(keys)}): {exact_up_to(keys)}")


def fused_softmax_warning(args: dict, layers: int, stored_dtype: str, keys: int | None) -> str | None:
    """NeoX's fused causal softmax (`scaled_upper_triang_masked_softmax_fusion`) applies its own causal
    triangle and ignores the attention mask whenever its kernel runs (megatron/model/fused_softmax.py
    is_kernel_available: fp16/bf16, 16 < sequence length <= 2048, sequence length and micro-batch x
    heads per TP rank divisible by 4). On global layers the window lives only in that mask, so such a
    run may have trained without it. Flash layers take the window from flash-attn and are not
    affected. None when the config rules the kernel out."""
    from neoxconv.formats.neox_spec import attention_types

    if not keys or not args.get("scaled_upper_triang_masked_softmax_fusion"):
        return None
    if "global" not in attention_types(args, layers):
        return None
    precision = args.get("precision") or next(
        (p for p, key in (("fp16", "fp16"), ("bfloat16", "bf16"))
         if isinstance(args.get(key), dict) and args[key].get("enabled")), None)
    if precision not in ("fp16", "bfloat16") and stored_dtype not in ("float16", "bfloat16"):
        return None  # fp32 training: the kernel never runs
    seq = args.get("seq_length")
    if isinstance(seq, int) and not (16 < seq <= 2048 and seq % 4 == 0):
        return None  # training sequences the kernel refuses
    return (f"WARNING: scaled_upper_triang_masked_softmax_fusion with {precision or stored_dtype} training: NeoX's "
            "fused causal softmax ignores the attention mask on global attention layers whenever its kernel runs "
            f"(16 < sequence length <= 2048{'' if seq is None else f', here {seq}'}; sequence length and micro-batch "
            f"x heads per TP rank divisible by 4), so the sliding window ({terms(keys)}) may not have been applied "
            "in training; the export applies it as NeoX's attention mask defines it")
