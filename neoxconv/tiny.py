"""Tiny seeded models for the demo, tests and benchmarks (no downloads)."""

from __future__ import annotations

import torch


def tiny_hf_config(family: str = "gptneox", **overrides):
    from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig

    if family == "custom":  # features no stock class has, each one TP-independent
        from neoxconv.custom.configuration_neox import NeoXCustomConfig
        from neoxconv.custom.export import ARCHITECTURE, AUTO_MAP

        base = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, intermediate_size=64,
                    max_position_embeddings=128, norm="scalenorm", norm_eps=1e-8, position_embedding="alibi",
                    activation="reglu", parallel_residual=True, attention_types=["local", "global"],
                    local_block_size=4, local_window_blocks=2, tie_word_embeddings=False, auto_map=AUTO_MAP,
                    architectures=[ARCHITECTURE])
        base.update(overrides)
        return NeoXCustomConfig(**base)
    if family == "gptneox":
        base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    rotary_pct=0.5, max_position_embeddings=128, use_parallel_residual=True, hidden_act="gelu",
                    tie_word_embeddings=False)
        base.update(overrides)
        return GPTNeoXConfig(**base)
    base = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                intermediate_size=48, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if family == "mistral":
        base["sliding_window"] = 8
    base.update(overrides)
    return (MistralConfig if family == "mistral" else LlamaConfig)(**base)


def tiny_hf_model(family: str = "gptneox", seed: int = 0, dtype=torch.float32, **overrides):
    """A randomly initialised (seeded) HF causal LM. Norms and biases are randomised too, so a
    mixed-up tensor cannot hide behind an all-ones or all-zeros init."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_config(family, **overrides)
    torch.manual_seed(seed)
    if family == "custom":  # neoxconv's own class; save_pretrained then copies its code files
        from neoxconv.custom.modeling_neox import NeoXCustomForCausalLM

        NeoXCustomForCausalLM.register_for_auto_class("AutoModelForCausalLM")
        model = NeoXCustomForCausalLM(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.to(dtype).eval()


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits.float()
