"""Publishing through the conversion commands: tokenizer export, special ids, model card,
`--push-to-hub` to a local fake Hub (real huggingface_hub client), tokenizer copy on import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from hub_server import USER, VALID_TOKEN
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from fixtures.factories import save_hf, tiny_hf_model
from fixtures.neox_raw import random_rank_tensors, write_neox_checkpoint


def neox_bpe(path):
    """A byte-level BPE like NeoX's 20B_tokenizer.json: <|endoftext|> = 0, <|padding|> = 1."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "pythia checkpoints"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(path))
    return tok.get_vocab_size(with_added_tokens=True)


def run(*args, env=None):
    e = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "neoxconv", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=300)


def neox_with_tokenizer(root, rows):
    ranks = random_rank_tensors(tp=2, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=rows, tied=False)
    cfg = dict(num_layers=2, hidden_size=32, num_attention_heads=4, rotary_pct=0.25, gpt_j_residual=True,
               no_weight_tying=True, tokenizer_type="HFTokenizer", vocab_file="data/20B_tokenizer.json")
    save = write_neox_checkpoint(root / "ckpt", ranks, cfg)
    (save / "data").mkdir()
    n = neox_bpe(save / "data" / "20B_tokenizer.json")
    return save, n


def test_neox_to_hf_exports_tokenizer_card_and_pushes(tmp_path, fake_hub):
    save, n_tok = neox_with_tokenizer(tmp_path, rows=384)
    out = tmp_path / "hf"
    env = {"HF_ENDPOINT": fake_hub.url, "HF_TOKEN": VALID_TOKEN, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "hf_home")}
    r = run("neox-to-hf", save, out, "--push-to-hub", f"{USER}/tiny-neox", "--revision", "step1000", env=env)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 0, 1)  # T16, not HF's eos 2
    assert gen["eos_token_id"] == 0 and cfg["vocab_size"] == 384
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == n_tok and tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|padding|>"
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "gpt-neox" in front["tags"]
    assert front["pipeline_tag"] == "text-generation"
    assert "global_step1000" in card and "1000" in card and str(tmp_path) not in card  # provenance, no local paths
    # pushed: one commit on the new branch with every file of the export
    files = fake_hub.files(f"{USER}/tiny-neox", "step1000")
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert files["config.json"] == (out / "config.json").read_bytes()


def test_tokenizer_larger_than_embedding_is_refused(tmp_path):
    save, n_tok = neox_with_tokenizer(tmp_path, rows=256)
    assert n_tok > 256
    out = tmp_path / "hf"
    r = run("neox-to-hf", save, out)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "256" in r.stderr and not out.exists()


def test_hf_to_neox_copies_tokenizer_and_yaml_points_at_it(tmp_path):
    src = save_hf(tiny_hf_model("gptneox", vocab_size=384), tmp_path / "hf")
    n_tok = neox_bpe(src / "tokenizer.json")
    out = tmp_path / "neox"
    r = run("hf-to-neox", src, out, "--tp", "2")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(next(out.glob("global_step*/configs/neoxconv.yml")).read_text())
    assert cfg["tokenizer-type"] == "HFTokenizer"
    assert cfg["vocab-file"] == str((out / "tokenizer" / "tokenizer.json").resolve())
    assert Tokenizer.from_file(cfg["vocab-file"]).get_vocab_size(with_added_tokens=True) == n_tok
    back = tmp_path / "back"
    r = run("neox-to-hf", out, back)  # finds the tokenizer through the written YAML
    assert r.returncode == 0, r.stderr
    assert json.loads((back / "config.json").read_text())["pad_token_id"] == 1
    assert (back / "tokenizer.json").is_file()
    # the source's generation_config.json was only derived from GPTNeoXConfig's defaults (eos 2):
    # its ids follow the tokenizer (T16), its other values stay
    src_gen = json.loads((src / "generation_config.json").read_text())
    gen = json.loads((back / "generation_config.json").read_text())
    assert src_gen["_from_model_config"] and src_gen["eos_token_id"] == 2
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (0, 0, 1)
    assert {k: v for k, v in gen.items() if not k.endswith("token_id")} == \
        {k: v for k, v in src_gen.items() if not k.endswith("token_id")}


@pytest.mark.parametrize("bad", ["nonexistent/tok.json"])
def test_explicit_missing_tokenizer(tmp_path, bad):
    save, _ = neox_with_tokenizer(tmp_path, rows=384)
    out = tmp_path / "hf"
    r = run("neox-to-hf", save, out, "--tokenizer", tmp_path / bad)
    assert r.returncode == 2 and "tokenizer not found" in r.stderr and not out.exists()


