"""Every dense GPT-NeoX model to Hugging Face (docs/custom-export.md): a matrix of tiny NeoX
checkpoints written by hand (fixtures.neox_raw.feature_checkpoint, not by neoxconv's writer),
together covering every feature value at least once, each exported with `neox-to-hf --arch custom
--verify` (parity against the independent reference on the stored shards), loaded with
`trust_remote_code`, and decoded with and without the KV cache; round trips back to NeoX at other
TPs; stock-class models through the custom code; every refused feature a clean exit 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fixtures.neox_raw import feature_checkpoint, random_rank_tensors, write_neox_checkpoint
from fixtures.pristine import run_cli
from neoxconv.convert import convert
from neoxconv.custom.export import TEMPLATE_DIR, TEMPLATE_FILES, stock_family
from neoxconv.formats.neox import read_neox
from neoxconv.graph import read as read_checkpoint
from neoxconv.parity import logits_for
from neoxconv.reference import make_batch

TOKENS = 16  # > the window (6 keys) and 4 local blocks of 4: every mask matters

# name -> (feature_checkpoint arguments, the family neox-to-hf picks by itself). Every value of
# every feature appears at least once (the docstring of each row says which); TP 2 throughout, so
# gated MLPs, GPT-J row biases, QK-norm extents and ALiBi slices are split for real.
MODELS = {
    # gelu (erf), LayerNorm, QK LayerNorm over the 2 heads of a rank, partial rotary + base, flash
    "gelu": (dict(activation="gelu", qk_norm=True, rotary_pct=0.5, rotary_emb_base=500,
                  attention=["flash", "global"]), "custom"),
    # gelu tanh, RMSNorm, ALiBi with 6 heads (3 per rank), GQA (2 KV heads), QK RMSNorm, window
    "gelu_tanh": (dict(activation="gelu", bias_gelu_fusion=True, norm="rmsnorm", pos_emb="alibi", hidden=48,
                       heads=6, kv_heads=2, qk_norm=True, sliding_window_width=5), "custom"),
    # gelu onnx_safe, ScaleNorm, learned positions with offset and multiplier, QK ScaleNorm (a gain per
    # rank), no attention biases
    "gelu_onnx": (dict(activation="gelu", onnx_safe=True, norm="scalenorm", pos_emb="learned", opt_pos_emb_offset=2,
                       mup_rp_embedding_mult=0.5, qk_norm=True, attn_bias=False), "custom"),
    # relu, non-parametric LayerNorm (nothing stored: an empty final-norm index), sinusoidal positions
    # with multiplier, QK non-parametric LayerNorm, tied embeddings, sequential layout
    "relu": (dict(activation="relu", norm="non_parametric_layernorm", pos_emb="sinusoidal", mup_rp_embedding_mult=1.5,
                  qk_norm=True, tied=True, layout="sequential"), "custom"),
    # softsign, no position embedding, GPT-J residual with biases
    "softsign": (dict(activation="softsign", pos_emb="none", gpt_j_residual=True), "custom"),
    # swish, gpt_j_tied (one norm for attention and MLP; the other is kept)
    "swish": (dict(activation="swish", gpt_j_residual=True, gpt_j_tied=True), "custom"),
    # mish, RMSNorm, GPT-J residual without MLP biases (NeoX drops the attention output)
    "mish": (dict(activation="mish", norm="rmsnorm", gpt_j_residual=True, mlp_bias=False), "custom"),
    # silu, ALiBi on 4 heads, a local layer (blocks of 4, this and the 2 previous blocks)
    "silu": (dict(activation="silu", pos_emb="alibi", attention=["local", "global"]), "custom"),
    # geglu, RMSNorm, GQA, no biases: HF Llama computes it (stock), exported with --arch custom here
    "geglu": (dict(activation="geglu", norm="rmsnorm", kv_heads=2, attn_bias=False, mlp_bias=False), "llama"),
    # reglu with MLP biases, ScaleNorm
    "reglu": (dict(activation="reglu", norm="scalenorm"), "custom"),
    # swiglu with LayerNorm (no stock class has LayerNorm with a gated MLP), flash layers
    "swiglu": (dict(activation="swiglu", attention=["flash", "flash"]), "custom"),
    # bilinear, non-parametric LayerNorm, learned positions
    "bilinear": (dict(activation="bilinear", norm="non_parametric_layernorm", pos_emb="learned"), "custom"),
    # glu, RMSNorm, sinusoidal, a local layer after a flash one, with the window
    "glu": (dict(activation="glu", norm="rmsnorm", pos_emb="sinusoidal", attention=["flash", "local"],
                 sliding_window_width=5), "custom"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> (NeoX checkpoint, its custom export), each made once by `neox-to-hf --arch custom --verify`."""
    root = tmp_path_factory.mktemp("custom")
    out = {}
    for seed, (name, (kw, _)) in enumerate(MODELS.items()):
        src = feature_checkpoint(root / name, seed=seed, **kw)
        hf = root / f"{name}-hf"
        code, _, err = run_cli("neox-to-hf", src, hf, "--arch", "custom", "--verify")
        assert code == 0, err
        out[name] = (src, hf)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_every_feature_exports_loads_and_matches_neox(exports, name):
    from transformers import AutoModelForCausalLM

    src, hf = exports[name]
    family = MODELS[name][1]
    assert read_neox(src).spec.family == family  # what neox-to-hf picks without --arch (archs.family_for)
    # the custom package's own rule (on the export's config.json) agrees with the converter's
    assert stock_family(json.loads((hf / "config.json").read_text())) == (None if family == "custom" else family)
    report = json.loads((hf / "parity-report.json").read_text())  # --verify: NeoX reference vs the export
    assert report["verdict"] == "pass" and report["info"]["config_check"]["verdict"] == "pass"
    assert report["max_abs_diff"] < 1e-5  # fp32, 2 layers; a wrong feature moves logits by >= 1e-3
    for file in TEMPLATE_FILES:
        assert (hf / file).read_bytes() == (TEMPLATE_DIR / file).read_bytes()
    card = (hf / "README.md").read_text()
    assert "trust_remote_code=True" in card and "GPT-NeoX features it implements" in card
    manifest = json.loads((hf / "neoxconv-manifest.json").read_text())["files"]
    assert set(TEMPLATE_FILES) <= set(manifest)

    model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules")  # the export's own code
    batch = make_batch(64, 2, TOKENS, seed=5)
    with torch.no_grad():
        got = model(batch).logits
    want = logits_for(src, batch)  # the reference on the NeoX shards, with each rank's own copies
    # fp32: the same math in another order (TP partial sums, fused vs split projections)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)

    prompt = make_batch(64, 1, 5, seed=6) + 1  # no id 0 (the pad id generate() assumes)
    kw = dict(max_new_tokens=TOKENS, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, **kw)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kw))


