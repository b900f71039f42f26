"""The streamed HF forward (`neoxconv.reference.hf_logits`: transformers' own model, one layer
group loaded at a time) equals `from_pretrained(dir, eager)(ids).logits` BIT FOR BIT: no
tolerance, since the same modules run the same weights in the same order.

Families: GPTNeoX parallel and sequential residual, tied and untied; Llama MHA and GQA, tied and
untied; Mistral GQA with a sliding window (8) shorter than the batch (20 tokens). Files: one
safetensors, sharded safetensors with an index, a pytorch_model.bin, and neoxconv's own export
(GPTNeoX `embed_out`, which transformers 5 renames to `lm_head`).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from neoxconv.convert import convert
from neoxconv.errors import NeoxconvError
from neoxconv.reference import hf_logits, hf_model_logits, load_hf_model, make_batch
from neoxconv.tiny import tiny_hf_model

torch.set_num_threads(2)
IDS = make_batch(90, 2, 20, seed=5)  # 20 tokens > Mistral's window of 8
CASES = {
    "gptneox-parallel-untied": ("gptneox", {}),
    "gptneox-sequential-tied": ("gptneox", {"use_parallel_residual": False, "tie_word_embeddings": True}),
    "llama-mha-untied": ("llama", {}),
    "llama-gqa-tied": ("llama", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "mistral-gqa-window": ("mistral", {"num_key_value_heads": 2}),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    base = tmp_path_factory.mktemp("streamed")
    out = {}
    for i, (case, (family, kw)) in enumerate(CASES.items()):
        model = tiny_hf_model(family, seed=30 + i, **kw)
        model.save_pretrained(base / case, max_shard_size="60KB" if case == "llama-gqa-tied" else "5GB")
        out[case] = base / case
    return out


def reference(path, dtype=torch.float32) -> torch.Tensor:
    return hf_model_logits(load_hf_model(path, dtype), IDS)


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_equals_from_pretrained_bit_for_bit(saved, case):
    got = hf_logits(saved[case], IDS)
    assert got.dtype == torch.float32 and got.shape == (2, 20, 100 if case.startswith("gptneox") else 96)
    assert torch.equal(got, reference(saved[case]))


def test_sharded_files_and_low_precision(saved):
    path = saved["llama-gqa-tied"]
    assert (path / "model.safetensors.index.json").is_file()
    for dtype in (torch.bfloat16, torch.float16):  # computed in that dtype, like from_pretrained(dtype=...)
        assert torch.equal(hf_logits(path, IDS, dtype), reference(path, dtype))


def test_pytorch_bin_and_neoxconv_export(saved, tmp_path):
    src = saved["gptneox-parallel-untied"]
    model = load_hf_model(src)
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((src / "config.json").read_text())
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, binary / "pytorch_model.bin")
    assert torch.equal(hf_logits(binary, IDS), reference(binary))
    neox, export = tmp_path / "neox", tmp_path / "export"
    convert(src, neox, to="neox", tp=2)
    convert(neox, export, to="hf")
    assert "embed_out.weight" in load_file(next(export.glob("*.safetensors")))  # the 4.x-compatible name
    assert torch.equal(hf_logits(export, IDS), reference(export))


def test_missing_tensor_is_named(saved, tmp_path):
    src = saved["llama-mha-untied"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(NeoxconvError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        hf_logits(broken, IDS)
