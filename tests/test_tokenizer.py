"""Tokenizer export/copy on real tokenizers built in the test (tokenizers BPE, SentencePiece, tiktoken)."""

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
    TiktokenUnsupported,
    apply_special_ids,
    copy_tokenizer_for_neox,
    export_tokenizer,
    find_neox_tokenizer,
    tokenizer_kind,
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


# --------------------------------------------------------------------------- tiktoken (Llama 3)

# Multi-byte tokens of a small tiktoken file, after the 256 single bytes; each one's halves exist.
TIKTOKEN_MERGES = (b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b"er", b" a", b"an", b"and", b" and",
                   b"  ", b"    ", b"12", b"123", b"\n\n", b"ou", b"qu", b"ic", b"ick", b"ow", b"own", b" b", b"ro")


def write_tiktoken(path: Path, merges=TIKTOKEN_MERGES, single_bytes=range(256)) -> int:
    """A real tiktoken BPE file, `<base64 token> <rank>` per line, as Meta ships for Llama 3.
    Single bytes get ranks in a shuffled (non-byte) order, as in real files."""
    import base64
    import random

    singles = [bytes([b]) for b in single_bytes]
    random.Random(0).shuffle(singles)
    tokens = singles + list(merges)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return len(tokens)


@pytest.fixture
def tiktoken_file(tmp_path) -> tuple[Path, int]:
    d = tmp_path / "meta"
    d.mkdir()
    return d / "tokenizer.model", write_tiktoken(d / "tokenizer.model")


def test_tokenizer_kind(neox_json, spm_model, tiktoken_file, tmp_path):
    tik, _ = tiktoken_file
    assert tokenizer_kind(spm_model) == "sentencepiece"
    assert tokenizer_kind(tik) == "tiktoken" and tokenizer_kind(tik.parent) == "tiktoken"
    assert tokenizer_kind(neox_json) == "hf-json"
    d = tmp_path / "hfdir"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(neox_json.read_bytes())
    (d / "tokenizer.model").write_bytes(tik.read_bytes())
    assert tokenizer_kind(d) == "hf-dir"
    other = tmp_path / "cl100k.tiktoken"
    other.write_bytes(tik.read_bytes())
    assert tokenizer_kind(other) == "tiktoken"  # by content, not by name


def test_tiktoken_to_fast_tokenizer(tiktoken_file, tmp_path):
    tik, n = tiktoken_file
    ranks = {t: r for r, t in enumerate([*[None] * 256, *TIKTOKEN_MERGES]) if t}
    info = export_tokenizer(tik, tmp_path / "hf", embedding_rows=n + 256 + 10, family="llama", model_max_length=64)
    assert info.kind == "tiktoken" and info.tokenizer_class == "PreTrainedTokenizerFast"
    assert info.vocab_size == n + 256 and info.padding_rows == 10
    assert (info.bos_token_id, info.eos_token_id, info.pad_token_id) == (n, n + 1, None)
    assert (tmp_path / "hf" / "original" / "tokenizer.model").read_bytes() == tik.read_bytes()
    assert not (tmp_path / "hf" / "tokenizer.model").exists()  # would pass for SentencePiece elsewhere
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    # the Llama 3 split (" the", " and" are pieces) and lowest-rank-first merging, by hand:
    ids = tok("the and", add_special_tokens=False)["input_ids"]
    assert ids == [ranks[b"the"], ranks[b" and"]]
    assert tok("the")["input_ids"] == [n, ranks[b"the"]]  # bos prepended
    assert tok.convert_ids_to_tokens([n, n + 1, n + 9]) == ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    assert tok.convert_ids_to_tokens(n + 8) == "<|reserved_special_token_4|>"  # Llama 3.0 names
    assert tok("<|eot_id|>", add_special_tokens=False)["input_ids"] == [n + 9]
    text = "Brown owls, 123 quick caf\u00e9s\n\nand \U0001f642"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.model_max_length == 64


def test_tiktoken_llama31_special_tokens_from_params(tiktoken_file, tmp_path):
    tik, n = tiktoken_file
    (tik.parent / "params.json").write_text(json.dumps({"dim": 32, "use_scaled_rope": True}))
    export_tokenizer(tik, tmp_path / "hf", embedding_rows=n + 256, family="llama")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.convert_ids_to_tokens([n + 4, n + 8, n + 9, n + 10, n + 255]) == [
        "<|finetune_right_pad_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|reserved_special_token_247|>"]


@pytest.mark.parametrize("case", ["incomplete", "too-many-tokens", "gap", "garbage"])
def test_tiktoken_unsupported_writes_nothing(tiktoken_file, tmp_path, case):
    tik, n = tiktoken_file
    rows = n + 256
    if case == "incomplete":  # 96 single bytes only: not a byte-level BPE
        write_tiktoken(tik, merges=(), single_bytes=range(96))
    elif case == "too-many-tokens":
        rows = n + 255
    elif case == "gap":
        tik.write_text(tik.read_text().replace(f" {n - 1}\n", f" {n + 5}\n"))
    else:
        tik.write_text(tik.read_text() + "not base64!! x\n")
    out = tmp_path / "hf"
    with pytest.raises(TiktokenUnsupported):
        export_tokenizer(tik, out, embedding_rows=rows, family="llama")
    assert not out.exists() or not any(out.iterdir())


