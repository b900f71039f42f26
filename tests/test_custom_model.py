"""The custom-code GPT-NeoX model (neoxconv/custom): cross-checks against the stock HF classes,
KV-cache generation, loading with trust_remote_code, and each NeoX feature against its formula
written here from GPT-NeoX's source (megatron/model/*.py at ea7aefd8)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from neoxconv.custom import export
from neoxconv.custom.configuration_neox import NeoXCustomConfig
from neoxconv.custom.modeling_neox import NeoXCustomForCausalLM, NeoXMLP, NeoXNorm
from neoxconv.errors import NeoxconvError
from neoxconv.tiny import tiny_hf_model

pytestmark = pytest.mark.usefixtures("one_thread")


BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64)


def randomise(model, seed=0):
    """Seeded weights; norms near 1 so a swapped tensor cannot hide behind an all-ones init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.3 * noise)
    return model.eval()


def custom(seed=0, **overrides):
    return randomise(NeoXCustomForCausalLM(NeoXCustomConfig(**{**BASE, **overrides})), seed)


def ids(batch=2, tokens=20, vocab=64, seed=1):
    """Token ids >= 1: generate() would take id 0 in a prompt for padding (pad_token_id=0)."""
    return torch.randint(1, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# (a) Where a stock class computes the same model, the custom model's logits are bit-identical.
# --------------------------------------------------------------------------------------------


GPTNEOX_RENAMES = (("gpt_neox.embed_in", "model.embed_tokens"), ("gpt_neox.final_layer_norm", "model.norm"),
                   ("gpt_neox.layers", "model.layers"), ("embed_out", "lm_head"),
                   ("attention.dense", "self_attn.o_proj"), ("mlp.dense_h_to_4h", "mlp.up_proj"),
                   ("mlp.dense_4h_to_h", "mlp.down_proj"), ("attention.query_key_value", "self_attn"))


def gptneox_to_custom(model) -> dict[str, torch.Tensor]:
    """HF GPTNeoX weights under the custom names: the fused QKV is [heads, 3, head_dim] per row."""
    n = model.config.num_attention_heads
    out = {}
    for name, t in model.state_dict().items():
        new = name
        for old, replacement in GPTNEOX_RENAMES:
            new = new.replace(old, replacement)
        if "query_key_value" in name:
            prefix, kind = new.rsplit(".", 1)
            per_head = t.view(n, 3, -1, *t.shape[1:])
            for j, which in enumerate("qkv"):
                out[f"{prefix}.{which}_proj.{kind}"] = per_head[:, j].reshape(-1, *t.shape[1:])
        else:
            out[new] = t
    return out


STOCK_CASES = {
    # family, HF overrides, custom config
    "gptneox-parallel-erf": ("gptneox", dict(hidden_act="gelu"),
                             dict(parallel_residual=True, rotary_pct=0.5, activation="gelu")),
    "gptneox-parallel-tanh-tied": ("gptneox", dict(hidden_act="gelu_fast", tie_word_embeddings=True),
                                   dict(parallel_residual=True, rotary_pct=0.5, activation="gelu", gelu_variant="tanh",
                                        tie_word_embeddings=True)),
    "gptneox-sequential-nobias": ("gptneox", dict(use_parallel_residual=False, attention_bias=False, rotary_pct=0.25,
                                                  rotary_emb_base=500.0, hidden_act="relu"),
                                  dict(rotary_pct=0.25, rotary_base=500.0, activation="relu", attention_bias=False)),
    "llama-gqa-swiglu": ("llama", dict(num_key_value_heads=2),
                         dict(num_key_value_heads=2, activation="swiglu")),
    "llama-gqa-swiglu-tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True),
                              dict(num_key_value_heads=2, activation="swiglu", tie_word_embeddings=True)),
    "llama-mha-geglu": ("llama", dict(hidden_act="gelu"), dict(activation="geglu")),
    "llama-reglu": ("llama", dict(hidden_act="relu"), dict(activation="reglu")),
    "llama-glu": ("llama", dict(hidden_act="sigmoid"), dict(activation="glu")),
    "llama-bilinear": ("llama", dict(hidden_act="linear"), dict(activation="bilinear")),
    "mistral-gqa-window": ("mistral", dict(num_key_value_heads=2, sliding_window=8),
                           dict(num_key_value_heads=2, activation="swiglu", sliding_window_width=7)),
}


