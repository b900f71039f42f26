"""Tests of neoxconv.reference: the NeoX/Meta reference forwards against HF transformers.

Every NeoX checkpoint here is written *by hand in this file* from a tiny seeded HF model,
following docs/neox-formats.md (interleaved / blocked / fake-head QKV, gated linear1 as
[up_r ; gate_r], row biases divided by tp under gpt_j_residual and copied otherwise, vocab padded
with zero rows), so no converter code is involved on either side.

Tolerance: fp32 logits must agree within |Δ| <= 1e-5 + 1e-5·|ref| (FP32_ATOL, FP32_RTOL), 10-20
times tighter than the library's fp32 default (2e-4, 1e-4). Both sides run identical fp32 weights; the only
differences are summation order (TP partial sums, fused vs split projections, eager attention vs
ours), a few fp32 ulps (~1e-7 relative) per op, which on logits of magnitude O(1-10) after two
layers measured at most 6.7e-6 absolute (1.05e-5 on the tied model, logits up to 16). Wrong layouts
move logits by >= 0.4 (most by O(1)); WRONG_MIN = 1e-2 is the margin asserted.
"""

from __future__ import annotations

import json
import os
import sys
import weakref
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

from neoxconv.errors import NeoxconvError  # noqa: E402
from neoxconv.reference.neox_semantics import NeoxSemantics, attention_types  # noqa: E402
from neoxconv.reference import ops  # noqa: E402
from neoxconv.reference import (  # noqa: E402
    DEFAULT_TOLERANCES,
    InMemoryShardSource,
    NeoxReferenceModel,
    SimulatedGroup,
    UnsupportedNeoxFeature,
    compare_logits,
    hf_logits,
    hf_model_logits,
    make_batch,
    meta_reference_logits,
    neox_reference_logits,
    open_meta,
    run_distributed,
)

torch.set_num_threads(2)

FP32_ATOL, FP32_RTOL = 1e-5, 1e-5
WRONG_MIN = 1e-2
VOCAB = 97  # real vocab: deliberately not a multiple of anything
SEQ = 16
BATCH = 2


# ------------------------------------------------------------------------------------------
# Tiny seeded HF models
# ------------------------------------------------------------------------------------------


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """O(1) activations: the default 0.02 init makes logits so small that bugs hide in noise.
    Norm weights ~1±0.1 and non-zero biases so norms and biases matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith(("weight", "scale")):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.15 * noise)
    return model.eval()


def make_gptneox(parallel: bool, tied: bool = False, act: str = "gelu", seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, hidden_act=act, rotary_pct=0.25, rotary_emb_base=10000,
        max_position_embeddings=64, use_parallel_residual=parallel, tie_word_embeddings=tied,
        layer_norm_eps=1e-5, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(cfg)
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.25
    return _randomize(model, seed)


def make_llama(kv: int, tied: bool = False, bias: bool = False, seed: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=kv, intermediate_size=96, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=64, tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return _randomize(LlamaForCausalLM(cfg), seed)


def make_mistral(window: int = 5, seed: int = 2):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, intermediate_size=96, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=64, sliding_window=window, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return _randomize(MistralForCausalLM(cfg), seed)


# ------------------------------------------------------------------------------------------
# Hand-written NeoX per-rank tensors (the doc's split rules, written out independently)
# ------------------------------------------------------------------------------------------


def padded_vocab(tp: int, multiple: int = 8) -> int:
    m = multiple * tp  # make_vocab_size_divisible_by x TP (§3.3)
    return (VOCAB + m - 1) // m * m


def vocab_shards(w: torch.Tensor, tp: int) -> list[torch.Tensor]:
    rows = padded_vocab(tp)
    full = torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])])
    return [t.clone() for t in full.chunk(tp, 0)]


def rows(t: torch.Tensor, tp: int) -> list[torch.Tensor]:
    return [c.clone() for c in t.chunk(tp, 0)]


def cols(t: torch.Tensor, tp: int) -> list[torch.Tensor]:
    return [c.clone() for c in t.chunk(tp, 1)]


def row_bias(b: torch.Tensor, tp: int, gpt_j: bool) -> list[torch.Tensor]:
    return [(b / tp if gpt_j else b).clone() for _ in range(tp)]


def fuse_qkv(q, k, v, n, kv, tp, layout):
    """Per-rank fused QKV rows for one of NeoX's layouts (§4.1-4.3). Works for weights and biases."""
    vec = q.dim() == 1
    if vec:
        q, k, v = q[:, None], k[:, None], v[:, None]
    d = q.shape[0] // n
    np_, kvp = n // tp, kv // tp
    out = []
    for Q, K, V in zip(q.chunk(tp), k.chunk(tp), v.chunk(tp)):
        if layout == "mha_interleaved":  # [np, 3, d] per rank
            t = torch.stack([Q.view(np_, d, -1), K.view(np_, d, -1), V.view(np_, d, -1)], 1)
        elif layout == "gqa_blocked":  # [Q_r ; K_r ; V_r]
            t = torch.cat([Q, K, V])
        elif layout == "gqa_fakehead":  # per query head: d rows q, g rows of K_r, g rows of V_r
            g = d * kvp // np_
            t = torch.cat([Q.view(np_, d, -1), K.reshape(np_, g, -1), V.reshape(np_, g, -1)], 1)
        else:
            raise AssertionError(layout)
        t = t.reshape(-1, q.shape[1])
        out.append(t[:, 0].clone() if vec else t.clone())
    return out


def gated_linear1(up, gate, tp):
    """Each rank holds [up_r ; gate_r] (§3, T7)."""
    return [torch.cat([u, g]).clone() for u, g in zip(up.chunk(tp), gate.chunk(tp))]


