"""`parity` streams: its memory is bounded by one layer group, not by the model (docs/parity.md).

A Llama of 8 layers, hidden 1024, stored in fp16 (a 190 MiB checkpoint, 380 MiB in fp32) is
compared in fp32 with its NeoX TP 2 conversion, in a fresh process. A thread samples the
process's anonymous RSS (/proc/self/status, memory the process owns; memory-mapped checkpoint
pages are page cache and do not count) every 0.5 ms. Imports and first-use allocations are
excluded by a warm-up parity run on a tiny pair before the baseline is taken.

Bound asserted: peak above that baseline <= 3 x the largest layer group in fp32 (a decoder layer,
40 MiB) + 64 MiB for activations and allocator slack (the batch's logits alone are 4 MiB per
copy). Loading either side whole in fp32 would need >= 380 MiB, twice the bound; the streamed
forwards measured ~100 MiB here (one layer in fp32, 42 MiB, plus what the allocator keeps of the
layers before it for reuse). Speed is not asserted (benchmarks/parity_memory.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import save_file

from neoxconv.convert import convert
from neoxconv.tiny import tiny_hf_config

LAYERS, HIDDEN, FFN, VOCAB = 8, 1024, 2048, 8192
MiB = 2**20

CHILD = r"""
import gc, json, sys, threading, time
import torch
torch.set_num_threads(2)
from neoxconv.parity import run_parity

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

peak, running = [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(0.0005)

tiny_a, tiny_b, big_a, big_b = sys.argv[1:5]
assert run_parity(tiny_a, tiny_b, tokens=64).passed  # warm-up: imports and first-use allocations
gc.collect()
base = anon()
peak[0] = base
threading.Thread(target=sample, daemon=True).start()
report = run_parity(big_a, big_b, tokens=64)
running[0] = False
print(json.dumps({"peak_above_base": peak[0] - base, "passed": report.passed, "max_abs_diff": report.max_abs_diff}))
"""


def write_llama(path, **overrides) -> None:
    """An HF Llama directory of seeded random fp16 weights, written directly (no model is built:
    initialising 100M parameters twice would cost more than the check)."""
    from transformers import LlamaForCausalLM

    config = tiny_hf_config("llama", num_attention_heads=8, num_key_value_heads=8, intermediate_size=FFN,
                            vocab_size=VOCAB, **overrides)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    path.mkdir()
    save_file({k: ((1 if "norm" in k else 0) + 0.02 * torch.randn(shape, generator=g)).half()
               for k, shape in shapes.items()}, path / "model.safetensors", metadata={"format": "pt"})
    config.dtype = "float16"
    config.save_pretrained(path)


def test_parity_peak_memory_is_one_layer_group_not_the_model(tmp_path):
    write_llama(tmp_path / "tiny-hf", hidden_size=64)
    write_llama(tmp_path / "big-hf", hidden_size=HIDDEN, num_hidden_layers=LAYERS)
    for name in ("tiny", "big"):
        convert(tmp_path / f"{name}-hf", tmp_path / f"{name}-neox", to="neox", tp=2)
    paths = [tmp_path / n for n in ("tiny-hf", "tiny-neox", "big-hf", "big-neox")]
    res = subprocess.run([sys.executable, "-c", CHILD, *map(str, paths)], capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["passed"] and out["max_abs_diff"] < 1e-4, out
    layer_fp32 = 4 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN + 2 * HIDDEN)
    model_fp32 = 4 * (LAYERS * layer_fp32 // 4 + 2 * VOCAB * HIDDEN)
    bound = 3 * max(layer_fp32, 4 * VOCAB * HIDDEN) + 64 * MiB
    assert bound < model_fp32 / 2
    assert out["peak_above_base"] <= bound, (
        f"parity peaked {out['peak_above_base'] / MiB:.0f} MiB above its baseline; bound {bound / MiB:.0f} MiB "
        f"(the model is {model_fp32 / MiB:.0f} MiB in fp32)")