@pytest.mark.parametrize("case", list(STOCK_CASES))
def test_custom_logits_equal_stock_class(case):
    family, hf_overrides, custom_overrides = STOCK_CASES[case]
    stock = tiny_hf_model(family, **hf_overrides)
    c = stock.config
    if family == "gptneox":
        weights = gptneox_to_custom(stock)
        cfg = dict(norm="layernorm", norm_eps=c.layer_norm_eps, tie_word_embeddings=False)
    else:  # Llama and Mistral already use the custom model's names
        weights = stock.state_dict()
        cfg = dict(norm="rmsnorm", norm_eps=c.rms_norm_eps, rotary_base=c.rope_parameters["rope_theta"],
                   attention_bias=False, mlp_bias=False, tie_word_embeddings=False)
    cfg = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
               num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size, **cfg)
    cfg.update(custom_overrides)
    if cfg["tie_word_embeddings"]:
        weights = {k: v for k, v in weights.items() if k not in ("lm_head.weight", "embed_out.weight")}
    model = NeoXCustomForCausalLM(NeoXCustomConfig(**cfg)).eval()
    model.load_state_dict(weights, strict=True)
    batch = ids(vocab=c.vocab_size)
    with torch.no_grad():
        expected, got = stock(batch).logits, model(batch).logits
    # Bit-exact: the same op per formula (stock eager attention, fp32). The window case is only
    # meaningful because the batch (20 tokens) is longer than the window.
    assert torch.equal(got, expected), (got - expected).abs().max()
    assert export.stock_family(cfg) == family


@pytest.mark.parametrize("overrides", [
    dict(position_embedding="alibi"), dict(position_embedding="learned"), dict(norm="scalenorm"),
    dict(norm="rmsnorm", activation="gelu"),  # GPT-NeoX issue #1323: rmsnorm with a plain GELU MLP
    dict(qk_norm=True), dict(attention_types=["global", "local"]), dict(gelu_variant="erf_onnx"),
    dict(parallel_residual=True, mlp_bias=False), dict(parallel_residual=True, parallel_norms_tied=True),
    dict(norm="rmsnorm", activation="swiglu", rmsnorm_eps_inside_sqrt=False),
    dict(norm="rmsnorm", activation="swiglu", rotary_pct=0.5), dict(num_key_value_heads=2),
])
def test_features_without_a_stock_class_need_the_custom_export(overrides):
    assert export.stock_family({**BASE, **overrides}) is None


# --------------------------------------------------------------------------------------------
# (b) generate() with the KV cache equals decoding without it.
# --------------------------------------------------------------------------------------------

GENERATION_CASES = {
    "rotary-partial": dict(position_embedding="rotary", rotary_pct=0.5),
    "alibi-gqa": dict(position_embedding="alibi", num_key_value_heads=2, norm="rmsnorm", activation="swiglu"),
    "learned-offset": dict(position_embedding="learned", position_embedding_offset=2,
                           position_embedding_multiplier=0.5),
    "sinusoidal": dict(position_embedding="sinusoidal", norm="scalenorm", norm_eps=1e-8),
    "none-parallel": dict(position_embedding="none", parallel_residual=True, norm="non_parametric_layernorm"),
    "window-local-qknorm": dict(position_embedding="alibi", attention_types=["local", "global"], local_block_size=4,
                                local_window_blocks=4, sliding_window_width=10, qk_norm=True, qk_norm_group_heads=2,
                                num_key_value_heads=2),
}