def _put(layers, idx, tp, name, per_rank):
    layers.setdefault(idx, [{} for _ in range(tp)])
    for r in range(tp):
        layers[idx][r][name] = per_rank[r]


def gptneox_to_neox(model, tp, mlp_names=("linear1", "linear2"), bias_rule=None, rotary_pct=0.25):
    """GPTNeoXForCausalLM -> NeoX pipeline tensors. The HF fused QKV is already NeoX's [n,3,d]."""
    cfg = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    L = cfg.num_hidden_layers
    gpt_j = cfg.use_parallel_residual
    bias_rule = gpt_j if bias_rule is None else bias_rule
    tied = cfg.tie_word_embeddings
    layers: dict = {}
    _put(layers, 0, tp, "word_embeddings.weight", vocab_shards(sd["gpt_neox.embed_in.weight"], tp))
    for i in range(L):
        p, idx = f"gpt_neox.layers.{i}.", i + 2
        for n in ("input_layernorm", "post_attention_layernorm"):
            for s in ("weight", "bias"):
                _put(layers, idx, tp, f"{n}.{s}", [sd[f"{p}{n}.{s}"].clone() for _ in range(tp)])
        _put(layers, idx, tp, "attention.query_key_value.weight", rows(sd[p + "attention.query_key_value.weight"], tp))
        _put(layers, idx, tp, "attention.query_key_value.bias", rows(sd[p + "attention.query_key_value.bias"], tp))
        _put(layers, idx, tp, "attention.dense.weight", cols(sd[p + "attention.dense.weight"], tp))
        _put(layers, idx, tp, "attention.dense.bias", row_bias(sd[p + "attention.dense.bias"], tp, bias_rule))
        _put(layers, idx, tp, "attention.rotary_emb.inv_freq", [torch.zeros(2) for _ in range(tp)])  # must be ignored
        w_in, w_out = mlp_names
        _put(layers, idx, tp, f"mlp.{w_in}.weight", rows(sd[p + "mlp.dense_h_to_4h.weight"], tp))
        _put(layers, idx, tp, f"mlp.{w_in}.bias", rows(sd[p + "mlp.dense_h_to_4h.bias"], tp))
        _put(layers, idx, tp, f"mlp.{w_out}.weight", cols(sd[p + "mlp.dense_4h_to_h.weight"], tp))
        _put(layers, idx, tp, f"mlp.{w_out}.bias", row_bias(sd[p + "mlp.dense_4h_to_h.bias"], tp, bias_rule))
    for s in ("weight", "bias"):
        _put(layers, L + 3, tp, f"norm.{s}", [sd[f"gpt_neox.final_layer_norm.{s}"].clone() for _ in range(tp)])
    if not tied:
        _put(layers, L + 4, tp, "final_linear.weight", vocab_shards(sd["lm_head.weight"], tp))
    args = {
        "num_layers": L, "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
        "rotary_pct": rotary_pct, "rotary_emb_base": 10000, "norm": "layernorm", "layernorm_epsilon": 1e-5,
        "gpt_j_residual": gpt_j, "activation": "gelu", "bias_gelu_fusion": cfg.hidden_act != "gelu",
        "no_weight_tying": not tied, "pos_emb": "rotary",
    }
    return InMemoryShardSource(tp=tp, num_layers=L, args=args, qkv_layout="mha_interleaved", layers=layers)


FLASH = "flash"


