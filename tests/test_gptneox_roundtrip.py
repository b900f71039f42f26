"""HF GPTNeoX -> NeoX (any TP, both layouts, both schemas) -> HF is bit-exact; resharding
NeoX -> NeoX keeps every tensor; exports load in transformers with the source's logits."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import yaml

from fixtures.factories import hf_tensors, load_hf, logits, save_hf, tiny_hf_model, token_batch
from neoxconv.convert import convert

# 12 heads so that TP 1, 2, 3 and 4 all divide them; rotary on half the head dims.
# MLP 4 x hidden, the only size the legacy NeoX MLP had.
SHAPE = dict(hidden_size=48, num_attention_heads=12, intermediate_size=192, vocab_size=100, rotary_pct=0.5)
VARIANTS = [dict(tie_word_embeddings=t, use_parallel_residual=p, attention_bias=b)
            for t, p, b in itertools.product((False, True), (True, False), (True, False))]
# Each HF spelling of GELU comes back as itself (gelu_new and gelu_fast compute the same
# function with different rounding, so a bit-exact round trip must keep the name).
for v, act in zip(VARIANTS, ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu", "gelu_new", "gelu", "gelu")):
    v["hidden_act"] = act


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One saved HF model per variant (tied x residual x bias)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, v in enumerate(VARIANTS):
        model = tiny_hf_model("gptneox", seed=i, **SHAPE, **v)
        out[i] = (save_hf(model, root / f"v{i}"), model)
    return out


@pytest.mark.parametrize("variant", range(len(VARIANTS)), ids=lambda i: "-".join(f"{k[:4]}={v}" for k, v in VARIANTS[i].items()))
@pytest.mark.parametrize("tp,layout,schema", [(tp, lay, sch) for tp in (1, 2, 3, 4)
                                              for lay in ("pipeline", "sequential") for sch in ("current", "legacy")])
def test_hf_neox_hf_bit_exact(sources, tmp_path, variant, tp, layout, schema):
    src, _ = sources[variant]
    neox, back = tmp_path / "neox", tmp_path / "back"
    convert(src, neox, to="neox", tp=tp, layout=layout, schema=schema, vocab_multiple=8)
    convert(neox, back, to="hf", trim_vocab_padding=True)
    a, b = hf_tensors(src), hf_tensors(back)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    assert json.loads((back / "config.json").read_text())["hidden_act"] == VARIANTS[variant]["hidden_act"]
    tag = next(neox.glob("global_step*"))
    if layout == "pipeline":
        assert len(list(tag.glob("layer_02-model_*-model_states.pt"))) == tp
        assert len(list(tag.glob("mp_rank_*_model_states.pt"))) == tp
    else:
        assert not list(tag.glob("layer_*"))
        assert len(list(tag.glob("mp_rank_*_model_states.pt"))) == tp


def test_written_neox_files_follow_deepspeed_conventions(sources, tmp_path):
    src, _ = sources[0]  # untied, parallel residual, biases
    out = tmp_path / "neox"
    convert(src, out, to="neox", tp=2, pp=2, layout="pipeline", schema="legacy")
    tag = (out / "latest").read_text()
    assert tag == "global_step0"
    tag_dir = out / tag
    L = 2
    names = sorted(p.name for p in tag_dir.glob("layer_*"))
    # embedding 0, layers 2..L+1, final norm L+3, head L+4; none at 1 or L+2 (T1)
    expected = [0, *range(2, L + 2), L + 3, L + 4]
    assert {n.split("-")[0] for n in names} == {f"layer_{i:02d}" for i in expected} == {
        "layer_00", "layer_02", "layer_03", "layer_05", "layer_06"}
    # PP*TP model-states files with module=None in pipeline mode (T2)
    mp = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    assert len(mp) == 4
    state = torch.load(mp[3], weights_only=True)
    assert state["module"] is None and state["mp_world_size"] == 4 and state["dp_world_size"] == 1
    layer = torch.load(tag_dir / "layer_02-model_01-model_states.pt", weights_only=True)
    assert "mlp.dense_h_to_4h.weight" in layer and "attention.rotary_emb.inv_freq" in layer
    rot = int(48 // 12 * 0.5)
    expect = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    assert torch.equal(layer["attention.rotary_emb.inv_freq"], expect)
    # Row-parallel biases under a parallel residual are divided across ranks (T5).
    full = hf_tensors(src)["gpt_neox.layers.0.attention.dense.bias"]
    assert torch.allclose(layer["attention.dense.bias"] * 2, full)
    # Each tensor is saved on its own storage, not as a view of the full matrix.
    assert layer["attention.dense.weight"].untyped_storage().nbytes() == layer["attention.dense.weight"].numel() * 4
    cfg = yaml.safe_load((tag_dir / "configs" / "neoxconv.yml").read_text())
    assert cfg["model-parallel-size"] == 2 and cfg["pipe-parallel-size"] == 2
    assert cfg["num-layers"] == 2 and cfg["hidden-size"] == 48 and cfg["num-attention-heads"] == 12
    assert cfg["rotary-pct"] == 0.5 and cfg["gpt-j-residual"] is True and cfg["no-weight-tying"] is True
    assert cfg["finetune"] is True and cfg["make-vocab-size-divisible-by"] == 128
    assert cfg["norm"] == "layernorm" and cfg["layernorm-epsilon"] == 1e-5
    assert cfg["activation"] == "gelu" and cfg["bias-gelu-fusion"] is False


def test_reshard_tp2_tp4_tp1_keeps_the_model(sources, tmp_path):
    """NeoX tp=2 -> tp=4 -> tp=1 -> HF equals the original, vocab padding changing on the way."""
    src, model = sources[2]  # untied, sequential residual, biases: row biases copied, not divided
    t2, t4, t1, hf = (tmp_path / n for n in ("t2", "t4", "t1", "hf"))
    convert(src, t2, to="neox", tp=2, vocab_multiple=8)  # 100 -> 112 rows
    convert(t2, t4, to="neox", tp=4, layout="sequential", vocab_multiple=8)  # -> 128 rows
    convert(t4, t1, to="neox", tp=1, vocab_multiple=8)  # -> 104 rows (trimmed, never below 100)
    rows = []
    for d, tp in ((t2, 2), (t4, 4), (t1, 1)):
        tag = next(d.glob("global_step*"))
        f = tag / ("layer_00-model_00-model_states.pt" if (tag / "layer_00-model_00-model_states.pt").exists()
                   else "mp_rank_00_model_states.pt")
        sd = torch.load(f, weights_only=True)
        emb = sd["word_embeddings.weight"] if "word_embeddings.weight" in sd else sd["module"]["sequential.0.word_embeddings.weight"]
        rows.append(emb.shape[0] * tp)
    assert rows == [112, 128, 104]
    convert(t1, hf, to="hf")
    exported = hf_tensors(hf)
    original = hf_tensors(src)
    for name, t in original.items():
        got = exported[name]
        if name in ("gpt_neox.embed_in.weight", "embed_out.weight"):
            assert got.shape[0] == 104 and torch.equal(got[104 - 4:], torch.zeros(4, 48))
            got = got[:100]
        assert torch.equal(got, t), name
    ids = token_batch(100)
    torch.testing.assert_close(logits(load_hf(hf), ids)[..., :100], logits(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("variant", [0, 3, 5], ids=["untied-par-bias", "untied-seq-nobias", "tied-par-nobias"])
def test_export_loads_in_transformers_with_source_logits(sources, tmp_path, variant):
    src, model = sources[variant]
    neox, back = tmp_path / "neox", tmp_path / "back"
    convert(src, neox, to="neox", tp=2)
    convert(neox, back, to="hf", max_shard_size=20_000)  # forces several safetensors shards
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    cfg = json.loads((back / "config.json").read_text())
    # Readable by transformers 4.x too: top-level rope keys, 4.x head name.
    assert cfg["rotary_pct"] == 0.5 and cfg["rotary_emb_base"] == 10000
    assert cfg["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert ("embed_out.weight" in index["weight_map"]) == (not VARIANTS[variant]["tie_word_embeddings"])
    exported = load_hf(back)
    ids = token_batch(100, batch=2, tokens=16)
    ref = logits(model, ids)
    got = logits(exported, ids)
    assert got.shape[-1] == 256  # padded to 128 x TP rows; padding kept by default
    assert torch.equal(got[..., :100], ref)


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_option_casts_outputs(sources, tmp_path, dtype, torch_dtype):
    src, _ = sources[0]
    convert(src, tmp_path / "neox", to="neox", tp=2, dtype=dtype)
    convert(tmp_path / "neox", tmp_path / "hf", to="hf", trim_vocab_padding=True)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["dtype"] == str(torch_dtype).removeprefix("torch.")
    got = hf_tensors(tmp_path / "hf")
    for name, t in hf_tensors(src).items():
        assert got[name].dtype == torch_dtype
        assert torch.equal(got[name], t.to(torch_dtype)), name


def test_mlp_sizes_neox_cannot_rebuild_are_refused(tmp_path):
    """Current NeoX cannot build an odd MLP (linear1 rounds to 2*m, linear2 to m); the legacy
    MLP (NeoX before 2024-09) is always 4 x hidden with biases (§5.3)."""
    from neoxconv.errors import NeoxconvError

    odd = save_hf(tiny_hf_model("gptneox", intermediate_size=63), tmp_path / "odd")
    with pytest.raises(NeoxconvError, match="odd size 63"):
        convert(odd, tmp_path / "neox", to="neox")
    with pytest.raises(NeoxconvError, match=r"legacy NeoX MLP is always 4 x hidden \(128\)"):
        convert(odd, tmp_path / "neox", to="neox", schema="legacy")
    assert not (tmp_path / "neox").exists()
    even = save_hf(tiny_hf_model("gptneox", intermediate_size=64), tmp_path / "even")
    convert(even, tmp_path / "neox", to="neox")  # current schema holds any even size
    convert(tmp_path / "neox", tmp_path / "back", to="hf", trim_vocab_padding=True)
    a, b = hf_tensors(even), hf_tensors(tmp_path / "back")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lowering_tp_without_a_known_vocab_pins_the_rows(tmp_path):
    """A NeoX checkpoint with no tokenizer and no record of its real vocab: rows padded for TP 2
    cannot be trimmed, so the YAML must make NeoX rebuild exactly those rows at TP 1."""
    from fixtures.neox_raw import random_rank_tensors, write_neox_checkpoint
    from neoxconv.formats.neox_args import read_configs

    ranks = random_rank_tensors(tp=2, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=256, tied=False)
    src = write_neox_checkpoint(tmp_path / "tp2", ranks, dict(num_layers=2, hidden_size=32, num_attention_heads=4,
                                                              make_vocab_size_divisible_by=128))
    convert(src, tmp_path / "tp1", to="neox", tp=1)
    cfg, _ = read_configs([next((tmp_path / "tp1").glob("global_step*/configs/neoxconv.yml"))])
    emb = torch.load(next((tmp_path / "tp1").glob("global_step*/layer_00-model_00-model_states.pt")),
                     weights_only=True)["word_embeddings.weight"]
    assert emb.shape[0] == 256
    # NeoX: padded = roundup(tokenizer size, multiple * TP); any tokenizer <= 256 gives 256 rows
    multiple = cfg["make_vocab_size_divisible_by"] * cfg["model_parallel_size"]
    assert all(-(-v // multiple) * multiple == 256 for v in (1, 100, 200, 256))


def test_written_yaml_is_block_style_and_parses_back(tmp_path, sources):
    src, _ = sources[0]
    convert(src, tmp_path / "neox", to="neox", tp=2)
    text = next((tmp_path / "neox").glob("global_step*/configs/neoxconv.yml")).read_text()
    assert "{" not in text  # one key per line, readable and diffable
    from neoxconv.formats.neox_args import read_configs

    cfg, _ = read_configs([next((tmp_path / "neox").glob("global_step*/configs/neoxconv.yml"))])
    assert cfg["model_parallel_size"] == 2 and cfg["layernorm_epsilon"] == 1e-5


@pytest.mark.parametrize("sharded", [False, True])
def test_reads_pytorch_model_bin(tmp_path, sharded):
    """Older HF dirs hold pickled pytorch_model*.bin files (loaded with weights_only=True)."""
    model = tiny_hf_model("gptneox", seed=7)
    src = tmp_path / "bin"
    src.mkdir()
    model.config.save_pretrained(src)
    sd = {("embed_out.weight" if k == "lm_head.weight" else k): v.clone() for k, v in model.state_dict().items()}
    if sharded:
        names = sorted(sd)
        half = len(names) // 2
        files = {"pytorch_model-00001-of-00002.bin": names[:half], "pytorch_model-00002-of-00002.bin": names[half:]}
        for f, keys in files.items():
            torch.save({k: sd[k] for k in keys}, src / f)
        (src / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: f for f, keys in files.items() for k in keys}}))
    else:
        torch.save(sd, src / "pytorch_model.bin")
    convert(src, tmp_path / "neox", to="neox", tp=2)
    convert(tmp_path / "neox", tmp_path / "hf", to="hf", trim_vocab_padding=True)
    got = hf_tensors(tmp_path / "hf")
    assert got.keys() == sd.keys()
    assert all(torch.equal(got[k], sd[k]) for k in sd)
