"""Tokenizer export/copy on real tokenizers built in the test (tokenizers BPE, SentencePiece)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer

from neoxconv.errors import NeoxconvError
from neoxconv.tokenizer import (
    NEOX_EOD,
    NEOX_PAD,
    apply_special_ids,
    copy_tokenizer_for_neox,
    export_tokenizer,
    find_neox_tokenizer,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "GPT-NeoX checkpoints convert to Hugging Face and back again.",
    "Pythia models were trained on the Pile, one checkpoint every 1000 steps.",
    "def forward(self, x):\n    return self.dense(x)  # four spaces",
    "Caf\u00e9 na\u00efve \u00fcber Stra\u00dfe \u6771\u4eac",
] * 20

SAMPLES = [
    "The lazy dog jumps over the quick brown fox.",
    "  two leading spaces and\ttabs",
    "def f(x):\n        return x",
    "na\u00efve caf\u00e9" + NEOX_EOD + "next document",
    "unseen words: zyxwv qqq \U0001f642",
]


def _neox_style_json(path: Path, specials=(NEOX_EOD, NEOX_PAD), vocab_size=420) -> Path:
    """A byte-level BPE shaped like NeoX's 20B_tokenizer.json (NFC, ByteLevel, space-run tokens)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    # like ids 50254-50276 of the 20B tokenizer: runs of spaces as (non-special) added tokens
    tok.add_tokens([AddedToken(" " * n, normalized=False) for n in (8, 4, 3, 2)])
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def neox_json(tmp_path_factory) -> Path:
    return _neox_style_json(tmp_path_factory.mktemp("tok") / "20B_style_tokenizer.json")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    import sentencepiece  # in the test extras: trains a real SentencePiece model
    d = tmp_path_factory.mktemp("spm")
    # Llama-style settings: BPE, byte fallback, identity normalization, whitespace kept
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(d / "tokenizer"),
        vocab_size=360,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return d / "tokenizer.model"


# ----------------------------------------------------------------------------- JSON (HFTokenizer)


def test_json_export_roundtrip(neox_json, tmp_path):
    raw = Tokenizer.from_file(str(neox_json))
    n = raw.get_vocab_size(with_added_tokens=True)
    info = export_tokenizer(neox_json, tmp_path / "hf", embedding_rows=n + 11, family="gpt-neox")

    assert info.kind == "hf-json"
    assert info.tokenizer_class.startswith("GPTNeoXTokenizer")
    assert info.vocab_size == n
    assert (info.bos_token_id, info.eos_token_id, info.unk_token_id, info.pad_token_id) == (0, 0, 0, 1)
    assert info.padding_rows == 11 and info.embedding_rows == n + 11
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(info.files)
    assert info.warnings == []

    again = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(again) == n
    assert again.eos_token == NEOX_EOD and again.pad_token == NEOX_PAD and again.bos_token == NEOX_EOD
    for text in SAMPLES:
        ids = again(text, add_special_tokens=False)["input_ids"]
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert again.decode(ids) == text
    # the document separator is one token, id 0, as in NeoX's HFTokenizer
    assert NEOX_EOD in SAMPLES[3] and again(SAMPLES[3], add_special_tokens=False)["input_ids"].count(0) == 1
    # runs of spaces map onto the added space tokens
    assert raw.token_to_id(" " * 8) in again(SAMPLES[2], add_special_tokens=False)["input_ids"]


def test_json_export_exact_fit_and_model_max_length(neox_json, tmp_path):
    n = Tokenizer.from_file(str(neox_json)).get_vocab_size(with_added_tokens=True)
    info = export_tokenizer(neox_json, tmp_path, embedding_rows=n, family="gpt-neox", model_max_length=2048)
    assert info.padding_rows == 0
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 2048


def test_json_export_larger_than_embedding_is_an_error(neox_json, tmp_path):
    n = Tokenizer.from_file(str(neox_json)).get_vocab_size(with_added_tokens=True)
    with pytest.raises(NeoxconvError, match=rf"{n} tokens but the model's embedding has only {n - 1} rows"):
        export_tokenizer(neox_json, tmp_path / "out", embedding_rows=n - 1, family="gpt-neox")
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_json_without_padding_token_adds_nothing(tmp_path):
    src = _neox_style_json(tmp_path / "nopad.json", specials=(NEOX_EOD,))
    n = Tokenizer.from_file(str(src)).get_vocab_size(with_added_tokens=True)
    info = export_tokenizer(src, tmp_path / "hf", embedding_rows=n + 3, family="gpt-neox")
    assert info.vocab_size == n  # no <|padding|> invented
    assert info.pad_token_id is None and info.eos_token_id == 0