def llama_to_neox(model, tp, layout, mlp="linear1", declared=None, gated="up_gate", window=None,
                  attention_config=FLASH):
    """Llama/Mistral -> NeoX tensors (rmsnorm, swiglu, sequential residual).

    A window is written as NeoX keeps it: ``sliding_window_width`` = HF ``sliding_window`` - 1
    (flash's window_size=(W, -1) sees W+1 keys, HF's W; ``window`` overrides) on flash layers
    (``attention_config``: FLASH = every layer, or an explicit NeoX attention_config, or None)."""
    cfg = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    L, n, kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    tied = cfg.tie_word_embeddings
    layers: dict = {}
    _put(layers, 0, tp, "word_embeddings.weight", vocab_shards(sd["model.embed_tokens.weight"], tp))
    for i in range(L):
        p, idx = f"model.layers.{i}.", i + 2
        _put(layers, idx, tp, "input_layernorm.scale", [sd[p + "input_layernorm.weight"].clone() for _ in range(tp)])
        _put(layers, idx, tp, "post_attention_layernorm.scale",
             [sd[p + "post_attention_layernorm.weight"].clone() for _ in range(tp)])
        a = p + "self_attn."
        for s in ("weight", "bias"):
            if a + f"q_proj.{s}" in sd:
                _put(layers, idx, tp, f"attention.query_key_value.{s}",
                     fuse_qkv(sd[a + f"q_proj.{s}"], sd[a + f"k_proj.{s}"], sd[a + f"v_proj.{s}"], n, kv, tp, layout))
        _put(layers, idx, tp, "attention.dense.weight", cols(sd[a + "o_proj.weight"], tp))
        if a + "o_proj.bias" in sd:
            _put(layers, idx, tp, "attention.dense.bias", row_bias(sd[a + "o_proj.bias"], tp, gpt_j=False))
        m = p + "mlp."
        up, gate, down = sd[m + "up_proj.weight"], sd[m + "gate_proj.weight"], sd[m + "down_proj.weight"]
        if mlp == "linear1":
            if gated == "up_gate":
                w1 = gated_linear1(up, gate, tp)
            elif gated == "gate_up":  # wrong order
                w1 = gated_linear1(gate, up, tp)
            else:  # "plain_chunk": [up ; gate] merged then plainly chunked (wrong for tp > 1)
                w1 = rows(torch.cat([up, gate]), tp)
            _put(layers, idx, tp, "mlp.linear1.weight", w1)
            _put(layers, idx, tp, "mlp.linear2.weight", cols(down, tp))
            if m + "up_proj.bias" in sd:
                _put(layers, idx, tp, "mlp.linear1.bias",
                     gated_linear1(sd[m + "up_proj.bias"], sd[m + "gate_proj.bias"], tp))
                _put(layers, idx, tp, "mlp.linear2.bias", row_bias(sd[m + "down_proj.bias"], tp, gpt_j=False))
        else:  # legacy LLaMAParallelMLP
            _put(layers, idx, tp, "mlp.w1.weight", rows(gate, tp))
            _put(layers, idx, tp, "mlp.w3.weight", rows(up, tp))
            _put(layers, idx, tp, "mlp.w2.weight", cols(down, tp))
    _put(layers, L + 3, tp, "norm.scale", [sd["model.norm.weight"].clone() for _ in range(tp)])
    if not tied:
        _put(layers, L + 4, tp, "final_linear.weight", vocab_shards(sd["lm_head.weight"], tp))
    args = {
        "num_layers": L, "hidden_size": cfg.hidden_size, "num_attention_heads": n, "num_kv_heads": kv,
        "norm": "rmsnorm", "rms_norm_epsilon": cfg.rms_norm_eps, "activation": "swiglu",
        "gpt_j_residual": False, "no_weight_tying": not tied, "rotary_emb_base": 10000,
        "use_bias_in_attn_linear": bool(getattr(cfg, "attention_bias", False)),
        "use_bias_in_mlp": bool(getattr(cfg, "mlp_bias", False)),
    }
    if getattr(cfg, "sliding_window", None) is not None:
        args["sliding_window_width"] = cfg.sliding_window - 1 if window is None else window
        if attention_config == FLASH:
            args["attention_config"] = [[["flash"], L]]
        elif attention_config is not None:
            args["attention_config"] = attention_config
    return InMemoryShardSource(tp=tp, num_layers=L, args=args, qkv_layout=declared or layout, layers=layers)


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def tokens():
    return make_batch(VOCAB, BATCH, SEQ, seed=123)


def check_parity(model, source, **kw):
    toks = tokens()
    hf = hf_model_logits(model, toks)
    ref = neox_reference_logits(source, toks, **kw)
    assert ref.dtype == torch.float32
    assert ref.shape == (BATCH, SEQ, padded_vocab(source.tp))
    assert torch.all(ref[..., VOCAB:] == 0), "zero padding rows must give zero logits"
    rep = compare_logits(hf, ref, VOCAB, "fp32")
    assert rep.passed, rep.summary()
    tight = compare_logits(hf, ref, VOCAB, "fp32", atol=FP32_ATOL, rtol=FP32_RTOL)
    assert tight.passed, tight.summary()
    assert rep.argmax_agreement == 1.0
    return rep


def assert_detected(model, source, **kw):
    toks = tokens()
    rep = compare_logits(hf_model_logits(model, toks), neox_reference_logits(source, toks, **kw), VOCAB, "fp32")
    assert not rep.passed, rep.summary()
    assert rep.max_abs_diff > WRONG_MIN, rep.summary()
    return rep


# ------------------------------------------------------------------------------------------
# Parity: correct layouts
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def neox_parallel():
    return make_gptneox(parallel=True)


@pytest.fixture(scope="module")
def neox_sequential():
    return make_gptneox(parallel=False, tied=True, act="gelu_new", seed=3)


@pytest.fixture(scope="module")
def llama_mha():
    return make_llama(kv=8)


@pytest.fixture(scope="module")
def llama_gqa():
    return make_llama(kv=2, seed=4)


@pytest.fixture(scope="module")
def mistral():
    return make_mistral()


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gptneox_parallel_residual(neox_parallel, tp):
    """gpt_j_residual, biases (row biases ÷tp), partial rotary 0.25, exact gelu, untied, linear1 names."""
    check_parity(neox_parallel, gptneox_to_neox(neox_parallel, tp))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gptneox_sequential_residual(neox_sequential, tp):
    """Sequential residual with biases copied, tied embeddings, tanh gelu, legacy dense_h_to_4h names."""
    src = gptneox_to_neox(neox_sequential, tp, mlp_names=("dense_h_to_4h", "dense_4h_to_h"))
    assert src.args["bias_gelu_fusion"] and not src.args["no_weight_tying"]
    assert (src.num_layers + 4) not in src.layers
    check_parity(neox_sequential, src)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_llama_mha_interleaved(llama_mha, tp):
    check_parity(llama_mha, llama_to_neox(llama_mha, tp, "mha_interleaved"))


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("layout", ["gqa_blocked", "gqa_fakehead"])
def test_llama_gqa(llama_gqa, tp, layout):
    check_parity(llama_gqa, llama_to_neox(llama_gqa, tp, layout))


def test_llama_legacy_w1_w2_w3(llama_mha):
    check_parity(llama_mha, llama_to_neox(llama_mha, 2, "mha_interleaved", mlp="legacy"))


@pytest.mark.parametrize("tp", [1, 2])
def test_llama_with_biases_sequential_residual(tp):
    """Biases under a sequential residual: the row biases are copied to every rank (T5)."""
    model = make_llama(kv=2, bias=True, seed=5)
    check_parity(model, llama_to_neox(model, tp, "gqa_blocked"))


