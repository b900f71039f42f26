"""CI parity matrix: every architecture neoxconv knows x TP {1, 2, 4} x NeoX layout
{pipeline, sequential}, on tiny seeded models, through `run_parity` (the code behind
`neoxconv parity`):

1. HF source vs the NeoX checkpoint converted from it: transformers vs the NeoX reference
   forward on the stored per-rank shards;
2. that NeoX checkpoint vs the HF model re-exported from it.

The architectures come from the registry (`neoxconv.archs.families()`), so a family added
later joins the matrix without skipped tests. Tolerance: the library's fp32 default (atol 2e-4,
rtol 1e-4); a correct conversion of these 2-layer models differs by < 1e-5 (asserted too,
so creeping noise is noticed long before it reaches the tolerance).
"""

from __future__ import annotations

import json

import pytest
import torch

from neoxconv import archs
from neoxconv.convert import convert
from neoxconv.parity import NUMERIC_FIELDS, run_parity
from neoxconv.tiny import tiny_hf_model

torch.set_num_threads(2)

# Per family: tiny HF model overrides. Heads and KV heads divisible by 4 (TP 4); GQA where the
# family has it; Mistral's window (8) shorter than the 16 compared tokens, so it matters.
MODELS = {
    "gptneox": {},  # parallel residual, rotary_pct 0.5, untied, biases (neoxconv.tiny)
    "llama": {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 4},
    "mistral": {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 4},
    "custom": {},  # ScaleNorm, ALiBi (8 heads), ReGLU, GPT-J residual, a local layer (neoxconv.tiny)
}
FAMILIES = archs.families()
TOKENS, BATCH = 16, 2


def test_every_registered_family_has_a_matrix_model():
    assert "gptneox" in FAMILIES
    assert set(FAMILIES) <= set(MODELS), f"add a tiny model for {set(FAMILIES) - set(MODELS)} to MODELS"


@pytest.fixture(scope="module")
def hf_sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("matrix")
    out = {}
    for i, fam in enumerate(FAMILIES):
        path = base / f"{fam}-hf"
        tiny_hf_model(fam, seed=10 + i, **MODELS.get(fam, {})).save_pretrained(path)
        out[fam] = path
    return out


def _assert_pass(report, vocab: int) -> None:
    assert report.verdict == "pass", report.info["reasons"]
    assert report.info["logits_verdict"] == "pass" and report.info["config_check"]["verdict"] == "pass"
    assert report.max_abs_diff < 1e-5 and report.argmax_agreement == 1.0
    assert report.positions == TOKENS * BATCH and report.vocab == vocab
    data = json.loads(report.to_json())
    assert set(data["info"]["a"]["config"]) == set(NUMERIC_FIELDS)


@pytest.mark.parametrize("layout", ["pipeline", "sequential"])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_matrix(hf_sources, tmp_path, family, tp, layout):
    src = hf_sources[family]
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    neox, back = tmp_path / "neox", tmp_path / "hf"
    convert(src, neox, to="neox", tp=tp, layout=layout)
    report = run_parity(src, neox, tokens=TOKENS, batch=BATCH)
    _assert_pass(report, vocab)
    assert report.info["b"]["tp"] == tp and report.info["b"]["layout"] == layout
    convert(neox, back, to="hf")
    _assert_pass(run_parity(neox, back, tokens=TOKENS, batch=BATCH, seed=1), vocab)
