"""Negative parity tests: each deliberately wrong conversion must make `parity` fail, and the
correct conversion it was made from must pass (a check that cannot fail is a defect).

The wrong checkpoints are made by corrupting a correct conversion's output files
(tests/fixtures/corrupt.py). Two cases go through the real command (`python -m neoxconv
parity ... --json`, exit code 1); the rest call `run_parity`, the function behind it.

Which mechanism catches what (fp32, default tolerance atol 2e-4 / rtol 1e-4):

| wrong conversion                         | logits | config check |
|------------------------------------------|--------|--------------|
| q/k rows swapped or permuted in a head   | yes    | no (no config field) |
| gpt_j row bias summed twice (tp 2)       | yes    | no           |
| rank-0 norm copy where ranks differ      | yes (with --replicated mean) | no |
| wrong rotary_pct                         | yes    | yes          |
| interleaved QKV written blocked          | yes    | no           |
| exact vs tanh GELU                       | yes (margin ~2x) | yes |
| RMSNorm eps 100x                         | only at small activations | yes |
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fixtures import corrupt
from fixtures.neox_raw import random_rank_tensors, write_neox_checkpoint
from neoxconv.convert import convert
from neoxconv.parity import run_parity
from neoxconv.tiny import tiny_hf_model

torch.set_num_threads(2)
TOKENS = 32
HEADS = 4  # gptneox tiny model: 4 heads, hidden 32 -> 2 heads per rank at tp 2


def parity(a, b, **kw):
    return run_parity(a, b, tokens=TOKENS, **kw)


def parity_cli(a, b, report_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "neoxconv", "parity", str(a), str(b), "--tokens", str(TOKENS),
                           "--json", str(report_path)], capture_output=True, text=True, env=env, timeout=300)
    return proc, (json.loads(report_path.read_text()) if report_path.is_file() else None)


def assert_fails(report, *, logits: bool, config_fields=()):
    assert report.verdict == "fail"
    assert report.info["logits_verdict"] == ("fail" if logits else "pass"), report.summary()
    assert set(report.info["config_check"]["differences"]) == set(config_fields)


def assert_passes(report):
    assert report.verdict == "pass", report.info["reasons"]


@pytest.fixture(scope="module")
def gptneox(tmp_path_factory):
    """Tiny GPTNeoX HF source (parallel residual, rotary_pct 0.5, exact GELU, biases) and its
    correct NeoX conversion at tp 2 (pipeline layout)."""
    base = tmp_path_factory.mktemp("neg-gptneox")
    hf, neox = base / "hf", base / "neox"
    tiny_hf_model("gptneox", seed=3).save_pretrained(hf)
    convert(hf, neox, to="neox", tp=2, layout="pipeline")
    return hf, neox


def fresh(src, tmp_path, name="wrong"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bug", ["swap_q_k_head0", "qk_rows_interleaved_rotary_order"])
def test_qk_rows_wrong_within_head(gptneox, tmp_path, bug):
    """q/k rows within a head: head 0's q and k exchanged on rank 1, or every head's q and k rows
    put in Meta's interleaved rotary order (a forgotten permutation; q·k alone would not notice a
    consistent permutation, only rotary does). Caught by the logits."""
    hf, neox = gptneox
    wrong = fresh(neox, tmp_path)
    fn = (lambda st: corrupt.swap_q_k_of_head(st, HEADS // 2, head=0)) if bug == "swap_q_k_head0" else \
        (lambda st: corrupt.permute_qk_rows_interleaved(st, HEADS // 2))
    for layer in range(2):
        for rank in ((1,) if bug == "swap_q_k_head0" else (0, 1)):
            corrupt.edit_neox_layer(wrong, layer, rank, fn)
    assert_passes(parity(hf, neox))
    assert_fails(parity(hf, wrong), logits=True)


def test_gptj_row_bias_summed_twice_cli(gptneox, tmp_path):
    """gpt_j_residual at tp 2: each rank must hold b/tp of attention.dense.bias and
    mlp.linear2.bias (NeoX all-reduces bias-included partials). A converter that copies b to
    every rank adds it twice. Through the real command: exit 1, JSON verdict fail."""
    hf, neox = gptneox
    wrong = fresh(neox, tmp_path)
    halves = [corrupt.neox_layer(neox, 0, r)["attention.dense.bias"] for r in range(2)]
    assert torch.equal(halves[0], halves[1])  # b/2 on each rank

    def double(st):
        for k in ("attention.dense.bias", "mlp.linear2.bias"):
            st[k] = st[k] * 2

    for layer in range(2):
        for rank in range(2):
            corrupt.edit_neox_layer(wrong, layer, rank, double)
    assert_passes(parity(hf, neox))
    proc, report = parity_cli(hf, wrong, tmp_path / "report.json")
    assert proc.returncode == 1, proc.stderr
    assert report["verdict"] == "fail" and report["info"]["logits_verdict"] == "fail"
    assert any("logits differ" in r for r in report["info"]["reasons"])
    assert "FAIL" in proc.stdout


def test_wrong_rotary_pct_cli(gptneox, tmp_path):
    """rotary-pct 1.0 in the NeoX YAML instead of 0.5: the logits (the reference reads the YAML)
    AND the config check both catch it. Through the real command."""
    hf, neox = gptneox
    wrong = fresh(neox, tmp_path)
    corrupt.edit_neox_yaml(wrong, rotary_pct=1.0)
    assert_passes(parity(hf, neox))
    proc, report = parity_cli(hf, wrong, tmp_path / "report.json")
    assert proc.returncode == 1, proc.stderr
    assert report["info"]["logits_verdict"] == "fail"
    assert report["info"]["config_check"]["differences"] == {"rotary_pct": [0.5, 1.0]}
    assert any("rotary_pct" in r for r in report["info"]["reasons"])


def test_interleaved_qkv_written_blocked(gptneox, tmp_path):
    """An MHA model's fused QKV written blocked [Q; K; V] per rank (bug B4) instead of NeoX's
    per-head interleaved [q_h; k_h; v_h]. NeoX reads MHA interleaved whatever the file says, so
    only the logits can catch it."""
    hf, neox = gptneox
    wrong = fresh(neox, tmp_path)
    for layer in range(2):
        for rank in range(2):
            corrupt.edit_neox_layer(wrong, layer, rank, lambda st: corrupt.interleaved_to_blocked(st, HEADS // 2))
    assert_passes(parity(hf, neox))
    assert_fails(parity(hf, wrong), logits=True)


def test_exact_vs_tanh_gelu(gptneox, tmp_path):
    """NeoX `gelu` (exact, bias_gelu_fusion false) exported with hidden_act gelu_fast (tanh).
    Caught by both: the config check (activation gelu vs gelu_tanh) and, in fp32, the logits
    (measured max |Δ| 4.2e-4 on this model vs atol 2e-4: a ~2x margin only)."""
    _, neox = gptneox
    good = tmp_path / "hf-good"
    convert(neox, good, to="hf")
    wrong = fresh(good, tmp_path)
    corrupt.edit_hf_config(wrong, hidden_act="gelu_fast")
    assert_passes(parity(neox, good))
    assert_fails(parity(neox, wrong), logits=True, config_fields=["activation"])


# ------------------------------------------------------------------------------------------

RAW_CFG = dict(num_layers=2, hidden_size=32, num_attention_heads=4, rotary_pct=0.25, gpt_j_residual=True,
               no_weight_tying=True)


def test_rank0_norm_where_ranks_differ(tmp_path):
    """A NeoX checkpoint whose norm copies differ across its 2 TP ranks (as in real training).
    The correct export holds their mean; the wrong one takes rank 0's copy.

    With --replicated mean (the reference uses the mean of the copies, i.e. what an export can
    hold) the correct export passes and the rank-0 one fails on the logits. With the default
    --replicated own (what NeoX computes: each rank its own copy) BOTH fail: no single HF norm can
    reproduce drifted copies, and the report says how large the drift is."""
    ranks = random_rank_tensors(tp=2, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=128, tied=False, seed=5)
    src = write_neox_checkpoint(tmp_path / "neox", ranks, RAW_CFG)
    good = tmp_path / "hf-good"
    convert(src, good, to="hf")
    wrong = fresh(good, tmp_path)

    def rank0(tensors):
        for i in range(2):
            for name in ("input_layernorm", "post_attention_layernorm"):
                for p in ("weight", "bias"):
                    tensors[f"gpt_neox.layers.{i}.{name}.{p}"] = ranks[i + 2][0][f"{name}.{p}"].clone()
        for p in ("weight", "bias"):
            tensors[f"gpt_neox.final_layer_norm.{p}"] = ranks[5][0][f"norm.{p}"].clone()

    corrupt.edit_hf_tensors(wrong, rank0)
    assert_passes(parity(src, good, replicated="mean"))
    assert_fails(parity(src, wrong, replicated="mean"), logits=True)
    own = parity(src, good)
    assert_fails(own, logits=True)
    assert any("differ across the 2 TP ranks" in n for n in own.info["notes"])


@pytest.mark.parametrize("scale", ["trained", "tiny"])
def test_rmsnorm_eps_100x(tmp_path, scale):
    """RMSNorm eps 1e-8 in the NeoX YAML instead of the HF model's 1e-6.

    Honest account of what catches it: the CONFIG CHECK (norm_eps differs) fails the report in
    both cases. The logits alone cannot be relied on: with hidden states of trained-model scale
    ("trained": embeddings ~N(0, 1), mean(x²) ~ 1, eps is 1e-6 of it) the logits move less
    than fp32 noise (measured max |Δ| 2.4e-6) and the logits verdict PASSES (asserted below). Only
    with the factory's tiny activations ("tiny": embeddings ~N(0, 0.01), eps 1e-4 of mean(x²)) do
    they move enough to fail, and barely (measured 2.7e-4 vs atol 2e-4)."""
    model = tiny_hf_model("llama", seed=7, hidden_size=64, num_attention_heads=8, num_key_value_heads=4)
    if scale == "trained":
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(10.0)
    hf, good = tmp_path / "hf", tmp_path / "neox"
    model.save_pretrained(hf)
    convert(hf, good, to="neox", tp=2)
    wrong = fresh(good, tmp_path)
    corrupt.edit_neox_yaml(wrong, rms_norm_epsilon=1e-8)
    assert_passes(parity(hf, good))
    report = parity(hf, wrong)
    assert_fails(report, logits=(scale == "tiny"), config_fields=["norm_eps"])
    assert any("norm_eps" in r for r in report.info["reasons"])