def test_json_with_other_pipeline_uses_generic_fast_class(tmp_path):
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "</s>", "<s>"], show_progress=False))
    src = tmp_path / "ws.json"
    tok.save(str(src))
    info = export_tokenizer(src, tmp_path / "hf", embedding_rows=320, family="llama")
    assert info.tokenizer_class == "PreTrainedTokenizerFast"
    assert info.eos_token_id == tok.token_to_id("</s>") and info.bos_token_id == tok.token_to_id("<s>")
    assert info.warnings  # no <|endoftext|>: the guessed specials are reported
    again = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in SAMPLES:
        assert again(text, add_special_tokens=False)["input_ids"] == tok.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize(
    "content, match",
    [('{"hello": 0, "world": 1}', "not a Hugging Face tokenizers JSON"), ("{not json", "not a readable JSON")],
)
def test_bad_json_sources(tmp_path, content, match):
    src = tmp_path / "vocab.json"
    src.write_text(content)
    with pytest.raises(NeoxconvError, match=match):
        export_tokenizer(src, tmp_path / "out", embedding_rows=100, family="gpt-neox")


def test_missing_or_unknown_source(tmp_path):
    with pytest.raises(NeoxconvError, match="tokenizer not found"):
        export_tokenizer(tmp_path / "nope.json", tmp_path / "out", embedding_rows=10, family="gpt-neox")
    (tmp_path / "merges.txt").write_text("a b\n")
    with pytest.raises(NeoxconvError, match="unknown tokenizer format"):
        export_tokenizer(tmp_path / "merges.txt", tmp_path / "out", embedding_rows=10, family="gpt-neox")


def test_hf_directory_source(neox_json, tmp_path):
    n = Tokenizer.from_file(str(neox_json)).get_vocab_size(with_added_tokens=True)
    first = export_tokenizer(neox_json, tmp_path / "a", embedding_rows=n, family="gpt-neox")
    second = export_tokenizer(tmp_path / "a", tmp_path / "b", embedding_rows=n + 1, family="gpt-neox")
    assert second.kind == "hf-dir"
    assert (second.bos_token_id, second.eos_token_id, second.pad_token_id) == (first.bos_token_id, first.eos_token_id, first.pad_token_id)
    assert second.padding_rows == 1
    with pytest.raises(NeoxconvError, match="embedding has only"):
        export_tokenizer(tmp_path / "a", tmp_path / "c", embedding_rows=n - 1, family="gpt-neox")


def test_apply_special_ids(neox_json, tmp_path):
    info = export_tokenizer(neox_json, tmp_path, embedding_rows=512, family="gpt-neox")
    config = {"vocab_size": 512, "eos_token_id": 2, "bos_token_id": 2}
    gen = {"eos_token_id": 2}
    out_cfg, out_gen = apply_special_ids(config, gen, info)
    assert out_cfg is config and out_gen is gen
    assert config == {"vocab_size": 512, "eos_token_id": 0, "bos_token_id": 0, "pad_token_id": 1}
    assert gen == {"eos_token_id": 0, "bos_token_id": 0, "pad_token_id": 1}


# ----------------------------------------------------------------------------- SentencePiece (SPMTokenizer)


def test_sentencepiece_to_llama_tokenizer(spm_model, tmp_path):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    info = export_tokenizer(spm_model, tmp_path / "hf", embedding_rows=384, family="llama")

    assert info.kind == "sentencepiece"
    assert info.tokenizer_class.startswith("LlamaTokenizer")
    # Llama convention (trap T16): bos 1, eos 2 from the SentencePiece model, not NeoX's eod
    assert (info.bos_token_id, info.eos_token_id, info.unk_token_id, info.pad_token_id) == (1, 2, 0, None)
    assert info.vocab_size == sp.get_piece_size() == 360 and info.padding_rows == 24
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == spm_model.read_bytes()

    again = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (again.bos_token, again.eos_token, again.unk_token) == ("<s>", "</s>", "<unk>")
    for text in [s for s in SAMPLES if not s[:1].isspace()]:
        ids = again(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text), text
        assert again.decode(ids) == sp.decode(sp.encode(text))
    assert again("hello world")["input_ids"][0] == 1  # bos is prepended, eos is not
    assert again("hello world")["input_ids"][-1] != 2


def test_sentencepiece_directory_source_and_size_check(spm_model, tmp_path):
    d = tmp_path / "neox_tok"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(spm_model.read_bytes())
    info = export_tokenizer(d, tmp_path / "hf", embedding_rows=360, family="llama")
    assert info.kind == "sentencepiece" and info.padding_rows == 0
    with pytest.raises(NeoxconvError, match="360 tokens but the model's embedding has only 300 rows"):
        export_tokenizer(d, tmp_path / "hf2", embedding_rows=300, family="llama")


