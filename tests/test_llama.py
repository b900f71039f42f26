"""Llama, Mistral and raw Meta Llama: every path in and out, MHA and GQA (issue 3).

Sources that are not HF are assembled by hand in the test (tests/fixtures/llama_factories.py),
never by neoxconv's writers, so a layout bug cannot cancel itself in a round trip (T8, bug B4).
Where the NeoX/Meta reference forwards exist (neoxconv.reference), the files are also run
through them, which checks what we WRITE against NeoX's and Meta's own semantics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fixtures.factories import hf_tensors, load_hf, logits, save_hf, tiny_hf_model, token_batch
from fixtures.llama_factories import (CASES, hf_state, meta_shards, neox_llama_config, neox_llama_ranks, save_meta,
                                      save_neox_llama)
from fixtures.neox_raw import write_neox_checkpoint
from neoxconv.convert import convert
from neoxconv.errors import NeoxconvError
from neoxconv.formats.meta_llama import read_meta
from neoxconv.formats.neox_files import open_neox

from neoxconv.reference import NeoxCheckpoint, meta_reference_logits, neox_reference_logits

VOCAB = 96  # tiny_hf_model's Llama/Mistral vocabulary
IDS = token_batch(VOCAB, batch=2, tokens=12)  # 12 > Mistral's window of 8: the window matters


def model_of(case: str, seed: int = 0):
    family, kw = CASES[case]
    return tiny_hf_model(family, seed, **kw)


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    """One saved HF model per case, with its source logits."""
    cache = {}

    def get(case):
        if case not in cache:
            m = model_of(case)
            cache[case] = (m, save_hf(m, tmp_path_factory.mktemp(case) / "hf"), logits(m, IDS))
        return cache[case]

    return get


def assert_same_hf_weights(model, out_dir: Path, trimmed: bool = True):
    """Every tensor of the exported dir equals the source model's (tied heads compared to embed)."""
    want = hf_state(model)
    got = hf_tensors(out_dir)
    if model.config.tie_word_embeddings and "lm_head.weight" not in got:
        want.pop("lm_head.weight", None)  # state_dict() lists the tied head; the files do not
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for name, t in want.items():
        g = got[name] if trimmed else got[name][: t.shape[0]]
        assert torch.equal(g, t), name


def assert_same_logits(out_dir: Path, src_logits: torch.Tensor):
    exported = load_hf(out_dir)
    assert torch.equal(logits(exported, IDS)[..., :VOCAB], src_logits)


def reference_check(neox_dir: Path, qkv_layout: str, src_logits: torch.Tensor):
    """NeoX-semantics forward on the stored per-rank tensors agrees with the HF source."""
    ref = neox_reference_logits(NeoxCheckpoint(neox_dir, qkv_layout=qkv_layout), IDS)[..., :VOCAB]
    torch.testing.assert_close(ref, src_logits, atol=1e-5, rtol=1e-5)


def tp_values(case):
    _, kw = CASES[case]
    kv = kw.get("num_key_value_heads", 4)
    return [tp for tp in (1, 2, 4) if kv % tp == 0]


# --------------------------------------------------------------------------------------------
# HF -> NeoX -> HF


RT = [(case, tp) for case in CASES for tp in tp_values(case)]


@pytest.mark.parametrize("case,tp", RT, ids=[f"{c}-tp{t}" for c, t in RT])
def test_hf_neox_hf_bit_exact(tmp_path, hf_src, case, tp):
    model, src, src_logits = hf_src(case)
    gqa = model.config.num_key_value_heads != model.config.num_attention_heads
    variants = [(layout, schema, None) for layout in ("pipeline", "sequential") for schema in ("current", "legacy")]
    if gqa:
        variants.append(("pipeline", "current", "gqa_fakehead"))
    for layout, schema, qkv in variants:
        tag = f"{layout}-{schema}-{qkv}"
        neox, back = tmp_path / f"neox-{tag}", tmp_path / f"hf-{tag}"
        res = convert(src, neox, to="neox", tp=tp, layout=layout, schema=schema, qkv_layout=qkv)
        # GQA default: blocked (NeoX since 2024-11); with legacy names fake-head, the only GQA
        # layout NeoX had while it used those names.
        default = ("gqa_fakehead" if schema == "legacy" else "gqa_blocked") if gqa else "mha_interleaved"
        assert res["qkv_layout"] == (qkv or default), tag
        reference_check(neox, res["qkv_layout"], src_logits)
        convert(neox, back, to="hf", trim_vocab_padding=True, qkv_layout=qkv)
        assert_same_hf_weights(model, back)
        cfg = json.loads((back / "config.json").read_text())
        assert cfg["model_type"] == model.config.model_type and cfg["vocab_size"] == VOCAB
        if (layout, schema) == ("pipeline", "current"):
            assert_same_logits(back, src_logits)