def test_inspect_names_the_features(exports):
    from neoxconv.inspect import _numerics

    for name, words in (("gelu", "QK-norm, attention flash/global"), ("silu", "alibi positions"),
                        ("glu", "sliding window 6 keys, attention flash/local"), ("swish", "gpt_j_tied")):
        for path in exports[name]:  # the NeoX shards and the export say the same
            assert words in _numerics(read_checkpoint(path).spec.to_dict()), name


ROUND_TRIPS = [("gelu_tanh", 1), ("gelu_onnx", 4), ("relu", 2), ("mish", 1), ("silu", 1), ("bilinear", 4)]


@pytest.mark.parametrize("name,tp", ROUND_TRIPS)
def test_custom_export_round_trips_through_neox_at_another_tp(exports, tmp_path, name, tp):
    """HF custom -> NeoX at TP `tp` -> HF again: every tensor and the config bit for bit."""
    _, hf = exports[name]
    neox, back = tmp_path / "neox", tmp_path / "hf"
    code, _, err = run_cli("hf-to-neox", hf, neox, "--tp", tp, "--vocab-multiple", 16, "--verify")
    assert code == 0, err
    convert(neox, back, to="hf")
    first, second = load_file(hf / "model.safetensors"), load_file(back / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    drop = ("transformers_version",)
    config = {k: v for k, v in json.loads((hf / "config.json").read_text()).items() if k not in drop}
    assert config == {k: v for k, v in json.loads((back / "config.json").read_text()).items() if k not in drop}


def test_hf_to_neox_at_the_training_tp_gives_back_the_stored_shards(exports, tmp_path):
    """The ALiBi/local model back at TP 2: every stored tensor of every rank, buffers included
    (the slopes of each rank's heads, the block layout), equals what NeoX stored."""
    src, hf = exports["silu"]
    convert(hf, tmp_path / "neox", to="neox", tp=2, vocab_multiple=32)
    for file in sorted((src / "global_step1000").glob("layer_*.pt")):
        want = torch.load(file, weights_only=True)
        got = torch.load(tmp_path / "neox" / "global_step0" / file.name, weights_only=True)
        assert want.keys() == got.keys(), file.name
        assert all(torch.equal(want[k], got[k]) for k in want), file.name


def test_qk_layernorm_models_keep_their_training_tp(exports, tmp_path):
    """QK LayerNorm normalises all heads of one TP rank together: written at another TP NeoX would
    compute another model, so hf-to-neox and NeoX -> NeoX refuse it, naming the TP to use."""
    src, hf = exports["gelu"]
    for args in (("hf-to-neox", hf, tmp_path / "a", "--tp", 1), ("convert", src, tmp_path / "b", "--to", "neox")):
        code, _, err = run_cli(*args)
        assert code == 2 and "use --tp 2" in err and "Traceback" not in err, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_stock_models_through_the_custom_code_equal_the_stock_class(tmp_path):
    """A model a stock class computes exactly gives the same logits through `--arch custom`: a
    cross-check of the modeling file against transformers' own classes (fp32, eager)."""
    from transformers import AutoModelForCausalLM

    pythia = random_rank_tensors(tp=2, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=128, tied=False,
                                 same_norms=True)
    llama = dict(activation="swiglu", norm="rmsnorm", kv_heads=2, attn_bias=False, mlp_bias=False)
    sources = {"gptneox": write_neox_checkpoint(tmp_path / "pythia", pythia, dict(
                   num_layers=2, hidden_size=32, num_attention_heads=4, rotary_pct=0.25, gpt_j_residual=True,
                   no_weight_tying=True)),
               "llama": feature_checkpoint(tmp_path / "llama", **llama)}
    batch = make_batch(64, 2, TOKENS, seed=7)
    for family, src in sources.items():
        stock, custom = tmp_path / f"{family}-stock", tmp_path / f"{family}-custom"
        assert convert(src, stock, to="hf")["spec"].family == family
        convert(src, custom, to="hf", family="custom")
        with torch.no_grad():
            want = AutoModelForCausalLM.from_pretrained(stock, attn_implementation="eager")(batch).logits
            got = AutoModelForCausalLM.from_pretrained(custom, trust_remote_code=True)(batch).logits
        assert torch.equal(got, want), (family, (got - want).abs().max())


def test_a_custom_export_with_its_tokenizer_loads_with_the_auto_classes(tmp_path):
    """The whole user path: neox-to-hf picks the custom code by itself (ALiBi), the tokenizer goes
    beside it, and AutoTokenizer + AutoModelForCausalLM(trust_remote_code=True) generate from text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fixtures.hf_export import tokenizer_json

    src = feature_checkpoint(tmp_path / "neox", vocab_rows=320, pos_emb="alibi", activation="geglu", seed=3)
    code, _, err = run_cli("neox-to-hf", src, tmp_path / "hf", "--tokenizer", tokenizer_json(tmp_path / "tok.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    card = (tmp_path / "hf" / "README.md").read_text()  # the card's snippet, as a user copies it
    assert 'AutoTokenizer.from_pretrained("<this repo>", trust_remote_code=True)' in card
    # transformers 5 reads config.json for AutoTokenizer (it would prompt without the flag)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert type(tokenizer).__module__.startswith("transformers.models")  # a stock tokenizer class
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    ids = tokenizer("the quick brown fox", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "the quick brown fox" and int(ids.max()) < 300
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
    assert out.shape == (1, ids.shape[1] + 6) and torch.equal(out[:, : ids.shape[1]], ids)


MISSTATED = [  # (model, config.json field of its export, a wrong value): parity must see each
    ("gelu_onnx", "position_embedding_offset", 0), ("gelu_onnx", "position_embedding_multiplier", 1.0),
    ("gelu", "qk_norm_group_heads", 1), ("silu", "attention_types", ["global", "global"]),
    ("silu", "local_window_blocks", 8), ("gelu_tanh", "sliding_window_width", None),
    ("swish", "parallel_norms_tied", False),
]


@pytest.mark.parametrize("name,field,value", MISSTATED, ids=[m[1] for m in MISSTATED])
def test_a_misstated_feature_fails_parity(exports, tmp_path, name, field, value):
    """The custom export's numerics follow its config: a field set wrong moves the logits past the
    tolerance, so the matrix's passes are not vacuous."""
    src, good = exports[name]
    bad = tmp_path / field
    shutil.copytree(good, bad)
    config = json.loads((bad / "config.json").read_text())
    assert config[field] != value
    (bad / "config.json").write_text(json.dumps({**config, field: value}))
    batch = make_batch(64, 2, TOKENS, seed=8)
    assert (logits_for(bad, batch) - logits_for(src, batch)).abs().max() > 1e-3, field


DAMAGED_CONFIG = [  # config.json of a custom export -> words of the one-line error
    ("norm", "fancynorm", "norm"), ("attention_types", ["global"], "attention_types"),
    ("local_block_size", 0, "local_block_size must be a positive integer"),
    ("norm_eps", -1.0, "norm_eps must be a non-negative number"),
]


@pytest.mark.parametrize("field,value,words", DAMAGED_CONFIG, ids=[d[0] for d in DAMAGED_CONFIG])
def test_a_damaged_custom_config_is_refused_by_the_readers(exports, tmp_path, field, value, words):
    """hf-to-neox reads config.json as JSON (never running the export's code) and refuses values
    the custom model cannot mean: exit 2, one line naming the field, nothing written."""
    bad = shutil.copytree(exports["silu"][1], tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, field: value}))
    code, _, err = run_cli("hf-to-neox", bad, tmp_path / "neox", "--tp", 2)
    assert code == 2 and words in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "neox").exists()