def test_tiktoken_is_not_copied_for_neox(tiktoken_file, neox_json, tmp_path):
    tik, _ = tiktoken_file
    warnings: list[str] = []
    assert copy_tokenizer_for_neox(tik, tmp_path / "out", warnings=warnings) == {}
    assert len(warnings) == 1 and "tiktoken" in warnings[0] and "TiktokenTokenizer" in warnings[0]
    assert not (tmp_path / "out").exists()
    # an HF directory with a tiktoken tokenizer.model and a tokenizer.json: the JSON goes
    d = tmp_path / "hfdir"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(neox_json.read_bytes())
    (d / "tokenizer.model").write_bytes(tik.read_bytes())
    warnings.clear()
    keys = copy_tokenizer_for_neox(d, tmp_path / "out2", warnings=warnings)
    assert keys["tokenizer_type"] == "HFTokenizer" and keys["vocab_file"].endswith("tokenizer.json") and not warnings


TEXT = ("Checkpoints move between GPT-NeoX and Hugging Face: 20B, 1.4b & 6.9b models, trained for 143000 steps.\n\n"
        "  Leading spaces,\ttabs and    runs of spaces matter in code:\n    def f(x):\n        return x * 2\n"
        "Unicode too: café, naïve, Straße, 東京, Ελληνικά, emoji 🙂 — and numbers 1234567890.")


def tiktoken_ranks_from_bpe(path: Path) -> dict[bytes, int]:
    """A real tiktoken rank file: the 256 bytes, then the tokens of a byte-level BPE trained here,
    in merge order (how OpenAI's and Meta's files are built)."""
    import base64

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        import this  # the Zen of Python: real English text that ships with Python
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS + codecs.decode(this.s, "rot13").splitlines(), trainers.BpeTrainer(
        vocab_size=900, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    char_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for merge in json.loads(bpe.to_str())["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        ranks.setdefault(bytes(char_byte[c] for c in left + right), len(ranks))
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


def test_tiktoken_export_encodes_like_the_tiktoken_library(tmp_path):
    """The HF export of a tiktoken file (TikTokenConverter) against tiktoken's own encoder on real text."""
    from neoxconv.tokenizer import PROBE_TEXTS
    from neoxconv.tokenizer.llama3 import llama3_special_tokens, tiktoken_encoding

    d = tmp_path / "meta"
    d.mkdir()
    ranks = tiktoken_ranks_from_bpe(d / "tokenizer.model")
    assert len(ranks) - 256 >= 300  # a few hundred merges
    export_tokenizer(d / "tokenizer.model", tmp_path / "hf", embedding_rows=len(ranks) + 256, family="llama")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = tiktoken_encoding(ranks, llama3_special_tokens())
    for text in (TEXT, *SAMPLES, *CORPUS[:5], *PROBE_TEXTS):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == enc.encode(text, disallowed_special=()), text
        assert tok.decode(ids) == enc.decode(ids) == text
    assert len(tok(TEXT, add_special_tokens=False)["input_ids"]) < 0.75 * len(TEXT.encode())  # merges are used
    assert tok("<|eot_id|> hi", add_special_tokens=False)["input_ids"][0] == enc.encode(
        "<|eot_id|>", allowed_special="all")[0] == len(ranks) + 9


@pytest.mark.parametrize("extra", ["tiktoken", "sentencepiece"])
def test_missing_extra_is_named(extra, spm_model, tiktoken_file, tmp_path, monkeypatch):
    """Without the optional extra a kind needs, a one-line error names the extra (no silent fallback)."""
    import sys

    monkeypatch.setitem(sys.modules, extra, None)  # what Python does for a module that cannot be imported
    src, error = (tiktoken_file[0], TiktokenUnsupported) if extra == "tiktoken" else (spm_model, NeoxconvError)
    with pytest.raises(error, match=rf"needs the '{extra}' extra .*pip install 'neoxconv\[{extra}\]'"):
        export_tokenizer(src, tmp_path / "hf", embedding_rows=1024, family="llama")


def test_hf_dir_settings_and_record(tmp_path):
    """What an HF tokenizer directory records (tokenizer_config.json, special_tokens_map.json, named
    chat templates, generation_config.json) survives the neoxconv record unchanged."""
    from neoxconv.text_settings import GenerationSettings, TextSettings
    from neoxconv.tokenizer import hf_dir_settings

    d = tmp_path / "hf"
    d.mkdir()
    (d / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "</s>", "special": True}, "add_bos_token": True, "padding_side": "left",
        "chat_template": [{"name": "default", "template": "{{ x }}"}, {"name": "tool_use", "template": "{{ y }}"}],
        "added_tokens_decoder": {"5": {"content": "<tool>", "special": False, "normalized": True}}}))
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<ignored>"}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "temperature": 0.6,
                                                           "transformers_version": "4.40.0"}))
    text = hf_dir_settings(d)
    tok, gen = text.tokenizer, text.generation
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", None)
    assert tok.chat_templates() == {"default": "{{ x }}", "tool_use": "{{ y }}"}
    assert tok.option("add_bos_token") is True and tok.option("padding_side") == "left"
    assert [(t.id, t.content, t.special, t.normalized) for t in tok.added_tokens] == [(5, "<tool>", False, True)]
    assert gen.eos_ids == (2, 7) and gen.to_json() == {"temperature": 0.6, "eos_token_id": [2, 7]}
    again = TextSettings.from_record(json.loads(json.dumps(text.to_record())), "record")
    assert again == text
    # an eos added to a generation config transformers derived from config.json makes it a choice,
    # which the next conversion must not re-derive from the tokenizer
    derived = GenerationSettings.from_json({"_from_model_config": True, "eos_token_id": 2, "use_cache": True})
    chosen = derived.with_eos([5, 2])
    assert derived.derived and not chosen.derived
    assert chosen.to_json() == {"use_cache": True, "eos_token_id": [2, 5]}
    with pytest.raises(NeoxconvError, match="record: not a neoxconv-text-settings record"):
        TextSettings.from_record({"tokenizer": None}, "record")