def test_llama_tied(llama_mha):
    model = make_llama(kv=8, tied=True, seed=6)
    check_parity(model, llama_to_neox(model, 2, "mha_interleaved"))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_mistral_sliding_window(mistral, tp):
    assert mistral.config.sliding_window < SEQ
    check_parity(mistral, llama_to_neox(mistral, tp, "gqa_blocked"))


def test_mistral_window_conventions(mistral):
    """NeoX flash sees W+1 keys, HF W (§2.3). The reference's default is NeoX's convention, so the
    HF model with sliding_window W equals NeoX sliding_window_width W-1 (checked above); a NeoX
    width equal to HF's is one key too wide and is detected. The "hf" convention with window W
    equals the NeoX one with W-1."""
    W = mistral.config.sliding_window
    toks = tokens()
    same_width = llama_to_neox(mistral, 2, "gqa_blocked", window=W)  # the pre-fix mapping: W <-> W
    assert_detected(mistral, same_width)
    check_parity(mistral, same_width, sliding_window_convention="hf")
    neox = llama_to_neox(mistral, 2, "gqa_blocked")
    assert neox.args["sliding_window_width"] == W - 1
    torch.testing.assert_close(neox_reference_logits(neox, toks),
                               neox_reference_logits(same_width, toks, sliding_window_convention="hf"), atol=0, rtol=0)


def _neox_training_mask(s: int, W: int) -> torch.Tensor:
    """GPT-NeoX megatron/utils.py get_attn_mask, written out (True = masked), as training
    builds it for every batch (_get_batch -> get_ltor_masks_and_position_ids)."""
    mask = torch.tril(torch.ones((1, s, s))).view(1, 1, s, s)
    return torch.triu(mask, diagonal=-W) < 0.5


def _flash_window(s: int, W: int) -> torch.Tensor:
    """flash-attn causal attention with window_size=(W, -1), written out: key j is visible to
    query i iff i - W <= j <= i (True = visible)."""
    allowed = torch.zeros(s, s, dtype=torch.bool)
    for i in range(s):
        for j in range(max(0, i - W), i + 1):
            allowed[i, j] = True
    return allowed


def test_window_on_global_and_flash_layers(mistral):
    """NeoX trains the window on every layer: global layers through the training mask, flash
    layers through window_size=(W, -1), W+1 keys both. Checked against both written out, then
    on logits: every attention_config (absent = global, global, flash, mixed) gives the same
    windowed logits, which match HF Mistral with sliding_window W+1 (SEQ > window)."""
    W = mistral.config.sliding_window - 1
    assert SEQ > W + 1
    ours = ops.causal_mask(SEQ, W, "neox_flash")
    assert torch.equal(ours, ~_neox_training_mask(SEQ, W)[0, 0])
    assert torch.equal(ours, _flash_window(SEQ, W))
    toks = tokens()
    flash = neox_reference_logits(llama_to_neox(mistral, 2, "gqa_blocked"), toks)
    full = llama_to_neox(mistral, 2, "gqa_blocked")
    del full.args["sliding_window_width"], full.args["attention_config"]
    no_window = neox_reference_logits(full, toks)
    assert (flash - no_window).abs().max() > WRONG_MIN
    for cfg in (None, [[["global"], 2]], [[["global"], "all"]], ["global", "global"], [[["flash", "global"], 1]],
                [[["global"], 1], [["flash"], 1]]):
        src = llama_to_neox(mistral, 2, "gqa_blocked", attention_config=cfg)
        sem = NeoxSemantics.from_args(src.args, src.qkv_layout)
        assert sem.sliding_window == W and sem.layer_windows == (W, W)
        torch.testing.assert_close(neox_reference_logits(src, toks), flash, atol=0, rtol=0)
        check_parity(mistral, src)
        model = NeoxReferenceModel(src)  # the nn.Module path windows per layer too
        with torch.no_grad():
            torch.testing.assert_close(model(toks), flash, atol=0, rtol=0)


def test_attention_types_expansion():
    """NeoX megatron/utils.py expand_attention_types, and refusal of attention the reference lacks."""
    assert attention_types(None, 3) == ("global",) * 3
    assert attention_types([[["flash"], 2], [["global"], 1]], 3) == ("flash", "flash", "global")
    assert attention_types([[["global", "flash"], "all"]], 4) == ("global", "flash") * 2
    assert attention_types(["flash", "global"], 2) == ("flash", "global")
    assert attention_types('[[["flash"], 2]]', 2) == ("flash", "flash")  # a YAML string
    with pytest.raises(NeoxconvError, match="expected num_layers=3"):
        attention_types([[["flash"], 2]], 3)
    assert attention_types([[["local", "global"], 1]], 2) == ("local", "global")
    for bad in ([[["bigbird"], 2]], [[["flash", "sparse_fixed"], 1]], [[["mamba"], 2]]):
        with pytest.raises(UnsupportedNeoxFeature):
            attention_types(bad, 2)


class _Recording:
    """A source handing out fresh copies and noting which earlier ones are still alive."""

    def __init__(self, src):
        self.src, self.tp, self.num_layers, self.args, self.qkv_layout = src, src.tp, src.num_layers, src.args, \
            src.qkv_layout
        self.order, self.refs, self.alive_at_fetch = [], [], []

    def rank_states(self, idx):
        self.alive_at_fetch.append(sum(r() is not None for r in self.refs))
        states = [{k: v.clone() for k, v in st.items()} for st in self.src.rank_states(idx)]
        self.refs += [weakref.ref(v) for st in states for v in st.values()]
        self.order.append(idx)
        return states


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_forward_streams_one_spec_index_at_a_time(llama_mha, tied):
    """Every spec index is released before the next is fetched (nothing is kept: the tied head
    fetches the embedding again), and the logits are those of the plain source."""
    model = make_llama(kv=8, tied=True) if tied else llama_mha
    src = llama_to_neox(model, 2, "mha_interleaved")
    rec = _Recording(src)
    toks = tokens()
    out = neox_reference_logits(rec, toks)
    L = src.num_layers
    assert rec.order == [0, *range(2, L + 2), L + 3, 0 if tied else L + 4]
    assert rec.alive_at_fetch == [0] * len(rec.order)
    torch.testing.assert_close(out, neox_reference_logits(src, toks), atol=0, rtol=0)


