"""No dead end for a sliding window (issue 9, deliverable 8).

A model trained with GPT-NeoX's own configs/mistral/7B.yml keeps `use_bias_in_mlp` at its default
(true): a sliding window AND MLP biases, which no stock HF class holds (Mistral has the window but
no biases, Llama the biases but no window). Every refusal names the way out, in NeoX's terms;
`--drop-sliding-window` takes it, with a warning stating up to which length nothing changes, and
`--verify` compares within that length. The claim itself ("identical for sequences of at most
W + 1 tokens") is checked on the reference forward, bit for bit.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from fixtures.pristine import no_output, run_cli
from neoxconv.convert import convert
from neoxconv.errors import NeoxconvError
from neoxconv.parity import logits_for
from neoxconv.spec import ModelSpec
from neoxconv.tiny import tiny_hf_model
from neoxconv.window import fused_softmax_warning

W = 7  # NeoX sliding_window_width: a token sees itself and the 7 before it, 8 keys


def neox_yaml(ckpt: Path) -> Path:
    return next(ckpt.glob("global_step*/configs/*.yml"))


def set_yaml(ckpt: Path, **keys) -> None:
    path = neox_yaml(ckpt)
    cfg = yaml.safe_load(path.read_text())
    for k, v in keys.items():
        cfg.pop(k, None)
        cfg.pop(k.replace("_", "-"), None)
        if v is not None:
            cfg[k] = v
    path.write_text(yaml.safe_dump(cfg))


@pytest.fixture(scope="module")
def mistral_7b_like(tmp_path_factory) -> Path:
    """A tiny NeoX checkpoint with the 7B.yml settings that matter: GQA, RMSNorm, SwiGLU, a window on
    global attention, MLP biases; TP 2, no neoxconv.json (as NeoX itself writes it), and a
    vocab-file that is not there."""
    root = tmp_path_factory.mktemp("window")
    tiny_hf_model("llama", num_key_value_heads=2, mlp_bias=True).save_pretrained(root / "hf")
    convert(root / "hf", root / "neox", to="neox", tp=2)
    (root / "neox" / "global_step0" / "neoxconv.json").unlink()
    set_yaml(root / "neox", sliding_window_width=W, tokenizer_type="HFTokenizer", vocab_file="data/missing.json")
    return root / "neox"


def test_no_stock_class_means_the_custom_export_with_the_window(mistral_7b_like, tmp_path):
    """No stock class holds a window with MLP biases: neox-to-hf picks neoxconv's custom code
    (docs/custom-export.md), which implements the window; --verify passes on sequences longer
    than the window (64 tokens), so the window is really applied."""
    out = tmp_path / "custom"
    code, _, err = run_cli("neox-to-hf", mistral_7b_like, out, "--verify")
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["NeoXCustomForCausalLM"] and cfg["sliding_window_width"] == W
    assert cfg["mlp_bias"] is True and "auto_map" in cfg
    report = json.loads((out / "parity-report.json").read_text())
    assert report["verdict"] == "pass" and report["info"]["batch"]["tokens"] > W + 1  # the window cuts


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_every_refusal_names_the_ways_out(mistral_7b_like, tmp_path, arch):
    """A stock class asked for by name: one message naming --arch custom and --drop-sliding-window."""
    out = tmp_path / "out"
    code, _, err = run_cli("neox-to-hf", mistral_7b_like, out, "--arch", arch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    lead = {"llama": r"HF Llama has no sliding-window attention \(NeoX sliding_window_width 7.*HF Mistral, the only "
                     r"stock class with one, has no MLP biases",
            "mistral": r"HF Mistral, the only stock class with a sliding window \(NeoX sliding_window_width 7, i.e. HF "
                       r"sliding_window 8\), has no MLP biases"}[arch]
    assert re.search(lead + r": export as custom \(--arch custom; .*or pass --drop-sliding-window .*as llama; its "
                     r"logits are identical for sequences of at most 8 tokens", lines[0]), lines[0]
    assert no_output(out)


def test_drop_sliding_window_warns_and_verifies_within_the_window(mistral_7b_like, tmp_path):
    out = tmp_path / "hf"
    code, _, err = run_cli("neox-to-hf", mistral_7b_like, out, "--drop-sliding-window", "--verify")
    assert code == 0, err
    flat = " ".join(err.split())
    assert ("WARNING: --drop-sliding-window: the export attends to all earlier tokens, while the model was trained "
            "with a sliding window (NeoX sliding_window_width 7, i.e. HF sliding_window 8): its logits are identical "
            "for sequences of at most 8 tokens") in flat
    # A vocab-file that is not there is said, naming it.
    assert "WARNING: the NeoX config's vocab-file data/missing.json does not exist" in flat
    assert "the export has no tokenizer" in flat
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["mlp_bias"] is True and "sliding_window" not in cfg
    report = json.loads((out / "parity-report.json").read_text())
    assert report["verdict"] == "pass" and report["info"]["batch"]["tokens"] == W + 1
    assert any("B is A without its sliding window" in n for n in report["info"]["notes"])
    # Without the flag, parity says the window is missing (config) and, beyond 8 tokens, the logits differ.
    from neoxconv.parity import run_parity

    beyond = run_parity(mistral_7b_like, out, tokens=W + 2, batch=1)
    assert beyond.info["logits_verdict"] == "fail" and "config differs: sliding_window = 8 (A) vs None (B)" in \
        beyond.info["reasons"]


def test_identical_up_to_width_plus_one_tokens(mistral_7b_like, tmp_path):
    """The claim on the reference forward (NeoX's training mask, global layers): the model with
    sliding_window_width W and without it give the same logits, bit for bit, on W + 1 tokens;
    on W + 2 the first token falls out of the last query's window."""
    full = shutil.copytree(mistral_7b_like, tmp_path / "full")
    set_yaml(full, sliding_window_width=None)
    tokens = torch.randint(0, 96, (2, W + 2), generator=torch.Generator().manual_seed(0))
    windowed, unwindowed = logits_for(mistral_7b_like, tokens), logits_for(full, tokens)
    assert torch.equal(windowed[:, : W + 1], unwindowed[:, : W + 1])
    assert (windowed[:, W + 1] - unwindowed[:, W + 1]).abs().max() > 1e-3


def test_fused_softmax_ignoring_the_window_is_warned(mistral_7b_like, tmp_path):
    """scaled_upper_triang_masked_softmax_fusion + half precision: NeoX's fused kernel ignores the
    mask on global layers (megatron/model/fused_softmax.py is_kernel_available)."""
    src = shutil.copytree(mistral_7b_like, tmp_path / "fused")
    set_yaml(src, scaled_upper_triang_masked_softmax_fusion=True, precision="bfloat16", seq_length=2048)
    code, out, err = run_cli("inspect", src, "--json")
    assert code == 0, err
    warnings = json.loads(out)["warnings"]
    assert any(w.startswith("WARNING: scaled_upper_triang_masked_softmax_fusion with bfloat16 training") and
               "sliding window (NeoX sliding_window_width 7" in w and "here 2048" in w for w in warnings), warnings


@pytest.mark.parametrize("args, stored, warned", [
    (dict(precision="fp16"), "float32", True),
    (dict(fp16={"enabled": True}), "float32", True),
    (dict(), "bfloat16", True),  # half-precision weights: trained in half precision
    (dict(), "float32", False),  # NeoX's default precision is fp32: the kernel never runs
    (dict(precision="bfloat16", seq_length=4096), "float32", False),  # longer than the kernel takes
    (dict(precision="bfloat16", attention_config=[[["flash"], 2]]), "float32", False),  # flash takes the window itself
    (dict(precision="bfloat16", scaled_upper_triang_masked_softmax_fusion=False), "float32", False),
])
def test_fused_softmax_warning_conditions(args, stored, warned):
    base = {"sliding_window_width": W, "scaled_upper_triang_masked_softmax_fusion": True, "seq_length": 128}
    assert (fused_softmax_warning({**base, **args}, 2, stored, W + 1) is not None) == warned


def _spec(**kw) -> ModelSpec:
    base = dict(family="llama", hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48, vocab_rows=96,
                vocab_size=96, norm="rmsnorm", activation="swiglu", attn_bias=False, mlp_bias=False, sliding_window=8)
    return ModelSpec(**{**base, **kw})


def test_refusals_of_each_writer():
    """Windows in NeoX terms; a model Mistral holds is sent there, one no class holds gets the option."""
    from neoxconv.archs import by_family
    from neoxconv.formats.meta_llama import _check_writable

    with pytest.raises(NeoxconvError, match=r"^HF Llama has no sliding-window attention \(NeoX sliding_window_width "
                                            r"7, i.e. HF sliding_window 8\): export as mistral \(--arch mistral\) or "
                                            r"custom \(--arch custom\), or pass --drop-sliding-window"):
        by_family("llama").config_from_spec(_spec())
    assert by_family("mistral").config_from_spec(_spec())["sliding_window"] == 8
    layernorm = _spec(family="gptneox", norm="layernorm", activation="gelu", kv_heads=4, rotary_pct=0.25)
    with pytest.raises(NeoxconvError, match=r"HF Mistral, the only stock class with one, needs RMSNorm and a "
                                            r"SwiGLU MLP .*--arch custom.*--drop-sliding-window .*\(as gptneox; "):
        by_family("gptneox").config_from_spec(layernorm)
    with pytest.raises(NeoxconvError, match=r"no sliding-window attention \(this model: NeoX sliding_window_width 7, "
                                            r"i.e. HF sliding_window 8\); pass --drop-sliding-window"):
        _check_writable(_spec(), 1)


def test_export_run_takes_either_way_out(mistral_7b_like, tmp_path):
    """A training run made with 7B.yml: each step exports as custom code with its window, or, with
    --drop-sliding-window, to HF Llama without it."""
    code, out, _ = run_cli("export-run", mistral_7b_like, tmp_path / "steps", "--json")
    report = json.loads(out)
    assert code == 0 and report["steps"][0]["status"] == "written", report
    assert json.loads((tmp_path / "steps" / "step0" / "config.json").read_text())["sliding_window_width"] == W
    code, out, _ = run_cli("export-run", mistral_7b_like, tmp_path / "dropped", "--drop-sliding-window", "--json")
    report = json.loads(out)
    assert code == 0 and report["steps"][0]["status"] == "written", report
    assert any("identical for sequences of at most 8 tokens" in w for w in report["steps"][0]["warnings"])
    assert "sliding_window" not in json.loads((tmp_path / "dropped" / "step0" / "config.json").read_text())


def test_window_dropped_needs_a_window_on_a_and_none_on_b(mistral_7b_like):
    from neoxconv.parity import run_parity

    with pytest.raises(NeoxconvError, match=r"--window-dropped needs A with a sliding window and B without one "
                                            r"\(A: NeoX sliding_window_width 7, i.e. HF sliding_window 8; B: NeoX "
                                            r"sliding_window_width 7"):
        run_parity(mistral_7b_like, mistral_7b_like, window_dropped=True)