def test_llama_to_neox_carries_tokenizer_model_to_the_hf_export(tmp_path):
    """Meta dir with a real SentencePiece tokenizer.model -> NeoX (tokenizer copied, YAML points
    at it) -> HF: a Llama tokenizer with bos 1 / eos 2 (T16) that encodes like sentencepiece."""
    import sentencepiece

    from fixtures.llama_factories import meta_shards, save_meta

    model = tiny_hf_model("llama", vocab_size=384)
    shards, params = meta_shards(model, shards=1, embed_dim=1)
    meta = save_meta(tmp_path / "meta", shards, params)
    corpus = ["the quick brown fox jumps over the lazy dog", "llama checkpoints move into neox and back"] * 30
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(meta / "tokenizer"),
                                             vocab_size=300, model_type="bpe", byte_fallback=True, minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(meta / "tokenizer.model"))
    neox = tmp_path / "neox"
    r = run("llama-to-neox", meta, neox, "--tp", "2")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(next(neox.glob("global_step*/configs/neoxconv.yml")).read_text())
    assert cfg["tokenizer-type"] == "SPMTokenizer"
    assert cfg["vocab-file"] == str((neox / "tokenizer" / "tokenizer.model").resolve())
    assert (neox / "tokenizer" / "tokenizer.model").read_bytes() == (meta / "tokenizer.model").read_bytes()
    hf = tmp_path / "hf"
    r = run("neox-to-hf", neox, hf)
    assert r.returncode == 0, r.stderr
    config = json.loads((hf / "config.json").read_text())
    gen = json.loads((hf / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    text = "the lazy fox moves into neox"
    assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert "llama" in yaml.safe_load((hf / "README.md").read_text().split("---")[1])["tags"]


def test_meta_llama3_tiktoken_tokenizer(tmp_path):
    """Meta Llama 3 dir whose tokenizer.model is a tiktoken file: --to hf converts it (Llama 3
    special tokens, bos/eos ids in config.json); llama-to-neox does not label it SPMTokenizer."""
    from test_tokenizer import TIKTOKEN_MERGES, write_tiktoken

    from fixtures.llama_factories import meta_shards, save_meta
    from neoxconv.convert import convert

    n = len(TIKTOKEN_MERGES) + 256
    model = tiny_hf_model("llama", vocab_size=(n + 256 + 15) // 16 * 16)  # rows split evenly over 2 shards
    shards, params = meta_shards(model, 2, 0)  # Llama 3 style: tok_embeddings split on dim 0
    meta = save_meta(tmp_path / "meta", shards, params)
    write_tiktoken(meta / "tokenizer.model")
    hf = tmp_path / "hf"
    r = run("convert", meta, hf, "--to", "hf")
    assert r.returncode == 0, r.stderr
    config = json.loads((hf / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (n, n + 1)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    assert len(tok) == n + 256 and tok.bos_token == "<|begin_of_text|>"
    neox = tmp_path / "neox"
    r = run("llama-to-neox", meta, neox, "--tp", "1")
    assert r.returncode == 0, r.stderr
    assert "WARNING" in r.stderr and "tiktoken" in r.stderr
    cfg = yaml.safe_load(next(neox.glob("global_step*/configs/neoxconv.yml")).read_text())
    assert "tokenizer-type" not in cfg and "vocab-file" not in cfg
    # a tiktoken file that cannot be converted: weights written, tokenizer skipped with a warning
    write_tiktoken(meta / "tokenizer.model", merges=(), single_bytes=range(96))
    res = convert(meta, tmp_path / "hf2", to="hf")
    assert any(w.startswith("WARNING: tokenizer not exported") for w in res["warnings"])
    assert (tmp_path / "hf2" / "config.json").is_file() and not (tmp_path / "hf2" / "tokenizer.json").exists()


def test_hf_to_neox_refuses_a_tokenizer_larger_than_the_embedding(tmp_path):
    src = save_hf(tiny_hf_model("gptneox", vocab_size=256), tmp_path / "hf")
    n_tok = neox_bpe(src / "tokenizer.json")
    assert n_tok > 256
    out = tmp_path / "neox"
    r = run("hf-to-neox", src, out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"tokenizer has {n_tok} tokens, more than the model's 256 embedding rows" in r.stderr
    assert not out.exists()


def test_neox_without_tokenizer_assumes_ids_out_loud(tmp_path):
    """No tokenizer and no record: the ids of NeoX's standard tokenizers (20B: 0/0), with a warning."""
    from neoxconv.convert import convert

    ranks = random_rank_tensors(tp=1, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=128, tied=False)
    save = write_neox_checkpoint(tmp_path / "ckpt", ranks, dict(num_layers=2, hidden_size=32, num_attention_heads=4,
                                                                 rotary_pct=0.25, no_weight_tying=True))
    res = convert(save, tmp_path / "hf", to="hf")
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (0, 0) and "pad_token_id" not in gen
    assert any("no tokenizer found" in w and "assumed" in w for w in res["warnings"])
