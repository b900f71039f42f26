"""Issue 9: a real instruct model keeps its behaviour through HF -> NeoX (TP 3) -> HF: where generate()
stops, its chat template, its generation_config.json and its special tokens; and --eos-token /
--chat-template set them for a Meta Llama 3 source whose files do not say it is Instruct."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from neoxconv.convert import convert

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["<|im_start|>user\nWhat does a checkpoint converter do?<|im_end|>",
          "<|im_start|>assistant\nIt moves the weights of a model between training and inference formats.<|im_end|>",
          "The quick brown fox jumps over the lazy dog; tensor parallel shards are merged and split again.",
          "Instruct models stop generating when they emit their end-of-turn token."] * 8
MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "What is a checkpoint?"}]
MAX_NEW = 10
ROWS = 384  # = NeoX's vocab padding at --tp 3 (128 x 3): no padded rows whose zero logits could win


def chat_tokenizer(out: Path):
    """A real byte-level BPE (a few hundred merges) with ChatML special tokens, as SmolLM2-Instruct:
    <|endoftext|> = 0 (unk), <|im_start|> = 1 (bos), <|im_end|> = 2 (eos and pad)."""
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=ROWS - 8, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHATML,
                                  model_max_length=2048)
    tok.save_pretrained(out)
    assert len(tok) - 256 - 3 >= 100  # over a hundred merges on top of the 256 bytes and the 3 specials
    return tok


def prompt_ids(tok) -> torch.Tensor:
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False, return_tensors="pt").input_ids


def continuation(model, tok) -> list[int]:
    ids = prompt_ids(tok)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def instruct(tmp_path_factory) -> Path:
    """A tiny seeded Llama GQA chat model (9 heads / 3 KV heads, tied embeddings, bf16) whose greedy
    answer to MESSAGES ends with <|im_end|> before MAX_NEW tokens."""
    src = tmp_path_factory.mktemp("instruct") / "src"
    tok = chat_tokenizer(src)
    cfg = LlamaConfig(vocab_size=ROWS, hidden_size=72, num_hidden_layers=2, num_attention_heads=9,
                      num_key_value_heads=3, intermediate_size=96, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)  # pad 2 would zero row 2
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    emb = model.get_input_embeddings().weight
    base = emb[2].clone()
    # Raise <|im_end|>'s logit (its tied lm_head row) until the greedy answer stops on its own.
    for scale in (4, 6, 8, 10, 12, 14, 16, 20, 24):
        with torch.no_grad():
            emb[2] = base * scale
        out = continuation(model, tok)
        if 2 <= len(out) < MAX_NEW and out[-1] == 2 and 2 not in out[:-1]:
            break
    else:
        raise AssertionError("no scale of the eos row makes the seeded model stop")
    model.save_pretrained(src)
    return src


def generation_values(d: Path) -> dict:
    gen = json.loads((d / "generation_config.json").read_text())
    gen.pop("transformers_version")
    return gen


def specials(tok) -> dict:
    return {k: (getattr(tok, k), getattr(tok, f"{k}_id")) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}


def test_instruct_model_roundtrip_tp3_keeps_chat_and_stopping(instruct, tmp_path):
    neox, back = tmp_path / "neox", tmp_path / "back"
    convert(instruct, neox, to="neox", tp=3)
    convert(neox, back, to="hf")

    # the NeoX side holds the settings: neoxconv.json, and beside the tokenizer the HF files + the record
    tag = next(neox.glob("global_step*"))
    assert json.loads((tag / "neoxconv.json").read_text())["text"]["tokenizer"]["eos_token"] == "<|im_end|>"
    assert (neox / "tokenizer" / "chat_template.jinja").read_text() == CHATML
    assert (neox / "tokenizer" / "neoxconv-tokenizer.json").is_file()

    a, b = load_file(str(instruct / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact weights
    assert generation_values(back) == generation_values(instruct) == {"bos_token_id": 1, "eos_token_id": 2,
                                                                     "pad_token_id": 2}
    cfg = json.loads((back / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)

    tok_a, tok_b = AutoTokenizer.from_pretrained(instruct), AutoTokenizer.from_pretrained(back)
    assert specials(tok_b) == specials(tok_a) == {"bos_token": ("<|im_start|>", 1), "eos_token": ("<|im_end|>", 2),
                                                  "pad_token": ("<|im_end|>", 2), "unk_token": ("<|endoftext|>", 0)}
    assert tok_b.chat_template == tok_a.chat_template == CHATML
    assert tok_b.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == \
        tok_a.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    model_a = AutoModelForCausalLM.from_pretrained(instruct).eval()
    model_b = AutoModelForCausalLM.from_pretrained(back).eval()
    out_a, out_b = continuation(model_a, tok_a), continuation(model_b, tok_b)
    assert out_b == out_a and out_a[-1] == 2 and len(out_a) < MAX_NEW  # same tokens, stops at the same place

    # A checkpoint NeoX saves later while training has no neoxconv.json: the record beside the
    # tokenizer its YAML points at still restores the settings.
    (tag / "neoxconv.json").unlink()
    again = tmp_path / "again"
    convert(neox, again, to="hf")
    assert generation_values(again) == generation_values(instruct)
    assert AutoTokenizer.from_pretrained(again).chat_template == CHATML


def test_eos_token_and_chat_template_options(instruct, tmp_path, monkeypatch, capsys):
    """Through the CLI: --chat-template FILE and --eos-token TOKEN (repeatable) on hf-to-neox are kept
    through NeoX; a token that is not in the vocabulary is exit 2, one line, naming it."""
    from neoxconv.cli import main

    template = tmp_path / "plain.jinja"
    template.write_text("{% for message in messages %}{{ message['content'] }}<|endoftext|>{% endfor %}")

    def cli(*args) -> int:
        monkeypatch.setattr(sys, "argv", ["neoxconv", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            main()
        return e.value.code

    neox = tmp_path / "neox"
    assert cli("hf-to-neox", instruct, neox, "--tp", "3", "--chat-template", template,
               "--eos-token", "<|endoftext|>") == 0
    back = tmp_path / "back"
    assert cli("neox-to-hf", neox, back) == 0
    tok = AutoTokenizer.from_pretrained(back)
    assert tok.eos_token == "<|endoftext|>" and tok.chat_template == template.read_text()
    assert generation_values(back)["eos_token_id"] == [2, 0]  # the source's eos first, then the new one
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == \
        "You are brief.<|endoftext|>What is a checkpoint?<|endoftext|>"
    capsys.readouterr()

    bad = tmp_path / "bad"
    assert cli("neox-to-hf", neox, bad, "--eos-token", "<|eot_id|>") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'<|eot_id|>'" in err and "Traceback" not in err and not bad.exists()
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m }")
    assert cli("neox-to-hf", neox, bad, "--chat-template", broken) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.jinja" in err and "Jinja" in err and not bad.exists()


LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
                   "<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def test_meta_llama3_instruct_options(tmp_path):
    """Meta Llama 3 Instruct ships a tiktoken tokenizer.model and nothing that says it is Instruct:
    --eos-token '<|eot_id|>' --chat-template llama3.jinja give the HF export Meta's own choices:
    tokenizer eos <|eot_id|>, generation_config eos [<|end_of_text|>, <|eot_id|>]."""
    from test_tokenizer import TIKTOKEN_MERGES, write_tiktoken

    from fixtures.factories import tiny_hf_model
    from fixtures.llama_factories import meta_shards, save_meta

    n = len(TIKTOKEN_MERGES) + 256
    model = tiny_hf_model("llama", vocab_size=(n + 256 + 15) // 16 * 16)
    meta = save_meta(tmp_path / "meta", *meta_shards(model, 2, 0))
    write_tiktoken(meta / "tokenizer.model")
    template = tmp_path / "llama3.jinja"
    template.write_text(LLAMA3_TEMPLATE)
    hf = tmp_path / "hf"
    convert(meta, hf, to="hf", chat_template=template, eos_tokens=["<|eot_id|>"])
    gen = generation_values(hf)
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (n, [n + 1, n + 9])
    assert json.loads((hf / "config.json").read_text())["eos_token_id"] == [n + 1, n + 9]
    tok = AutoTokenizer.from_pretrained(hf)
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id) == ("<|begin_of_text|>", "<|eot_id|>", n + 9)
    text = tok.apply_chat_template([{"role": "user", "content": "the quick"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nthe quick<|eot_id|>" \
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"
    # Meta's own format holds the tokenizer.model and nothing else
    res = convert(hf, tmp_path / "meta2", to="meta", shards=1)
    assert (tmp_path / "meta2" / "tokenizer.model").read_bytes() == (meta / "tokenizer.model").read_bytes()
    assert any("chat template is not carried" in w for w in res["warnings"])