@pytest.mark.parametrize("case", list(GENERATION_CASES))
def test_generate_with_cache_equals_uncached_greedy(case):
    model = custom(**GENERATION_CASES[case])
    prompt = ids(tokens=5)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    cached = model.generate(prompt, **kw)
    uncached = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    # Each cached step's logits against one full forward over the final sequence (25 tokens: past
    # the window of 10 and several local blocks of 4). Tolerance: the same fp32 math on matmuls of
    # other shapes (one query vs all): observed <= 1e-5 on logits up to ~7; a wrong position,
    # mask or cache entry moves them by O(1).
    with torch.no_grad():
        full = model(cached.sequences).logits
    steps = torch.stack(cached.logits, dim=1)
    torch.testing.assert_close(steps, full[:, 4:-1], rtol=0, atol=5e-5)


def test_left_padding_gives_the_unpadded_result():
    """Positions follow the attention mask: a left-padded row decodes as if it were alone."""
    model = custom(**GENERATION_CASES["window-local-qknorm"])
    long, short = ids(batch=1, tokens=7, seed=3), ids(batch=1, tokens=4, seed=4)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kw)
    alone = model.generate(short, **kw)
    assert torch.equal(together[1, 3:], alone[0])
    assert torch.equal(together[0], model.generate(long, **kw)[0])


# --------------------------------------------------------------------------------------------
# (c) An export directory loads with trust_remote_code, with a tokenizer beside it.
# --------------------------------------------------------------------------------------------


def test_export_dir_loads_with_trust_remote_code_offline(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    cfg = {**BASE, **GENERATION_CASES["window-local-qknorm"], "tie_word_embeddings": False, "bos_token_id": 1,
           "eos_token_id": 2}
    written = export.write_custom_code(tmp_path, cfg)
    for name in export.TEMPLATE_FILES:  # copied byte for byte
        assert (tmp_path / name).read_bytes() == (export.TEMPLATE_DIR / name).read_bytes()
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk == written and on_disk["auto_map"] == export.AUTO_MAP
    assert on_disk["attention_types"] == ["local", "global"] and on_disk["qk_norm_group_heads"] == 2

    model = randomise(NeoXCustomForCausalLM(NeoXCustomConfig(**written)))
    model.save_pretrained(tmp_path)
    vocab = {f"w{i}": i for i in range(63)} | {"[UNK]": 63}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == export.ARCHITECTURE
    assert type(loaded).__module__.startswith("transformers_modules")  # the copied code, not neoxconv's
    batch = tokenizer(["w1 w2 w3 w40 w62 w5", "w7 w8 w9 w10 w11 w12"], return_tensors="pt")["input_ids"]
    assert batch[0].tolist() == [1, 2, 3, 40, 62, 5]
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)
    assert "trust_remote_code=True" in export.model_card_section(written)


def test_bad_config_values_are_one_line_errors():
    with pytest.raises(NeoxconvError, match="norm='te_layernorm' is not one of"):
        export.custom_config({**BASE, "norm": "te_layernorm"})
    with pytest.raises(NeoxconvError, match="attention_types has 1 entries for 2 layers"):
        export.custom_config({**BASE, "attention_types": ["global"]})
    with pytest.raises(NeoxconvError, match="'sparse_fixed' is not one of"):
        export.custom_config({**BASE, "attention_types": ["global", "sparse_fixed"]})


# --------------------------------------------------------------------------------------------
# (d) NeoX features against formulas written from GPT-NeoX's source.
# --------------------------------------------------------------------------------------------