def test_reference_refuses_a_converter_files_object(tmp_path, neox_parallel):
    """NeoxFiles may carry a QKV layout a converter set on it; the reference reads its own
    (NeoxCheckpoint), so a NeoxFiles object is refused."""
    from neoxconv.formats.neox_files import NeoxFiles

    files = NeoxFiles(tmp_path, "pipeline", 1, 1, 0, {"num_attention_heads": 4}, [], [0])
    with pytest.raises(TypeError, match="NeoxCheckpoint"):
        neox_reference_logits(files, tokens())


def test_model_module_matches_streaming(neox_parallel):
    src = gptneox_to_neox(neox_parallel, 2)
    toks = tokens()
    model = NeoxReferenceModel(src)
    with torch.no_grad():
        out = model(toks)
    torch.testing.assert_close(out, neox_reference_logits(src, toks), atol=0, rtol=0)
    assert set(model.rank_state(2, 1)) == set(src.layers[2][1])


def test_hf_logits_from_directory(tmp_path, llama_gqa):
    llama_gqa.save_pretrained(tmp_path)
    toks = tokens()
    torch.testing.assert_close(hf_logits(tmp_path, toks), hf_model_logits(llama_gqa, toks))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_default_tolerance(llama_gqa, dtype):
    """Both sides in fp16/bf16: the default tolerance table passes a correct layout and still
    fails a wrong one."""
    from transformers import LlamaForCausalLM

    half = LlamaForCausalLM(llama_gqa.config).eval()
    half.load_state_dict(llama_gqa.state_dict())
    half = half.to(dtype)
    toks = tokens()
    hf = hf_model_logits(half, toks)
    good = compare_logits(hf, neox_reference_logits(llama_to_neox(llama_gqa, 2, "gqa_blocked"), toks, dtype=dtype),
                          VOCAB, dtype)
    assert good.passed, good.summary()
    bad_src = llama_to_neox(llama_gqa, 2, "gqa_blocked", declared="gqa_fakehead")
    bad = compare_logits(hf, neox_reference_logits(bad_src, toks, dtype=dtype), VOCAB, dtype)
    assert not bad.passed, bad.summary()


# ------------------------------------------------------------------------------------------
# Detection: wrong layouts / semantics must fail loudly
# ------------------------------------------------------------------------------------------


def test_detects_gqa_blocked_read_as_fakehead(llama_gqa):
    assert_detected(llama_gqa, llama_to_neox(llama_gqa, 2, "gqa_blocked", declared="gqa_fakehead"))


def test_detects_gqa_fakehead_read_as_blocked(llama_gqa):
    assert_detected(llama_gqa, llama_to_neox(llama_gqa, 1, "gqa_fakehead", declared="gqa_blocked"))


def test_detects_mha_written_blocked(llama_mha):
    """Bug B4 / the HF-Llama importer's MHA bug: MHA stored blocked; NeoX reads MHA interleaved."""
    src = llama_to_neox(llama_mha, 2, "gqa_blocked")
    assert neox_reference_logits(src, tokens()).shape[-1] == padded_vocab(2)
    assert_detected(llama_mha, src)


def test_detects_gptj_bias_summed_twice(neox_parallel):
    """gpt_j_residual biases copied instead of ÷tp: NeoX adds them tp times (T5, issue #962)."""
    assert_detected(neox_parallel, gptneox_to_neox(neox_parallel, 2, bias_rule=False))


def test_detects_sequential_bias_divided(neox_sequential):
    """Sequential residual biases ÷tp (converter bug B3 direction): NeoX adds one copy."""
    src = gptneox_to_neox(neox_sequential, 2, mlp_names=("dense_h_to_4h", "dense_4h_to_h"), bias_rule=True)
    assert_detected(neox_sequential, src)


def test_detects_wrong_rotary_pct(neox_parallel):
    assert_detected(neox_parallel, gptneox_to_neox(neox_parallel, 1, rotary_pct=1.0))


def test_detects_gated_plain_chunk(llama_mha):
    """T7: [up ; gate] chunked as a whole instead of [up_r ; gate_r] per rank."""
    assert_detected(llama_mha, llama_to_neox(llama_mha, 2, "mha_interleaved", gated="plain_chunk"))


def test_detects_gated_halves_swapped(llama_mha):
    assert_detected(llama_mha, llama_to_neox(llama_mha, 1, "mha_interleaved", gated="gate_up"))


def test_detects_swapped_qkv_ranks(llama_mha):
    """QKV rank files in the wrong order (a full layer swapped consistently would be a harmless
    permutation of heads and MLP units; a swap of one tensor is not)."""
    src = llama_to_neox(llama_mha, 2, "mha_interleaved")
    r0, r1 = src.layers[2]
    name = "attention.query_key_value.weight"
    r0[name], r1[name] = r1[name], r0[name]
    assert_detected(llama_mha, src)


def test_detects_gelu_variant(neox_parallel):
    """Exact vs tanh GELU (bias_gelu_fusion, T17, bug B11) exceeds the fp32 tolerance."""
    src = gptneox_to_neox(neox_parallel, 1)
    src.args["bias_gelu_fusion"] = True
    toks = tokens()
    rep = compare_logits(hf_model_logits(neox_parallel, toks), neox_reference_logits(src, toks), VOCAB, "fp32")
    assert not rep.passed, rep.summary()