def test_padded_vocab_round_trips(tmp_path, hf_src):
    """NeoX pads the vocabulary (128 x TP); HF exports keep the padded rows unless trimmed, and
    those rows survive HF -> NeoX again unchanged."""
    model, src, src_logits = hf_src("llama-gqa")
    convert(src, tmp_path / "n1", to="neox", tp=2)
    convert(tmp_path / "n1", tmp_path / "h1", to="hf")
    t = hf_tensors(tmp_path / "h1")
    assert t["model.embed_tokens.weight"].shape[0] == 256 and t["lm_head.weight"].shape[0] == 256
    assert not t["model.embed_tokens.weight"][VOCAB:].any()
    assert_same_hf_weights(model, tmp_path / "h1", trimmed=False)
    assert_same_logits(tmp_path / "h1", src_logits)
    convert(tmp_path / "h1", tmp_path / "n2", to="neox", tp=2)
    for f in sorted((tmp_path / "n1" / "global_step0").glob("layer_*.pt")):
        a, b = torch.load(f), torch.load(tmp_path / "n2" / "global_step0" / f.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f.name


def test_neox_yaml_rebuilds_the_shapes(tmp_path, hf_src):
    """The written YAML makes current NeoX's ParallelMLP (§5.3) build exactly the stored shapes,
    carries num_kv_heads / sliding window, and the legacy schema uses mlp_type llama (T10)."""
    model, src, _ = hf_src("mistral")
    for tp, schema in ((2, "current"), (1, "current"), (2, "legacy")):
        out = tmp_path / f"n{tp}{schema}"
        convert(src, out, to="neox", tp=tp, schema=schema)
        tag = out / "global_step0"
        a = {k.replace("-", "_"): v for k, v in yaml.safe_load((tag / "configs" / "neoxconv.yml").read_text()).items()}
        layer = torch.load(tag / "layer_02-model_00-model_states.pt")
        # HF Mistral's window of 8 keys is NeoX flash's window_size (7, -1): the query + 7 earlier keys
        assert a["num_kv_heads"] == 2 and a["num_attention_heads"] == 8 and a["sliding_window_width"] == 7
        assert a["attention_config"] == [[["flash"], 2]]
        assert a["norm"] == "rmsnorm" and a["rms_norm_epsilon"] == model.config.rms_norm_eps
        assert a["use_bias_in_attn_linear"] is False
        # use_bias_in_mlp appeared in NeoX 2024-09, after the legacy names were gone
        assert a.get("use_bias_in_mlp", False) is False and (schema == "current") == ("use_bias_in_mlp" in a)
        if schema == "current":
            assert a["activation"] == "swiglu" and "mlp_type" not in a
            i, m = a["intermediate_size"], a["mlp_multiple_of"]
            f1 = int(i * 2 / 3)  # gated: F1 = int(I*2/3), F2 = F1 // 2, then rounded (NX transformer.py)
            f2 = f1 // 2
            f1 = (2 * m) * ((f1 + 2 * m - 1) // (2 * m))
            f2 = m * ((f2 + m - 1) // m)
            assert layer["mlp.linear1.weight"].shape[0] * tp == f1 == 2 * model.config.intermediate_size
            assert layer["mlp.linear2.weight"].shape[1] * tp == f2 == model.config.intermediate_size
        else:
            assert a["activation"] == "silu" and a["mlp_type"] == "llama"
            assert a["intermediate_size"] == model.config.intermediate_size == layer["mlp.w1.weight"].shape[0] * tp
            assert "attention.rotary_emb.inv_freq" in layer
    # an MHA model declares no num_kv_heads and is stored interleaved (NeoX's MHA path, T8)
    _, src_mha, _ = hf_src("llama-mha")
    res = convert(src_mha, tmp_path / "mha", to="neox", tp=2, qkv_layout="gqa_blocked")
    assert res["qkv_layout"] == "mha_interleaved"
    a = yaml.safe_load(next((tmp_path / "mha").glob("*/configs/neoxconv.yml")).read_text())
    assert "num-kv-heads" not in a


# --------------------------------------------------------------------------------------------
# NeoX Llama-style checkpoints assembled by hand -> HF (catches bug B4)


NEOX_HAND = [
    ("llama-mha", "mha_interleaved", 1, "current"),
    ("llama-mha", "mha_interleaved", 2, "current"),
    ("llama-mha-tied", "mha_interleaved", 4, "legacy"),
    ("llama-gqa", "gqa_blocked", 1, "current"),
    ("llama-gqa", "gqa_blocked", 2, "current"),
    ("llama-gqa-tied", "gqa_blocked", 2, "legacy"),
    ("llama-gqa", "gqa_fakehead", 2, "current"),
    ("llama-gqa", "gqa_fakehead", 1, "legacy"),
    ("mistral", "gqa_blocked", 2, "current"),
    ("mistral", "gqa_fakehead", 2, "legacy"),
]


@pytest.mark.parametrize("case,layout,tp,schema", NEOX_HAND, ids=["-".join(map(str, p)) for p in NEOX_HAND])
def test_hand_built_neox_exports_to_the_source_model(tmp_path, hf_src, case, layout, tp, schema):
    model, _, src_logits = hf_src(case)
    neox = save_neox_llama(tmp_path / "neox", model, tp, layout, schema, vocab_rows=128)
    reference_check(neox, layout, src_logits)
    out = tmp_path / "hf"
    # Unflagged defaults follow NeoX's history: legacy names -> fake-head GQA, current -> blocked.
    default = "gqa_fakehead" if schema == "legacy" else "gqa_blocked"
    convert(neox, out, to="hf", qkv_layout=None if layout in (default, "mha_interleaved") else layout)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [type(model).__name__]
    assert cfg["vocab_size"] == 128 and cfg["rms_norm_eps"] == model.config.rms_norm_eps
    assert cfg["tie_word_embeddings"] == model.config.tie_word_embeddings
    assert_same_hf_weights(model, out, trimmed=False)
    assert_same_logits(out, src_logits)


def test_wrong_layout_is_visible(tmp_path, hf_src):
    """The hand-built test can see layout bugs: an MHA model stored blocked (the B4 situation)
    or a fake-head GQA model read as blocked gives different logits."""
    model, _, src_logits = hf_src("llama-mha")
    ranks = neox_llama_ranks(model, 2, "gqa_blocked")  # what NeoX's HF importer writes for MHA
    neox = write_neox_checkpoint(tmp_path / "b4", ranks, neox_llama_config(model, 2))
    convert(neox, tmp_path / "b4-hf", to="hf")
    assert not torch.allclose(logits(load_hf(tmp_path / "b4-hf"), IDS)[..., :VOCAB], src_logits, atol=1e-3)
    model, _, src_logits = hf_src("llama-gqa")
    neox = save_neox_llama(tmp_path / "fh", model, 2, "gqa_fakehead")
    convert(neox, tmp_path / "fh-hf", to="hf")  # default: blocked
    assert not torch.allclose(logits(load_hf(tmp_path / "fh-hf"), IDS)[..., :VOCAB], src_logits, atol=1e-3)


def test_neox_config_defaults_and_arch(tmp_path, hf_src):
    model, _, _ = hf_src("llama-gqa")
    # rms_norm_epsilon missing from the YAML: NeoX's default 1e-8, not HF's 1e-6 (T12)
    neox = save_neox_llama(tmp_path / "noeps", model, 1, "gqa_blocked", eps=False)
    convert(neox, tmp_path / "noeps-hf", to="hf")
    assert json.loads((tmp_path / "noeps-hf" / "config.json").read_text())["rms_norm_eps"] == 1e-8
    # family: rmsnorm + gated -> llama; forced mistral -> no window, written as null
    neox = save_neox_llama(tmp_path / "l", model, 2, "gqa_blocked")
    convert(neox, tmp_path / "as-mistral", to="hf", family="mistral")
    cfg = json.loads((tmp_path / "as-mistral" / "config.json").read_text())
    assert cfg["model_type"] == "mistral" and "sliding_window" in cfg and cfg["sliding_window"] is None
    assert_same_logits(tmp_path / "as-mistral", logits(model, IDS))
    with pytest.raises(NeoxconvError, match="GPTNeoX cannot hold"):
        convert(neox, tmp_path / "as-neox", to="hf", family="gptneox")
    assert not (tmp_path / "as-neox").exists()
    # sliding window in the YAML -> mistral
    mistral, _, _ = hf_src("mistral")
    neox = save_neox_llama(tmp_path / "m", mistral, 2, "gqa_blocked")
    convert(neox, tmp_path / "m-hf", to="hf")
    cfg = json.loads((tmp_path / "m-hf" / "config.json").read_text())
    assert cfg["model_type"] == "mistral" and cfg["sliding_window"] == 8
    with pytest.raises(NeoxconvError, match="sliding-window"):
        convert(neox, tmp_path / "m-llama", to="hf", family="llama")
    # NeoX's default global attention trains with the same window (the training mask): a
    # model without attention_config keeps it, and the export computes what the original does
    neox = save_neox_llama(tmp_path / "mg", mistral, 2, "gqa_blocked", attention="global")
    assert not any("attention_config" in f.read_text().replace("-", "_") for f in neox.glob("*/configs/*.yml"))
    convert(neox, tmp_path / "mg-hf", to="hf")
    assert json.loads((tmp_path / "mg-hf" / "config.json").read_text())["sliding_window"] == 8
    assert_same_logits(tmp_path / "mg-hf", logits(mistral, IDS))


# --------------------------------------------------------------------------------------------
# HF config details


def test_hf_config_for_transformers_4_and_5(tmp_path, hf_src):
    model, src, _ = hf_src("llama-gqa-tied")
    convert(src, tmp_path / "n", to="neox", tp=2)
    convert(tmp_path / "n", tmp_path / "h", to="hf")
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["rope_theta"] == 10000.0 and cfg["rope_parameters"]["rope_theta"] == 10000.0
    assert cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 4 and cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert "lm_head.weight" not in hf_tensors(tmp_path / "h")


def test_biases_are_honoured(tmp_path):
    model = tiny_hf_model("llama", 3, attention_bias=True, mlp_bias=True)
    src = save_hf(model, tmp_path / "src")
    for schema in ("current", "legacy"):
        if schema == "legacy":
            with pytest.raises(NeoxconvError, match="no biases"):
                convert(src, tmp_path / "nl", to="neox", tp=2, schema=schema)
            continue
        convert(src, tmp_path / "n", to="neox", tp=2, schema=schema)
        convert(tmp_path / "n", tmp_path / "h", to="hf", trim_vocab_padding=True)
        cfg = json.loads((tmp_path / "h" / "config.json").read_text())
        assert cfg["attention_bias"] is True and cfg["mlp_bias"] is True
        assert_same_hf_weights(model, tmp_path / "h")
    with pytest.raises(NeoxconvError, match="HF Mistral.* has no attention and MLP biases"):
        convert(src, tmp_path / "m", to="hf", family="mistral")


def test_refused_hf_configs(tmp_path):
    bad_head = save_hf(tiny_hf_model("llama", 0, head_dim=16), tmp_path / "hd")
    with pytest.raises(NeoxconvError, match="head_dim 16 differs"):
        convert(bad_head, tmp_path / "o1", to="neox")
    scaled = save_hf(tiny_hf_model("llama", 0), tmp_path / "rs")
    cfg = json.loads((scaled / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (scaled / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NeoxconvError, match="RoPE scaling 'llama3'"):
        convert(scaled, tmp_path / "o2", to="neox")
    # a Mistral config.json without the key means HF's default window, 4096
    mistral = save_hf(tiny_hf_model("mistral", 0), tmp_path / "mw")
    cfg = json.loads((mistral / "config.json").read_text())
    del cfg["sliding_window"]
    (mistral / "config.json").write_text(json.dumps(cfg))
    convert(mistral, tmp_path / "o3", to="hf")
    assert json.loads((tmp_path / "o3" / "config.json").read_text())["sliding_window"] == 4096


# --------------------------------------------------------------------------------------------
# Meta raw Llama


META = [("llama-mha", 1, 1), ("llama-mha", 2, 1), ("llama-gqa", 2, 0), ("llama-gqa-tied", 2, 1), ("llama-gqa", 1, 0)]


@pytest.mark.parametrize("case,shards,embed_dim", META, ids=[f"{c}-{s}shard-emb{e}" for c, s, e in META])
def test_meta_to_hf_and_neox(tmp_path, hf_src, case, shards, embed_dim):
    model, _, src_logits = hf_src(case)
    sh, params = meta_shards(model, shards, embed_dim)
    meta = save_meta(tmp_path / "meta", sh, params)
    # the hand-built shards really are that model, in Meta semantics
    torch.testing.assert_close(meta_reference_logits(sh, params, IDS), src_logits, atol=1e-5, rtol=1e-5)
    convert(meta, tmp_path / "hf", to="hf")
    assert_same_hf_weights(model, tmp_path / "hf")
    assert_same_logits(tmp_path / "hf", src_logits)
    res = convert(meta, tmp_path / "neox", to="neox", tp=2, layout="sequential" if shards == 1 else "pipeline")
    reference_check(tmp_path / "neox", res["qkv_layout"], src_logits)
    convert(tmp_path / "neox", tmp_path / "hf2", to="hf", trim_vocab_padding=True)
    assert_same_hf_weights(model, tmp_path / "hf2")
    assert_same_logits(tmp_path / "hf2", src_logits)


@pytest.mark.parametrize("case", ["llama-mha", "llama-gqa-tied"])
def test_hf_meta_hf_bit_exact(tmp_path, hf_src, case):
    model, src, src_logits = hf_src(case)
    for shards, style in ((1, None), (2, None), (2, "llama2")):
        out = tmp_path / f"meta{shards}{style}"
        res = convert(src, out, to="meta", shards=shards, **({"style": style} if style else {}))
        params = json.loads((out / "params.json").read_text())
        assert "max_seq_len" not in params and params["vocab_size"] == VOCAB
        assert params["norm_eps"] == model.config.rms_norm_eps
        assert ("rope_theta" in params) == (style is None)
        files = [out / f"consolidated.{r:02d}.pth" for r in range(shards)]
        sh = [torch.load(f, weights_only=True) for f in files]  # plain dicts of tensors
        emb = sh[0]["tok_embeddings.weight"]
        assert tuple(emb.shape) == ((VOCAB, 32 // shards) if style == "llama2" and shards > 1 else (VOCAB // shards, 32))
        for sd in sh:  # compact per-rank copies, not views of a whole storage
            for name, t in sd.items():
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
        torch.testing.assert_close(meta_reference_logits(sh, params, IDS), src_logits, atol=1e-5, rtol=1e-5)
        assert res["embedding_split_dim"] == (None if shards == 1 else (1 if style else 0))
        back = tmp_path / f"back{shards}{style}"
        convert(out, back, to="hf")
        assert_same_hf_weights(model, back)


def test_meta_params_details(tmp_path, hf_src):
    model, _, src_logits = hf_src("llama-gqa")
    sh, params = meta_shards(model, 2, 1)
    # FFN formula disagreeing with the tensors: the shapes win, with a warning
    params = dict(params, multiple_of=256, ffn_dim_multiplier=None, rope_theta=10000.0)
    meta = save_meta(tmp_path / "meta", sh, params, tokenizer=True)
    ckpt = read_meta(meta)
    assert ckpt.spec.intermediate == 48 and any("FFN size 256" in w for w in ckpt.info["warnings"])
    assert ckpt.spec.vocab_rows == VOCAB and ckpt.spec.kv_heads == 2 and ckpt.spec.norm_eps == 1e-6
    assert ckpt.info["tokenizer"] == str(meta / "tokenizer.model") and ckpt.info["embedding_split_dim"] == 1
    assert "rope.freqs" in sh[0]  # present in the files, ignored by the reader
    # Meta -> Meta keeps the source's style and its FFN parameters where they fit
    res = convert(meta, tmp_path / "again", to="meta", shards=1)
    assert res["style"] == "llama2"
    bad = save_meta(tmp_path / "scaled", sh, dict(params, use_scaled_rope=True))
    with pytest.raises(NeoxconvError, match="use_scaled_rope"):
        convert(bad, tmp_path / "x", to="hf")
    wrong_kv = save_meta(tmp_path / "kv", sh, dict(params, n_kv_heads=4))
    with pytest.raises(NeoxconvError, match="wk.weight has 8 rows"):
        convert(wrong_kv, tmp_path / "y", to="hf")


def test_meta_refuses_what_it_cannot_hold(tmp_path, hf_src):
    _, src, _ = hf_src("mistral")
    with pytest.raises(NeoxconvError, match="sliding-window"):
        convert(src, tmp_path / "m", to="meta", shards=1)
    _, src, _ = hf_src("llama-gqa")
    with pytest.raises(NeoxconvError, match="--tp 4 does not divide the 2 KV heads"):
        convert(src, tmp_path / "m4", to="meta", shards=4)
    assert not (tmp_path / "m4").exists()


# --------------------------------------------------------------------------------------------
# command line


def run(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "neoxconv", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_llama_to_neox_and_back_to_meta(tmp_path, hf_src):
    model, src, src_logits = hf_src("llama-gqa")
    sh, params = meta_shards(model, 2, 0)
    meta = save_meta(tmp_path / "meta", sh, params)
    r = run("llama-to-neox", meta, tmp_path / "neox", "--tp", "2", "--layout", "sequential",
            "--qkv-layout", "gqa_fakehead", "--vocab-multiple", "64")
    assert r.returncode == 0, r.stderr
    nf = open_neox(tmp_path / "neox")
    assert nf.layout == "sequential" and nf.tp == 2 and nf.args["make_vocab_size_divisible_by"] == 64
    reference_check(tmp_path / "neox", "gqa_fakehead", src_logits)
    convert(tmp_path / "neox", tmp_path / "hf", to="hf", qkv_layout="gqa_fakehead", trim_vocab_padding=True)
    assert_same_hf_weights(model, tmp_path / "hf")
    r = run("convert", src, tmp_path / "meta2", "--to", "meta", "--tp", "2")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "meta2").iterdir()) == ["consolidated.00.pth", "consolidated.01.pth",
                                                                      "neoxconv-manifest.json", "params.json"]


def test_cli_tp_not_dividing_kv_heads(tmp_path, hf_src):
    _, src, _ = hf_src("llama-gqa")
    out = tmp_path / "out"
    r = run("hf-to-neox", src, out, "--tp", "4")
    assert r.returncode == 2, r.stderr
    text = r.stderr.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert "--tp 4" in text and "2 KV heads" in text, text
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "partial output left behind"


def test_neox_to_neox_migrates_fakehead_to_blocked(tmp_path):
    """A 2024 fake-head GQA checkpoint becomes a current (blocked) one in one convert, unchanged in values."""
    from neoxconv.formats.neox import read_neox

    model = tiny_hf_model("llama", seed=3, num_attention_heads=8, num_key_value_heads=2, hidden_size=64,
                          intermediate_size=96)
    src = save_hf(model, tmp_path / "hf")
    old, new, back = tmp_path / "old", tmp_path / "new", tmp_path / "back"
    convert(src, old, to="neox", tp=2, qkv_layout="gqa_fakehead")
    r = subprocess.run([sys.executable, "-m", "neoxconv", "convert", old, new, "--to", "neox", "--tp", "2",
                        "--qkv-layout", "gqa_fakehead", "--out-qkv-layout", "gqa_blocked"],
                       capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert r.returncode == 0, r.stderr
    assert read_neox(new).info["qkv_layout"] == "gqa_blocked"
    f_old = torch.load(next(old.glob("global_step*")) / "layer_02-model_00-model_states.pt", weights_only=True)
    f_new = torch.load(next(new.glob("global_step*")) / "layer_02-model_00-model_states.pt", weights_only=True)
    assert not torch.equal(f_old["attention.query_key_value.weight"], f_new["attention.query_key_value.weight"])
    convert(new, back, to="hf", trim_vocab_padding=True)
    a, b = hf_tensors(src), hf_tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("style,emb_shape", [("llama2", (96, 16)), ("llama3", (48, 32))])
def test_convert_to_meta_style_flag(tmp_path, style, emb_shape):
    model = tiny_hf_model("llama", seed=2)  # vocab 96, hidden 32
    src = save_hf(model, tmp_path / "hf")
    out = tmp_path / "meta"
    r = subprocess.run([sys.executable, "-m", "neoxconv", "convert", src, out, "--to", "meta", "--tp", "2",
                        "--meta-style", style], capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert r.returncode == 0, r.stderr
    shard = torch.load(out / "consolidated.01.pth", weights_only=True)
    assert tuple(shard["tok_embeddings.weight"].shape) == emb_shape
    back = tmp_path / "back"
    convert(out, back, to="hf")
    a, b = hf_tensors(src), hf_tensors(back)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_windowless_mistral_stays_mistral_through_neox(tmp_path):
    model = tiny_hf_model("mistral", seed=1, sliding_window=None)
    src = save_hf(model, tmp_path / "hf")
    convert(src, tmp_path / "neox", to="neox", tp=2)
    convert(tmp_path / "neox", tmp_path / "back", to="hf")
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["sliding_window"] is None