def test_alibi_slopes_and_bias_follow_neox():
    from neoxconv.custom.modeling_neox import alibi_slopes

    # positional_embeddings.py AliBi._get_slopes: 2^(-8/n * (i+1)) for a power of 2; otherwise the
    # closest power of 2 and then every other slope of the doubled count.
    assert alibi_slopes(8) == [2.0 ** -(i + 1) for i in range(8)]
    assert alibi_slopes(6) == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    twelve = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(i + 0.5) for i in range(4)]
    assert torch.equal(torch.tensor(alibi_slopes(12)), torch.tensor(twelve))  # NeoX keeps them in fp32
    model = custom(position_embedding="alibi", num_attention_heads=4)
    pos = torch.arange(6).expand(1, 6)
    ctx = model.model._attention_context(pos, pos, torch.ones(1, 6, dtype=torch.bool), pos, torch.float32)
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    for h, slope in enumerate([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]):  # -(i - j) * slope, j <= i
        assert torch.equal(ctx["alibi"][0, h][j <= i], (-(i - j) * slope).float()[j <= i])


def test_norms_follow_neox():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32) * 3
    w, b = 1 + 0.1 * torch.randn(32), 0.1 * torch.randn(32)

    def norm(kind, eps, weight=None, bias=None, inside=True):
        module = NeoXNorm(NeoXCustomConfig(**BASE, norm=kind, norm_eps=eps, rmsnorm_eps_inside_sqrt=inside), (32,))
        with torch.no_grad():
            for name, t in (("weight", weight), ("bias", bias)):
                if t is not None:
                    getattr(module, name).copy_(t)
        return module(x)

    # norms.py RMSNorm (since 2025-05): fp32, x * rsqrt(mean(x^2) + eps), times scale
    assert torch.equal(norm("rmsnorm", 1e-8, w), w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-8)))
    # before 2025-05: x / (||x|| * d^-1/2 + eps)
    rms = x.norm(2, dim=-1, keepdim=True) * 32 ** -0.5
    assert torch.equal(norm("rmsnorm", 1e-2, w, inside=False), w * (x / (rms + 1e-2)))
    # ScaleNorm: x / clamp(||x||, eps) * g with one scalar g
    g = torch.tensor([1.7])
    assert torch.equal(norm("scalenorm", 1e-8, g), x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-8) * g)
    # NonParametricLayernorm: LayerNorm without weight or bias
    centred = x - x.mean(-1, keepdim=True)
    expected = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5)
    # the kernel vs this formula: ulps
    torch.testing.assert_close(norm("non_parametric_layernorm", 1e-5), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(norm("layernorm", 1e-5, w, b), expected * w + b, rtol=0, atol=1e-5)


def test_qk_layernorm_normalises_the_heads_of_each_tp_rank_together():
    """NeoX builds norm([heads_per_rank, head_dim]) (transformer.py ParallelSelfAttention), so a
    LayerNorm's statistics span all heads of one TP rank: TP=2 with 4 heads = groups of 2."""
    cfg = NeoXCustomConfig(**BASE, qk_norm=True, qk_norm_group_heads=2)
    module = NeoXNorm(cfg, (4, 8), group=2)
    torch.manual_seed(0)
    with torch.no_grad():
        module.weight.copy_(1 + 0.1 * torch.randn(4, 8))
        module.bias.copy_(0.1 * torch.randn(4, 8))
    q = torch.randn(3, 5, 4, 8)
    ranks = []
    for r in range(2):  # what rank r computes on its [sq, b, np, hn] slice
        ln = torch.nn.LayerNorm([2, 8], eps=cfg.norm_eps)
        with torch.no_grad():
            ln.weight.copy_(module.weight[2 * r:2 * r + 2])
            ln.bias.copy_(module.bias[2 * r:2 * r + 2])
        ranks.append(ln(q[:, :, 2 * r:2 * r + 2]))
    expected = torch.cat(ranks, dim=2)
    assert torch.equal(module(q), expected)
    per_head = NeoXNorm(cfg, (4, 8), group=1)
    per_head.load_state_dict(module.state_dict())
    assert not torch.allclose(per_head(q), expected, atol=1e-3)  # the grouping is not cosmetic


def test_qk_norm_attention_layer_by_hand():
    """One GQA layer with QK LayerNorm (TP=2 grouping) and partial rotary, computed as NeoX does:
    repeat K to the query heads, norm Q and K with the same module, then rotary, then softmax."""
    model = custom(num_key_value_heads=2, qk_norm=True, qk_norm_group_heads=2, rotary_pct=0.5, num_hidden_layers=1)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(5))
    n, kv, d, r = 4, 2, 8, 4
    q = (x @ attn.q_proj.weight.T + attn.q_proj.bias).view(1, 6, n, d)
    k = (x @ attn.k_proj.weight.T + attn.k_proj.bias).view(1, 6, kv, d).repeat_interleave(2, dim=2)
    v = (x @ attn.v_proj.weight.T + attn.v_proj.bias).view(1, 6, kv, d).repeat_interleave(2, dim=2)
    w, b = attn.qk_norm.weight, attn.qk_norm.bias

    def qk_norm(t):  # per rank: LayerNorm over [2 heads, d]
        return torch.cat([F.layer_norm(t[:, :, g:g + 2], (2, d), w[g:g + 2], b[g:g + 2], 1e-5) for g in (0, 2)], dim=2)

    inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
    emb = torch.cat([torch.outer(torch.arange(6).float(), inv_freq)] * 2, dim=-1)[None, :, None]  # [1, s, 1, r]

    def rotary(t):
        rot, rest = t[..., :r], t[..., r:]
        half = torch.cat((-rot[..., r // 2:], rot[..., :r // 2]), dim=-1)
        return torch.cat((rot * emb.cos() + half * emb.sin(), rest), dim=-1)

    q, k = rotary(qk_norm(q)), rotary(qk_norm(k))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    context = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(1, 6, n * d)
    expected = context @ attn.o_proj.weight.T + attn.o_proj.bias
    pos = torch.arange(6).expand(1, 6)
    with torch.no_grad():
        ctx = model.model._attention_context(pos, pos, torch.ones(1, 6, dtype=torch.bool), pos, torch.float32)
        got = attn(x, ctx, None)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # einsum vs matmul summation order


NEOX_ACTIVATIONS = {  # activations.py (and Gated_Activation: act(gate) * x)
    "gelu": lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu/tanh": lambda x: x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))),
    "gelu/erf_onnx": lambda x: x * 0.5 * (torch.erf(x / 1.41421) + 1.0),
    "relu": lambda x: x.clamp(min=0),
    "softsign": lambda x: x / (1 + x.abs()),
    "swish": lambda x: x * torch.sigmoid(x),
    "mish": lambda x: x * torch.tanh(torch.log1p(torch.exp(x))),
    "silu": lambda x: x * torch.sigmoid(x),
    "geglu": lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "reglu": lambda x: x.clamp(min=0),
    "swiglu": lambda x: x * torch.sigmoid(x),
    "bilinear": lambda x: x,
    "glu": torch.sigmoid,
}


@pytest.mark.parametrize("name", list(NEOX_ACTIVATIONS))
def test_mlp_activation_follows_neox(name):
    activation, _, variant = name.partition("/")
    cfg = NeoXCustomConfig(**BASE, activation=activation, gelu_variant=variant or "erf")
    mlp = randomise(NeoXMLP(cfg))
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    up = x @ mlp.up_proj.weight.T + mlp.up_proj.bias
    act = NEOX_ACTIVATIONS[name]
    if cfg.gated:
        gate = x @ mlp.gate_proj.weight.T + mlp.gate_proj.bias
        inner = act(gate) * up
    else:
        inner = act(up)
    expected = inner @ mlp.down_proj.weight.T + mlp.down_proj.bias
    torch.testing.assert_close(mlp(x), expected, rtol=0, atol=1e-5)  # fused kernels vs these formulas: ulps


def test_sinusoidal_and_learned_positions_follow_neox():
    x = ids(batch=1, tokens=7)
    model = custom(position_embedding="sinusoidal", num_hidden_layers=1)
    words = model.model.embed_tokens(x)
    # word_embeddings.py SinusoidalPositionalEmbedding: [sin(t f), cos(t f)], f = 1/10000^(2i/h)
    f = 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))
    t = torch.arange(7).float()[:, None] * f
    table = torch.cat((t.sin(), t.cos()), dim=-1)
    assert torch.equal(model.model._add_positions(words, torch.arange(7)[None]), words + table)
    model = custom(position_embedding="learned", position_embedding_offset=2, position_embedding_multiplier=0.5)
    words = model.model.embed_tokens(x)
    rows = model.model.embed_positions.weight[2:9]  # opt_pos_emb_offset shifts the rows; mup_rp_embedding_mult scales
    assert torch.equal(model.model._add_positions(words, torch.arange(7)[None]), words + rows * 0.5)


def test_local_attention_is_deepspeeds_block_layout():
    """"local" layers: DeepSpeed LocalSlidingWindowSparsityConfig (unidirectional) keeps, for query
    block r, key blocks max(0, r - blocks // 2) .. r; NeoX's causal mask (and the sliding window)
    apply inside them."""
    block, blocks, window, s = 4, 5, 9, 24
    model = custom(attention_types=["local", "global"], local_block_size=block, local_window_blocks=blocks,
                   sliding_window_width=window)
    nb, w = s // block, blocks // 2
    layout = torch.zeros(nb, nb, dtype=torch.bool)
    for row in range(nb):
        layout[row, max(0, row - w):row + 1] = True
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    causal_window = (j <= i) & (j >= i - window)  # NeoX get_attn_mask: tril, then triu(diagonal=-W)
    expected = layout[i // block, j // block] & causal_window
    pos = torch.arange(s).expand(1, s)
    ctx = model.model._attention_context(pos, pos, torch.ones(1, s, dtype=torch.bool), pos, torch.float32)
    assert torch.equal(ctx["local_mask"][0, 0], expected)
    assert torch.equal(ctx["mask"][0, 0], causal_window)


def test_local_layers_add_no_alibi():
    """NeoX's sparse path (ParallelSelfAttention.sparse_attention) adds no ALiBi bias; global does."""
    layers = dict(attention_types=["local", "global"], local_block_size=4)
    alibi, plain = custom(position_embedding="alibi", **layers), custom(position_embedding="none", **layers)
    with torch.no_grad():
        a, b = (m(ids(), output_hidden_states=True).hidden_states for m in (alibi, plain))
    assert torch.equal(a[1], b[1]) and not torch.allclose(a[2], b[2], atol=1e-3)


def test_gpt_j_residual_quirks():
    """gpt_j_tied: one norm feeds attention and MLP (post_attention_layernorm is kept but unused).
    gpt_j_residual without MLP biases: NeoX returns the MLP output alone (attention dropped)."""
    x = ids()

    def logits(model):
        with torch.no_grad():
            return model(x).logits

    def perturbed(model, name):
        with torch.no_grad():
            model.get_parameter(name).mul_(1.5)
        return logits(model)

    tied = custom(parallel_residual=True, parallel_norms_tied=True)
    before = logits(tied)
    assert torch.equal(perturbed(tied, "model.layers.0.post_attention_layernorm.weight"), before)
    assert not torch.equal(perturbed(tied, "model.layers.0.input_layernorm.weight"), before)
    no_bias = custom(parallel_residual=True, mlp_bias=False)
    before = logits(no_bias)
    assert torch.equal(perturbed(no_bias, "model.layers.0.self_attn.v_proj.weight"), before)
    with_bias = custom(parallel_residual=True)
    before = logits(with_bias)
    assert not torch.equal(perturbed(with_bias, "model.layers.0.self_attn.v_proj.weight"), before)


def test_model_card_lists_the_features():
    text = export.model_card_section({**BASE, **GENERATION_CASES["window-local-qknorm"]})
    for fragment in ("ALiBi", "grouped-query attention, 4 query / 2 key-value heads", "QK normalisation over 2 head(s)",
                     "attention per layer: global x1, local x1",
                     "blocks of 4, this and the 2 previous block(s)", "itself and 10 earlier tokens"):
        assert fragment in text
