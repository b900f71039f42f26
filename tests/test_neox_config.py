"""The NeoX YAML neoxconv writes: legacy-schema YAMLs only use keys of NeoX before 2024-09
(NeoX builds `NeoXArgs(**config)`, an unknown key is a TypeError), current-schema YAMLs use the
post-2024-09 MLP keys, and both parse back to the same model."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fixtures.factories import hf_tensors, save_hf, tiny_hf_model
from neoxconv.convert import convert
from neoxconv.formats.neox_args import read_configs
from neoxconv.formats.neox_config import legacy_llama_ff, neox_yaml
from neoxconv.spec import ModelSpec

# Keys NeoX added on 2024-09-10 together with the current MLP names (adbf5d6f).
POST_2024_09 = ("use_bias_in_mlp", "mlp_multiple_of")

LLAMA = dict(norm="rmsnorm", norm_eps=1e-6, activation="swiglu", attn_bias=False, mlp_bias=False, family="llama")
SPECS = {
    "classic": ModelSpec("gptneox", 64, 2, 4, 4, 256, 128, 100, rotary_pct=0.25, parallel_residual=True),
    "llama-default-width": ModelSpec(hidden=96, layers=2, heads=4, kv_heads=4, intermediate=legacy_llama_ff(96),
                                     vocab_rows=128, vocab_size=96, **LLAMA),
    "llama-other-width": ModelSpec(hidden=32, layers=2, heads=4, kv_heads=4, intermediate=48, vocab_rows=128,
                                   vocab_size=96, **LLAMA),
    "llama-gqa": ModelSpec(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48, vocab_rows=128, vocab_size=96,
                           **LLAMA),
    "mistral": ModelSpec(**{**LLAMA, "family": "mistral"}, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48,
                         vocab_rows=128, vocab_size=96, sliding_window=16),
}


def written(spec: ModelSpec, schema: str, dtype: str = "bfloat16") -> tuple[str, dict]:
    text = neox_yaml(spec, tp=2, pp=1, layout="pipeline", vocab_multiple=128, schema=schema, dtype=dtype,
                     extra={"tokenizer_type": "HFTokenizer", "vocab_file": "/x/tokenizer.json"}, source="test")
    return text, {k.replace("-", "_"): v for k, v in yaml.safe_load(text).items()}


@pytest.mark.parametrize("name", SPECS)
def test_legacy_yaml_has_no_post_2024_09_keys_and_current_has_them(name):
    spec = SPECS[name]
    _, legacy = written(spec, "legacy")
    _, current = written(spec, "current")
    assert not set(POST_2024_09) & set(legacy), sorted(legacy)
    assert "rotary_save_freqs_buffer" not in legacy  # unknown before 2024-03
    assert set(POST_2024_09) <= set(current)
    assert "mlp_type" not in current and "rotary_save_freqs_buffer" not in current
    # the model keys both schemas share agree
    for k in ("num_layers", "hidden_size", "num_attention_heads", "norm", "rotary_pct", "seq_length",
              "use_bias_in_attn_linear", "no_weight_tying", "make_vocab_size_divisible_by", "precision", "bf16"):
        assert legacy[k] == current[k], k


def test_legacy_mlp_keys():
    _, classic = written(SPECS["classic"], "legacy")
    assert "intermediate_size" not in classic and "mlp_type" not in classic  # classic MLP is always 4h
    _, default = written(SPECS["llama-default-width"], "legacy")
    assert default["mlp_type"] == "llama" and default["activation"] == "silu"
    assert "intermediate_size" not in default  # LLaMAParallelMLP's own width: valid since 2023-05
    _, other = written(SPECS["llama-other-width"], "legacy")
    assert other["mlp_type"] == "llama" and other["intermediate_size"] == 48
    _, current = written(SPECS["llama-other-width"], "current")
    assert current["intermediate_size"] == 3 * 48 and current["mlp_multiple_of"] == 1


def test_legacy_header_names_the_target_range_and_the_inv_freq_switch():
    text, _ = written(SPECS["llama-default-width"], "legacy")
    assert "299b68cd" in text and "0d4bdb96" in text
    for name in ("llama-other-width", "llama-gqa", "mistral"):
        assert "f36aed7f" in written(SPECS[name], "legacy")[0]
    # the rotary switch is there, commented out; uncommented it is a plain YAML key
    line = next(ln for ln in text.splitlines() if "rotary-save-freqs-buffer" in ln)
    assert line.startswith("#")
    assert yaml.safe_load(line.lstrip("# ")) == {"rotary-save-freqs-buffer": True}
    assert "adbf5d6f" in written(SPECS["classic"], "current")[0]


@pytest.mark.parametrize("schema", ["legacy", "current"])
@pytest.mark.parametrize("name", SPECS)
def test_yaml_parses_back(tmp_path, name, schema):
    spec = SPECS[name]
    text, parsed = written(spec, schema, dtype="float32")
    f = tmp_path / "neoxconv.yml"
    f.write_text(text)
    merged, _ = read_configs([f])
    assert merged == parsed
    assert merged["num_layers"] == spec.layers and merged["hidden_size"] == spec.hidden
    assert merged.get("num_kv_heads", spec.heads) == spec.kv_heads
    assert merged.get("sliding_window_width") == spec.sliding_window
    assert merged[("rms_norm_epsilon" if spec.norm == "rmsnorm" else "layernorm_epsilon")] == spec.norm_eps
    assert merged["vocab_file"] == "/x/tokenizer.json"


@pytest.mark.parametrize("family,overrides", [("gptneox", {"intermediate_size": 128}),
                                              ("llama", {"hidden_size": 96, "intermediate_size": 256})])
def test_legacy_checkpoint_round_trips_without_the_dropped_keys(tmp_path, family, overrides):
    """HF -> NeoX (legacy names) -> HF gives the same tensors, with a YAML that has no
    intermediate_size (classic 4h MLP / LLaMAParallelMLP default width) nor post-2024-09 keys."""
    model = tiny_hf_model(family, 0, **overrides)
    src = save_hf(model, tmp_path / "hf")
    convert(src, tmp_path / "nx", to="neox", tp=2, schema="legacy")
    cfg = yaml.safe_load(next((tmp_path / "nx").glob("*/configs/neoxconv.yml")).read_text())
    assert "intermediate-size" not in cfg and not {k.replace("_", "-") for k in POST_2024_09} & set(cfg)
    convert(tmp_path / "nx", tmp_path / "back", to="hf")
    a, b = hf_tensors(src), hf_tensors(tmp_path / "back")
    for k, v in a.items():
        if k.endswith("rotary_emb.inv_freq") or k.endswith(".attention.bias") or k.endswith(".masked_bias"):
            continue
        # the vocabulary padding rows (zeros) are kept: compare the real rows
        assert torch.equal(v, b[k][tuple(slice(0, n) for n in v.shape)]), k
