"""Reading NeoX checkpoints written the way GPT-NeoX/DeepSpeed writes them (not by neoxconv)."""

from __future__ import annotations

import pytest
import torch

from fixtures.neox_raw import random_rank_tensors, write_neox_checkpoint
from neoxconv.errors import NeoxconvError
from neoxconv.formats.neox import read_neox
from neoxconv.formats.neox_args import read_configs

CFG = dict(num_layers=2, hidden_size=32, num_attention_heads=4, rotary_pct=0.25, gpt_j_residual=True,
           no_weight_tying=True, bias_gelu_fusion=True, layernorm_epsilon="1e-5")


def _expected(ranks, i, tp, parallel):
    """The canonical layer, merged by hand from the per-rank dicts (MHA interleaved)."""
    s = ranks[i + 2]
    cat0 = lambda k: torch.cat([r[k] for r in s], 0)  # noqa: E731
    qkv = cat0("attention.query_key_value.weight").view(4, 3, 8, 32)
    biases = torch.stack([r["attention.dense.bias"].double() for r in s])
    bias = (biases.sum(0) if parallel else biases.mean(0)).float()
    return {
        "attn.q.weight": qkv[:, 0].reshape(32, 32), "attn.k.weight": qkv[:, 1].reshape(32, 32),
        "attn.v.weight": qkv[:, 2].reshape(32, 32),
        "attn.o.weight": torch.cat([r["attention.dense.weight"] for r in s], 1),
        "attn.o.bias": bias,
        "attn_norm.weight": torch.stack([r["input_layernorm.weight"] for r in s]).double().mean(0).float(),
        "mlp.up.weight": cat0("mlp.linear1.weight"),
        "mlp.down.weight": torch.cat([r["mlp.linear2.weight"] for r in s], 1),
    }


