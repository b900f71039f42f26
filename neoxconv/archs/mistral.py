"""Mistral: HF MistralForCausalLM <-> canonical. Llama plus a sliding attention window.

Everything Mistral-specific:
- the tensors are Llama's (archs/llama.py TENSORS: names and TP roles);
- `sliding_window` W: a query sees itself and the W-1 keys before it (HF eager/sdpa masks).
  NeoX's `sliding_window_width` W' lets a query see W'+1 keys on every layer, so NeoX W' is
  HF W'+1 (formats/neox_spec.py, docs/design.md "Sliding window").
  A model without a window is written with `"sliding_window": null`; a config.json WITHOUT the
  key means HF's class default, 4096 (T12), so reading honours that default.
- no biases: HF's MistralAttention/MistralMLP are built with bias=False, so a model with
  attention or MLP biases must be exported as llama;
- HF defaults that differ from Llama's: num_key_value_heads 8 (taken from the tensors anyway),
  max_position_embeddings 4096*32.
"""

from __future__ import annotations

from neoxconv.archs.base import Arch
from neoxconv.archs.llama import FROM_HF_ACT, IGNORED, TENSORS, check_llama_like, common_config
from neoxconv.archs.llama import spec_from_config as llama_spec
from neoxconv.errors import NeoxconvError
from neoxconv.spec import ModelSpec
from neoxconv.window import way_out

HF_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096 * 32}
HF_DEFAULT_WINDOW = 4096


def spec_from_config(cfg: dict, shapes: dict[str, tuple]) -> ModelSpec:
    window = cfg["sliding_window"] if "sliding_window" in cfg else HF_DEFAULT_WINDOW
    return llama_spec(cfg, shapes, family="mistral", defaults=HF_DEFAULTS,
                      sliding_window=int(window) if window else None)


def config_from_spec(spec: ModelSpec) -> dict:
    check_llama_like(spec, "mistral")
    if spec.attn_bias or spec.mlp_bias:
        if spec.sliding_window:  # and Llama has no window: no stock class holds it
            raise NeoxconvError(way_out(spec, "Mistral"))
        raise NeoxconvError("HF Mistral has no attention or MLP biases; export this model as llama (--arch llama)")
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        **common_config(spec),
        "sliding_window": spec.sliding_window,  # None -> null: full causal attention
    }


ARCH = Arch(
    family="mistral",
    architecture="MistralForCausalLM",
    model_type="mistral",
    tensors=TENSORS,
    spec_from_config=spec_from_config,
    config_from_spec=config_from_spec,
    ignored=IGNORED,
    hf_activations=FROM_HF_ACT,
)