# ------------------------------------------------------------------------------------------
# Per-rank semantics and config handling
# ------------------------------------------------------------------------------------------


def test_each_rank_uses_its_own_final_norm(llama_mha):
    """Replicated norms: rank r's copy only affects the vocab slice rank r computes (§3.2)."""
    src = llama_to_neox(llama_mha, 2, "mha_interleaved")
    toks = tokens()
    base = neox_reference_logits(src, toks)
    L = src.num_layers
    src.layers[L + 3][1]["norm.scale"] = src.layers[L + 3][1]["norm.scale"] * 1.5
    out = neox_reference_logits(src, toks)
    half = padded_vocab(2) // 2
    torch.testing.assert_close(out[..., :half], base[..., :half], atol=0, rtol=0)
    assert (out[..., half:VOCAB] - base[..., half:VOCAB]).abs().max() > WRONG_MIN


@pytest.mark.parametrize("which", ["neox_parallel", "neox_sequential"])
def test_replicated_mean_isolates_copy_drift(request, which):
    """Rank copies of replicated tensors that drifted apart (±noise, same mean): NeoX semantics
    ("own") differ from an HF export holding the mean; replicated="mean" reproduces the export."""
    model = request.getfixturevalue(which)
    names = ("dense_h_to_4h", "dense_4h_to_h") if which == "neox_sequential" else ("linear1", "linear2")
    src = gptneox_to_neox(model, 2, mlp_names=names)
    g = torch.Generator().manual_seed(9)
    drifted = []
    for ranks in src.layers.values():
        for k in list(ranks[0]):
            if "norm" in k or (which == "neox_sequential" and k in ("attention.dense.bias", "mlp.dense_4h_to_h.bias")):
                noise = 1e-2 * torch.randn(ranks[0][k].shape, generator=g)
                ranks[0][k], ranks[1][k] = ranks[0][k] + noise, ranks[1][k] - noise
                drifted.append(k)
    assert drifted
    assert_detected(model, src)
    check_parity(model, src, replicated="mean")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_replicated_mean_rounds_merged_values_to_the_stored_dtype(neox_parallel, dtype):
    """An fp16/bf16 TP=2 gpt-j checkpoint with drifted norm copies, computed in fp32: "mean" must
    equal the TP=1 checkpoint an export holds (norm mean and row-bias sum taken in float64 and
    rounded once to the stored dtype), in the streaming forward and the nn.Module alike."""
    src = gptneox_to_neox(neox_parallel, 2)
    g = torch.Generator().manual_seed(4)
    for ranks in src.layers.values():
        for st in ranks:
            for k in list(st):
                noise = 1e-2 * torch.randn(st[k].shape, generator=g) if "norm" in k else 0
                st[k] = (st[k] + noise).to(dtype)
    merged: dict = {}
    for idx, ranks in src.layers.items():
        out = {}
        for k in ranks[0]:
            parts = [st[k].double() for st in ranks]
            if "norm" in k:
                out[k] = (sum(parts) / 2).to(dtype)
            elif k in ("attention.dense.bias", "mlp.linear2.bias"):
                out[k] = sum(parts).to(dtype)
            else:
                dim = 1 if k in ("attention.dense.weight", "mlp.linear2.weight") else 0
                out[k] = torch.cat([st[k] for st in ranks], dim=dim)
        merged[idx] = [out]
    export = InMemoryShardSource(1, src.num_layers, src.args, src.qkv_layout, merged)
    toks = tokens()
    want = neox_reference_logits(export, toks, dtype=torch.float32)
    got = neox_reference_logits(src, toks, dtype=torch.float32, replicated="mean")
    rep = compare_logits(want, got, VOCAB, "fp32", atol=FP32_ATOL, rtol=FP32_RTOL)
    assert rep.passed, rep.summary()
    with torch.no_grad():
        module = NeoxReferenceModel(src, dtype=torch.float32, replicated="mean")(toks)
    torch.testing.assert_close(module, got, atol=0, rtol=0)
    # merging in the compute dtype instead (no rounding to the stored dtype) misses the export
    up = InMemoryShardSource(2, src.num_layers, src.args, src.qkv_layout,
                             {i: [{k: v.float() for k, v in st.items()} for st in r] for i, r in src.layers.items()})
    assert not compare_logits(want, neox_reference_logits(up, toks, replicated="mean"), VOCAB, "fp32",
                              atol=FP32_ATOL, rtol=FP32_RTOL).passed


def test_unsupported_features_raise(llama_mha):
    src = llama_to_neox(llama_mha, 1, "mha_interleaved")
    for key, value in (("pos_emb", "rpe"), ("use_mup", True), ("moe_num_experts", 2), ("norm", "te_fused"),
                       ("soft_prompt_tuning", {"enabled": True})):
        bad = InMemoryShardSource(src.tp, src.num_layers, {**src.args, key: value}, src.qkv_layout, src.layers)
        with pytest.raises(UnsupportedNeoxFeature):
            neox_reference_logits(bad, tokens())
    extra = llama_to_neox(llama_mha, 1, "mha_interleaved")
    extra.layers[2][0]["attention.rpe.weight"] = torch.ones(8)
    with pytest.raises(UnsupportedNeoxFeature):
        neox_reference_logits(extra, tokens())
    # a learned position table the config does not announce is not silently dropped
    table = llama_to_neox(llama_mha, 1, "mha_interleaved")
    table.layers[0][0]["position_embeddings.weight"] = torch.ones(8, 8)
    with pytest.raises(NeoxconvError, match="stores position_embeddings.weight"):
        neox_reference_logits(table, tokens())


