"""Check that exports written with transformers 5 load identically in transformers 4.x.

neoxconv writes config.json for both generations (rope settings nested for 5.x and top-level
for 4.x, `embed_out.weight` for GPTNeoX). transformers 4.x cannot be installed beside 5.x in the
test environment, so this is a two-step check with two environments:

    python tools/transformers4_compat.py make DIR      # with neoxconv + transformers 5.x
    python tools/transformers4_compat.py load DIR      # with torch + safetensors + transformers 4.x

`make` builds tiny seeded models (GPTNeoX parallel/sequential residual, tied, gelu_new; Llama
GQA with rope_theta 500000; Mistral with and without a window; the custom-code export), converts
each HF -> NeoX (TP 2) -> HF, and stores the source model's logits. `load` loads every export with
the installed transformers (custom code with trust_remote_code) and prints max |logits - source
logits|, and for the custom code also checks that greedy generate() with the KV cache equals it
without; any difference above 1e-5 or a differing generation exits 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

CASES = {
    "gptneox_parallel": dict(family="gptneox", rotary_pct=0.5, rotary_emb_base=5000, use_parallel_residual=True),
    "gptneox_sequential_tied_gelu_new": dict(family="gptneox", rotary_pct=0.25, use_parallel_residual=False,
                                             attention_bias=False, tie_word_embeddings=True, hidden_act="gelu_new"),
    "llama_gqa_theta500k": dict(family="llama", num_attention_heads=8, num_key_value_heads=2, hidden_size=64,
                                rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "mistral_window": dict(family="mistral", num_key_value_heads=2, sliding_window=6),
    "mistral_no_window": dict(family="mistral", num_key_value_heads=2, sliding_window=None),
    # neoxconv's custom-code export (ScaleNorm, ALiBi, ReGLU, parallel residual, a local layer)
    "custom_code": dict(family="custom"),
}


def make(root: Path) -> None:
    from neoxconv.convert import convert
    from neoxconv.tiny import logits, tiny_hf_model

    root.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(0, 90, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.save(ids, root / "ids.pt")
    for name, kw in CASES.items():
        kw = dict(kw)
        model = tiny_hf_model(kw.pop("family"), seed=1, **kw)
        model.save_pretrained(root / f"{name}.src")
        convert(root / f"{name}.src", root / f"{name}.neox", to="neox", tp=2, force=True)
        convert(root / f"{name}.neox", root / f"{name}.hf", to="hf", force=True)
        torch.save(logits(model, ids), root / f"{name}.logits.pt")
        print("made", name)


def load(root: Path) -> int:
    import transformers
    from transformers import AutoModelForCausalLM

    ids = torch.load(root / "ids.pt")
    worst = 0.0
    for name in CASES:
        custom = CASES[name]["family"] == "custom"
        model = AutoModelForCausalLM.from_pretrained(root / f"{name}.hf", attn_implementation="eager",
                                                     trust_remote_code=custom).eval()
        with torch.no_grad():
            out = model(ids).logits.float()
        ref = torch.load(root / f"{name}.logits.pt")
        diff = (out[..., : ref.shape[-1]] - ref).abs().max().item()
        worst = max(worst, diff)
        print(f"transformers {transformers.__version__}  {name:34s} {type(model).__name__:20s} max|Δ| = {diff:.3g}")
        if custom:
            prompt = ids[:, :6]
            runs = [model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                   do_sample=False, use_cache=c, pad_token_id=0) for c in (True, False)]
            same = torch.equal(*runs)
            print(f"{'':40s} generate() with and without KV cache: {'equal' if same else 'DIFFERENT'}")
            worst = worst if same else float("inf")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("make", "load"):
        raise SystemExit(__doc__)
    sys.exit(make(Path(sys.argv[2])) if sys.argv[1] == "make" else load(Path(sys.argv[2])))