@pytest.mark.parametrize("layout", ["pipeline", "sequential"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_reads_deepspeed_written_checkpoint(tmp_path, layout, tp):
    ranks = random_rank_tensors(tp=tp, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=128, tied=False, seed=tp)
    save = write_neox_checkpoint(tmp_path / "ckpt", ranks, CFG, layout=layout, pp=2 if layout == "pipeline" else 1)
    ckpt = read_neox(save)
    spec = ckpt.spec
    assert (spec.layers, spec.hidden, spec.heads, spec.intermediate, spec.vocab_rows) == (2, 32, 4, 128, 128)
    assert spec.activation == "gelu_tanh" and spec.parallel_residual and not spec.tied
    assert spec.norm_eps == 1e-5 and isinstance(spec.norm_eps, float)  # PyYAML's '1e-5' string (T12)
    assert ckpt.info["layout"] == layout and ckpt.info["tp"] == tp and ckpt.info["iteration"] == 1000
    if layout == "pipeline":
        assert ckpt.info["pp"] == 2
    for i in range(2):
        got = ckpt.tensors.load_group(i)
        for leaf, t in _expected(ranks, i, tp, parallel=True).items():
            assert torch.equal(got[f"layers.{i}.{leaf}"], t), leaf
    emb = ckpt.tensors["embed.weight"].load()
    assert torch.equal(emb, torch.cat([r["word_embeddings.weight"] for r in ranks[0]]))
    head = ckpt.tensors["lm_head.weight"].load()
    assert torch.equal(head, torch.cat([r["final_linear.weight"] for r in ranks[6]]))


def test_sequential_residual_averages_row_bias_copies_and_legacy_names(tmp_path):
    ranks = random_rank_tensors(tp=2, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=128, tied=True, legacy=True)
    cfg = dict(CFG, gpt_j_residual=False, no_weight_tying=False)
    ckpt = read_neox(write_neox_checkpoint(tmp_path / "c", ranks, cfg))
    assert ckpt.info["schema"] == "legacy" and ckpt.spec.tied and "lm_head.weight" not in ckpt.tensors
    got = ckpt.tensors.load_group(1)
    copies = torch.stack([r["attention.dense.bias"].double() for r in ranks[3]])
    assert torch.equal(got["layers.1.attn.o.bias"], copies.mean(0).float())
    assert torch.equal(got["layers.1.mlp.up.weight"], torch.cat([r["mlp.dense_h_to_4h.weight"] for r in ranks[3]]))
    assert not any("inv_freq" in n for n in ckpt.tensors)


def test_shapes_win_over_yaml(tmp_path):
    """intermediate size and tying come from tensors, whatever the YAML claims (T10)."""
    ranks = random_rank_tensors(tp=1, layers=2, hidden=32, heads=4, ffn=96, vocab_rows=64, tied=True)
    cfg = dict(CFG, intermediate_size=4096, no_weight_tying=True)
    spec = read_neox(write_neox_checkpoint(tmp_path / "c", ranks, cfg)).spec
    assert spec.intermediate == 96 and spec.tied


def test_config_merge_hyphens_conflicts_and_numbers(tmp_path):
    a, b, c = tmp_path / "a.yml", tmp_path / "b.yml", tmp_path / "c.yml"
    a.write_text("num-layers: 2\nlayernorm-epsilon: 1e-5\nlr: 6.0e-4\n")
    b.write_text("num_layers: 2\nhidden_size: 32\n")
    merged, _ = read_configs([a, b])
    assert merged == {"num_layers": 2, "layernorm_epsilon": 1e-5, "lr": 6.0e-4, "hidden_size": 32}
    c.write_text("num_layers: 4\n")
    with pytest.raises(NeoxconvError, match=r"c\.yml: num_layers = 4 conflicts with 2 in .*a\.yml"):
        read_configs([a, b, c])


def test_pickles_are_loaded_without_running_code(tmp_path):
    """A pickle that would execute code is refused (weights_only + allowlist), and named."""
    ranks = random_rank_tensors(tp=1, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=128, tied=False)
    save = write_neox_checkpoint(tmp_path / "c", ranks, CFG)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = save / "global_step1000" / "layer_02-model_00-model_states.pt"
    sd = torch.load(bad, weights_only=True)
    sd["evil"] = Evil()
    torch.save(sd, bad)
    with pytest.raises(NeoxconvError, match=r"layer_02-model_00-model_states\.pt: cannot load checkpoint.*--trust-pickle"):
        read_neox(save)
    assert not marker.exists()


def test_unknown_tensors_and_norms_are_refused_not_dropped(tmp_path):
    ranks = random_rank_tensors(tp=2, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=128, tied=False)
    for idx in (2, 3):  # something neoxconv cannot map, in every layer on every rank (else: damage)
        for rank in ranks[idx]:
            rank["attention.qk_layernorm.weight"] = torch.ones(2, 8)
    save = write_neox_checkpoint(tmp_path / "c", ranks, CFG)
    with pytest.raises(NeoxconvError, match=r"layer_02-model_00-model_states\.pt: tensor 'attention\.qk_layernorm"):
        read_neox(save)
    ranks = random_rank_tensors(tp=1, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=128, tied=False)
    save = write_neox_checkpoint(tmp_path / "d", ranks, dict(CFG, norm="scalenorm"))
    with pytest.raises(NeoxconvError, match="norm 'scalenorm' in the config, but the layers store layernorm"):
        read_neox(save)


def test_gpt_j_residual_without_mlp_bias_needs_the_custom_export(tmp_path):
    """NeoX computes such layers without their attention output; no stock HF class does that, the
    custom export does (tests/test_custom_export.py proves its logits)."""
    ranks = random_rank_tensors(tp=1, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=128, tied=False,
                                mlp_bias=False)
    save = write_neox_checkpoint(tmp_path / "c", ranks, CFG)
    spec = read_neox(save).spec
    assert spec.family == "custom" and spec.parallel_residual and not spec.mlp_bias
    from neoxconv.convert import convert

    with pytest.raises(NeoxconvError, match="HF GPTNeoX cannot hold this model"):
        convert(save, tmp_path / "hf", to="hf", family="gptneox")
    assert not (tmp_path / "hf").exists()


def test_sliding_window_on_every_layer_type_plus_one(tmp_path):
    """NeoX trains W+1 keys on flash layers (window_size=(W, -1)) and on global ones (the
    training mask triu(diagonal=-W)) = HF sliding_window W+1; other attention types are refused."""
    from neoxconv.formats.neox_spec import hf_sliding_window

    assert hf_sliding_window({"sliding_window_width": 7, "attention_config": [[["flash"], 2]]}, 2, "x") == 8
    assert hf_sliding_window({"sliding_window_width": 7, "attention_config": [[["flash"], "all"]]}, 2, "x") == 8
    assert hf_sliding_window({"sliding_window_width": 7}, 2, "x") == 8  # default: global attention
    assert hf_sliding_window({"sliding_window_width": 7, "attention_config": [[["flash", "global"], 1]]}, 2, "x") == 8
    assert hf_sliding_window({"attention_config": [[["flash", "global"], 1]]}, 2, "x") is None
    with pytest.raises(NeoxconvError, match="sparse_fixed attention"):
        hf_sliding_window({"attention_config": [[["flash", "sparse_fixed"], 1]]}, 2, "x")


def test_recorded_qkv_layout_is_used_when_reading(tmp_path):
    """A checkpoint neoxconv wrote in the fake-head layout reads back as fake-head without a flag."""
    from neoxconv.convert import convert
    from neoxconv.tiny import tiny_hf_model

    tiny_hf_model("llama", num_attention_heads=8, num_key_value_heads=2, hidden_size=64,
                  intermediate_size=96).save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "fh", to="neox", tp=2, qkv_layout="gqa_fakehead")
    assert read_neox(tmp_path / "fh").info["qkv_layout"] == "gqa_fakehead"
    convert(tmp_path / "hf", tmp_path / "legacy", to="neox", tp=2, schema="legacy")
    assert read_neox(tmp_path / "legacy").info["qkv_layout"] == "gqa_fakehead"  # legacy names: 2024 GQA


def test_output_containing_the_source_is_refused(tmp_path):
    ranks = random_rank_tensors(tp=1, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=128, tied=False)
    save = write_neox_checkpoint(tmp_path / "save", ranks, CFG)
    from neoxconv.convert import convert

    with pytest.raises(NeoxconvError, match="must not be the source, inside it, or contain it"):
        convert(save / "global_step1000", save, to="neox", force=True)
    assert (save / "global_step1000" / "layer_02-model_00-model_states.pt").is_file()


def test_one_qkv_layout_rule():
    """neox_files.qkv_layout_for decides for the converter, parity and train-check alike."""
    from neoxconv.formats.neox_files import qkv_layout_for

    assert qkv_layout_for(8, 8, "legacy") == qkv_layout_for(8, 8, "current") == "mha_interleaved"
    assert qkv_layout_for(8, 2, "current") == "gqa_blocked"
    assert qkv_layout_for(8, 2, "legacy") == "gqa_fakehead"  # GQA came before the blocked layout
    assert qkv_layout_for(8, 2, "legacy", recorded="gqa_blocked") == "gqa_blocked"
    assert qkv_layout_for(8, 2, "current", declared="gqa_fakehead", recorded="gqa_blocked") == "gqa_fakehead"
    with pytest.raises(NeoxconvError, match="cannot hold 2 KV heads"):
        qkv_layout_for(8, 2, "current", declared="mha_interleaved")
    with pytest.raises(NeoxconvError, match="as many KV heads as heads"):
        qkv_layout_for(8, 8, "current", declared="gqa_blocked")
    with pytest.raises(NeoxconvError, match="unknown --qkv-layout"):
        qkv_layout_for(8, 2, "current", declared="blocked")