def test_config_errors(llama_gqa):
    src = llama_to_neox(llama_gqa, 1, "gqa_blocked")
    with pytest.raises(NeoxconvError, match="mha_interleaved"):
        neox_reference_logits(InMemoryShardSource(1, 2, src.args, "mha_interleaved", src.layers), tokens())
    with pytest.raises(NeoxconvError, match="rmsnorm|layernorm"):
        args = {k: v for k, v in src.args.items() if k != "norm"}  # NeoX default: layernorm
        neox_reference_logits(InMemoryShardSource(1, 2, args, "gqa_blocked", src.layers), tokens())
    with pytest.raises(NeoxconvError, match="tp=4"):
        neox_reference_logits(src, tokens(), group=SimulatedGroup(4))


def test_yaml_string_floats_and_hyphen_keys(llama_mha):
    src = llama_to_neox(llama_mha, 1, "mha_interleaved")
    args = {k.replace("_", "-"): v for k, v in src.args.items()}
    args["rms-norm-epsilon"] = "1e-6"  # PyYAML reads 1e-6 as a string (§5.1)
    check_parity(llama_mha, InMemoryShardSource(1, 2, args, "mha_interleaved", src.layers))


# ------------------------------------------------------------------------------------------
# Distributed backend: gloo, 2 spawned processes == simulated (forward and gradients)
# ------------------------------------------------------------------------------------------


def _dist_step(group, source, toks, weights):
    model = NeoxReferenceModel(source, group=group, requires_grad=True)
    logits = model(toks)
    (logits * weights).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def test_distributed_gloo_matches_simulated(neox_parallel):
    src = gptneox_to_neox(neox_parallel, 2)
    toks = tokens()
    weights = torch.randn(BATCH, SEQ, padded_vocab(2), generator=torch.Generator().manual_seed(7))
    sim_logits, sim_grads = _dist_step(SimulatedGroup(2), src, toks, weights)
    results = run_distributed(_dist_step, 2, src, toks, weights)
    for rank, (logits, grads) in enumerate(results):
        torch.testing.assert_close(logits, sim_logits, atol=1e-6, rtol=0)
        mine = {k: v for k, v in sim_grads.items() if k.split(".")[1].endswith(f"_r{rank}")}
        assert set(grads) == set(mine) and len(mine) > 10
        for k in mine:
            torch.testing.assert_close(grads[k], mine[k], atol=1e-5, rtol=1e-5, msg=k)
    # replicated norm copies receive identical (summed) gradients on both ranks (Megatron rule)
    g0 = results[0][1]["slots.s2_r0.input_layernorm__weight"]
    g1 = results[1][1]["slots.s2_r1.input_layernorm__weight"]
    torch.testing.assert_close(g0, g1, atol=1e-5, rtol=1e-5)