def _cfg(**keys) -> dict:
    return dict(num_layers=2, hidden_size=32, num_attention_heads=4, **keys)


REFUSED = {  # NeoX setting -> words of the one-line error (docs/custom-export.md §5)
    "sparse_fixed": (dict(attention_config=[[["sparse_fixed"], 2]]), "sparse_fixed attention"),
    "sparse_variable": (dict(attention_config=[[["global", "sparse_variable"], 1]]), "sparse_variable attention"),
    "bigbird": (dict(attention_config=[[["bigbird"], 2]]), "bigbird attention"),
    "bslongformer": (dict(attention_config=[[["bslongformer"], 2]]), "bslongformer attention"),
    "gmlp": (dict(attention_config=[[["gmlp"], 2]]), "gmlp layers, which are not attention layers"),
    "amlp": (dict(attention_config=[[["amlp"], 2]]), "amlp layers"),
    "mamba": (dict(attention_config=[[["mamba"], 2]]), "mamba layers"),
    "rwkv": (dict(attention_config=[[["rwkv"], 2]]), "rwkv layers"),
    "moe": (dict(moe_num_experts=4), "mixture of experts"),
    "rpe": (dict(pos_emb="rpe"), "pos_emb: rpe"),
    "mup": (dict(use_mup=True), "use_mup"),
    "soft_prompt": (dict(soft_prompt_tuning={"enabled": True, "n_tokens": 10}), "soft_prompt_tuning"),
    "te_norm": (dict(norm="te_layernorm"), "norm: te_layernorm (Transformer Engine"),
    "te_modules": (dict(te_mha=True), "te_mha (Transformer Engine"),
    "reward_model": (dict(train_impl="rm"), "train_impl: rm"),
    "row_output": (dict(output_layer_parallelism="row"), "output_layer_parallelism: row"),
    "onnx_and_fusion": (dict(onnx_safe=True, bias_gelu_fusion=True), "onnx_safe with bias_gelu_fusion"),
}


@pytest.fixture(scope="module")
def plain_neox(tmp_path_factory):
    root = tmp_path_factory.mktemp("refused")
    ranks = random_rank_tensors(tp=1, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=64, tied=True)
    return write_neox_checkpoint(root / "neox", ranks, _cfg())


@pytest.mark.parametrize("case", REFUSED)
def test_refused_features_exit_2_naming_the_feature(plain_neox, tmp_path, case):
    keys, words = REFUSED[case]
    config = tmp_path / "model.yml"
    config.write_text(json.dumps(_cfg(**keys)))  # JSON is YAML
    code, _, err = run_cli("neox-to-hf", plain_neox, tmp_path / "hf", "--config", config)
    assert code == 2 and words in err, err
    assert "Traceback" not in err and err.count("\n") == 1 and not (tmp_path / "hf").exists()