def test_corrupt_sentencepiece_model(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x0a\xff\xff\xff\xff\x0f garbage")
    with pytest.raises(NeoxconvError, match="SentencePiece"):
        export_tokenizer(bad, tmp_path / "out", embedding_rows=10, family="llama")


# ----------------------------------------------------------------------------- NeoX side


def test_find_neox_tokenizer(neox_json, spm_model, tmp_path):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    ckpt = run / "checkpoints" / "global_step100"
    ckpt.mkdir(parents=True)
    js = run / "data" / "20B_tokenizer.json"
    js.write_bytes(neox_json.read_bytes())
    sp = run / "data" / "tokenizer.model"
    sp.write_bytes(spm_model.read_bytes())

    assert find_neox_tokenizer({"tokenizer_type": "HFTokenizer", "vocab_file": "data/20B_tokenizer.json"}, run) == js.resolve()
    # hyphenated key, path relative to a parent of the checkpoint directory
    assert find_neox_tokenizer({"tokenizer-type": "HFTokenizer", "vocab-file": "data/20B_tokenizer.json"}, ckpt) == js.resolve()
    assert find_neox_tokenizer({"tokenizer_type": "SPMTokenizer", "vocab_file": str(sp)}, ckpt) == sp.resolve()
    # type/extension mismatch, unsupported types, missing files, no vocab_file
    assert find_neox_tokenizer({"tokenizer_type": "SPMTokenizer", "vocab_file": "data/20B_tokenizer.json"}, run) is None
    assert find_neox_tokenizer({"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "data/gpt2-vocab.json"}, run) is None
    assert find_neox_tokenizer({"tokenizer_type": "HFTokenizer", "vocab_file": "/nowhere/tok.json"}, run) is None
    assert find_neox_tokenizer({"tokenizer_type": "HFTokenizer"}, run) is None
    # a tokenizer copied next to the checkpoint is found by name
    (ckpt / "20B_tokenizer.json").write_bytes(neox_json.read_bytes())
    found = find_neox_tokenizer({"tokenizer_type": "HFTokenizer", "vocab_file": "/old/cluster/path/20B_tokenizer.json"}, ckpt)
    assert found == (ckpt / "20B_tokenizer.json").resolve()


def test_copy_tokenizer_for_neox(neox_json, spm_model, tmp_path):
    hf = tmp_path / "hf"
    export_tokenizer(neox_json, hf, embedding_rows=512, family="gpt-neox")
    keys = copy_tokenizer_for_neox(hf, tmp_path / "neox")
    assert keys["tokenizer_type"] == "HFTokenizer"
    copied = Path(keys["vocab_file"])
    assert copied.is_absolute() and copied.parent == (tmp_path / "neox").resolve() and copied.name == "tokenizer.json"
    # what NeoX's HFTokenizer does with it: Tokenizer.from_file, eod = <|endoftext|>, pad = <|padding|>
    neox = Tokenizer.from_file(keys["vocab_file"])
    assert neox.token_to_id(NEOX_EOD) == 0 and neox.token_to_id(NEOX_PAD) == 1
    assert neox.encode(SAMPLES[0]).ids == Tokenizer.from_file(str(neox_json)).encode(SAMPLES[0]).ids

    llama = tmp_path / "llama"
    export_tokenizer(spm_model, llama, embedding_rows=400, family="llama")
    keys = copy_tokenizer_for_neox(llama, tmp_path / "neox_llama")
    assert keys["tokenizer_type"] == "SPMTokenizer"
    assert Path(keys["vocab_file"]).read_bytes() == spm_model.read_bytes()

    assert copy_tokenizer_for_neox(neox_json, tmp_path / "neox2")["tokenizer_type"] == "HFTokenizer"
    assert copy_tokenizer_for_neox(spm_model, tmp_path / "neox3")["tokenizer_type"] == "SPMTokenizer"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NeoxconvError, match="no tokenizer.json or tokenizer.model"):
        copy_tokenizer_for_neox(empty, tmp_path / "x")


def test_sentencepiece_unigram_uses_generic_class(tmp_path):
    import sentencepiece  # in the test extras: trains a real SentencePiece model
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "uni"), vocab_size=330, model_type="unigram",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        hard_vocab_limit=False, minloglevel=2,
    )
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "uni.model"))
    info = export_tokenizer(tmp_path / "uni.model", tmp_path / "hf", embedding_rows=512, family="llama")
    assert info.tokenizer_class == "PreTrainedTokenizerFast" and info.warnings == []
    assert (info.bos_token_id, info.eos_token_id) == (sp.bos_id(), sp.eos_id()) == (1, 2)
    again = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in SAMPLES:  # the generic class reproduces sentencepiece even for leading whitespace
        assert again(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