def test_simulated_gradients_match_unsharded(neox_parallel):
    """tp=2 gradients of sharded weights are the slices of the tp=1 gradients (same loss)."""
    toks = tokens()
    w2 = torch.randn(BATCH, SEQ, padded_vocab(2), generator=torch.Generator().manual_seed(8))
    w1 = w2[..., : padded_vocab(1)]
    assert padded_vocab(1) <= padded_vocab(2)
    _, g2 = _dist_step(SimulatedGroup(2), gptneox_to_neox(neox_parallel, 2), toks, w2)
    _, g1 = _dist_step(SimulatedGroup(1), gptneox_to_neox(neox_parallel, 1), toks, w1)
    full = g1["slots.s2_r0.attention__dense__weight"]
    torch.testing.assert_close(g2["slots.s2_r0.attention__dense__weight"], full.chunk(2, 1)[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g2["slots.s2_r1.attention__dense__weight"], full.chunk(2, 1)[1], atol=1e-4, rtol=1e-4)
    for r in range(2):
        torch.testing.assert_close(g2[f"slots.s2_r{r}.input_layernorm__weight"],
                                   g1["slots.s2_r0.input_layernorm__weight"], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# Meta raw Llama
# ------------------------------------------------------------------------------------------


def _to_meta(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF/NeoX rotate-half rows -> Meta interleaved rows: view [H, 2, d/2, h], swap, flatten (§4.4)."""
    out_dim, h = w.shape
    d = out_dim // heads
    return w.view(heads, 2, d // 2, h).transpose(1, 2).reshape(out_dim, h)


def hf_llama_to_meta(model, shards: int, embed_dim: int):
    cfg = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    out = [dict() for _ in range(shards)]

    def put(name, t, dim):
        parts = [t] * shards if dim is None else list(t.chunk(shards, dim))
        for r in range(shards):
            out[r][name] = parts[r].clone()

    put("tok_embeddings.weight", sd["model.embed_tokens.weight"], embed_dim)
    put("norm.weight", sd["model.norm.weight"], None)
    put("output.weight", sd["lm_head.weight"], 0)
    for i in range(cfg.num_hidden_layers):
        p, m = f"model.layers.{i}.", f"layers.{i}."
        put(m + "attention.wq.weight", _to_meta(sd[p + "self_attn.q_proj.weight"], n), 0)
        put(m + "attention.wk.weight", _to_meta(sd[p + "self_attn.k_proj.weight"], kv), 0)
        put(m + "attention.wv.weight", sd[p + "self_attn.v_proj.weight"], 0)
        put(m + "attention.wo.weight", sd[p + "self_attn.o_proj.weight"], 1)
        put(m + "feed_forward.w1.weight", sd[p + "mlp.gate_proj.weight"], 0)
        put(m + "feed_forward.w3.weight", sd[p + "mlp.up_proj.weight"], 0)
        put(m + "feed_forward.w2.weight", sd[p + "mlp.down_proj.weight"], 1)
        put(m + "attention_norm.weight", sd[p + "input_layernorm.weight"], None)
        put(m + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], None)
    out[0]["rope.freqs"] = torch.zeros(4)  # must be ignored
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": n, "n_kv_heads": kv,
              "norm_eps": cfg.rms_norm_eps, "vocab_size": -1, "multiple_of": 32, "rope_theta": 10000.0}
    return out, params


@pytest.mark.parametrize("shards,embed_dim", [(1, None), (2, 1), (2, 0)])
def test_meta_forward(llama_gqa, shards, embed_dim):
    """Llama-1/2 shards split tok_embeddings on dim 1, Llama-3 on dim 0 (T18)."""
    meta, params = hf_llama_to_meta(llama_gqa, shards, embed_dim)
    toks = tokens()
    rep = compare_logits(hf_model_logits(llama_gqa, toks), meta_reference_logits(meta, params, toks), VOCAB, "fp32")
    assert rep.passed, rep.summary()
    tight = compare_logits(hf_model_logits(llama_gqa, toks), meta_reference_logits(meta, params, toks), VOCAB,
                           "fp32", atol=FP32_ATOL, rtol=FP32_RTOL)
    assert tight.passed, tight.summary()


def test_meta_forward_casts_per_layer(llama_gqa):
    """bf16 shards computed in fp32: the shards are not converted in place or as a whole (each
    layer is cast inside the loop), and the result equals that of fp32 copies of the shards."""
    meta, params = hf_llama_to_meta(llama_gqa, 2, 0)
    low = [{k: v.to(torch.bfloat16) for k, v in sh.items()} for sh in meta]
    up = [{k: v.float() for k, v in sh.items()} for sh in low]
    toks = tokens()
    out = meta_reference_logits(low, params, toks, dtype=torch.float32)
    assert all(v.dtype == torch.bfloat16 for sh in low for v in sh.values())
    torch.testing.assert_close(out, meta_reference_logits(up, params, toks), atol=0, rtol=0)


def test_meta_forward_from_files_equals_in_memory_shards(llama_gqa, tmp_path):
    """open_meta: the shards memory-mapped as stored and cast layer by layer give exactly the
    logits of the same shards held in memory."""
    meta, params = hf_llama_to_meta(llama_gqa, 2, 0)
    for r, sh in enumerate(meta):
        torch.save(sh, tmp_path / f"consolidated.{r:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps(params))
    shards, read = open_meta(tmp_path)
    assert read == params and [sorted(sh) for sh in shards] == [sorted(sh) for sh in meta]
    toks = tokens()
    torch.testing.assert_close(meta_reference_logits(shards, read, toks), meta_reference_logits(meta, params, toks),
                               atol=0, rtol=0)
    (tmp_path / "consolidated.00.pth").unlink()
    with pytest.raises(NeoxconvError, match="consolidated.00.pth"):
        open_meta(tmp_path)


def test_meta_forward_detects_missing_permutation(llama_gqa):
    meta, params = hf_llama_to_meta(llama_gqa, 1, None)
    sd = llama_gqa.state_dict()
    meta[0]["layers.0.attention.wq.weight"] = sd["model.layers.0.self_attn.q_proj.weight"].clone()
    meta[0]["layers.0.attention.wk.weight"] = sd["model.layers.0.self_attn.k_proj.weight"].clone()
    toks = tokens()
    rep = compare_logits(hf_model_logits(llama_gqa, toks), meta_reference_logits(meta, params, toks), VOCAB, "fp32")
    assert not rep.passed and rep.max_abs_diff > WRONG_MIN


# ------------------------------------------------------------------------------------------
# Parity report unit tests
# ------------------------------------------------------------------------------------------


def test_compare_logits_rules():
    import json

    b = torch.randn(2, 3, 10)
    a = b.clone()
    a[..., 8:] += 100.0  # padding columns: ignored
    rep = compare_logits(a, b, real_vocab=8, dtype=torch.float32)
    assert rep.passed and rep.max_abs_diff == 0 and rep.positions == 6 and rep.vocab == 8
    assert (rep.atol, rep.rtol) == DEFAULT_TOLERANCES["float32"]
    a[1, 2, 3] += 1.0
    rep = compare_logits(a, b, 8, "fp32")
    assert not rep.passed and rep.worst == {"dim0": 1, "dim1": 2, "vocab": 3}
    assert abs(rep.max_abs_diff - 1.0) < 1e-5 and rep.max_excess > 0
    assert compare_logits(a, b, 8, "fp32", atol=2.0).passed
    a[0, 0, 0] = float("nan")
    rep = compare_logits(a, b, 8, "bf16", atol=10.0)
    assert not rep.passed and rep.nonfinite == 1 and rep.dtype == "bfloat16"
    back = json.loads(rep.to_json())
    assert back["verdict"] == "fail" and back["dtype"] == "bfloat16"
    with pytest.raises(ValueError):
        compare_logits(a, b, 11, "fp32")
    with pytest.raises(ValueError):
        compare_logits(a, b, 8, "int8")


def test_make_batch_is_seeded():
    a, b = make_batch(50, 2, 7, seed=1), make_batch(50, 2, 7, seed=1)
    assert a.dtype == torch.long and a.shape == (2, 7) and torch.equal(a, b)
    assert int(a.max()) < 50 and int(a.min()) >= 0
    assert not torch.equal(a, make_batch(50, 2, 7, seed=2))
