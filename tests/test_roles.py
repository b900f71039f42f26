"""TP roles (neoxconv.roles) and the tables that declare them (neoxconv.archs, neoxconv.table).

Every role's merge undoes its split bit for bit, for every p (3 included) and dtype; every
tensor of every family has a declared role, and the families agree; the NeoX and Meta adapters
take their roles from the tables, so a family added as one table file converts through NeoX
without touching them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.factories import tiny_hf_model
from neoxconv import archs
from neoxconv.errors import NeoxconvError
from neoxconv.roles import (COLUMN, GATED_MLP, REPLICATED, ROW, ROW_BIAS, VOCAB, Context, FusedQKV, resize_vocab,
                            split_sum)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SINGLE = {"vocab": VOCAB, "column": COLUMN, "row": ROW, "row_bias": ROW_BIAS, "replicated": REPLICATED}


def _random(g: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    """Values over many binades (1e-3 .. 1e3), so rounding would show."""
    scale = 10 ** (6 * torch.rand(shape, generator=g) - 3)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------
# single-tensor roles


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("role", SINGLE, ids=str)
@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_merge_undoes_split_bit_exact(role, p, dtype, parallel):
    """Property: merge(split(x)) == x for random shapes and values (10 draws per case)."""
    ctx = Context(parallel_residual=parallel)
    g = torch.Generator().manual_seed(p)
    for _ in range(10):
        rows, cols = p * int(torch.randint(1, 6, (1,), generator=g)), p * int(torch.randint(1, 6, (1,), generator=g))
        t = _random(g, rows, cols, dtype=dtype) if role in ("vocab", "column", "row") else _random(g, rows, dtype=dtype)
        parts = SINGLE[role].split([t], p, ctx)
        assert len(parts) == p and all(x.dtype == dtype for x in parts)
        (back,) = SINGLE[role].merge(parts, ctx)
        assert back.dtype == dtype and torch.equal(back, t)


def test_split_puts_contiguous_chunks_on_each_rank():
    t = torch.arange(24.0).reshape(4, 6)
    ctx = Context()
    assert [x.tolist() for x in COLUMN.split([t], 2, ctx)] == [t[:2].tolist(), t[2:].tolist()]
    assert [x.tolist() for x in ROW.split([t], 3, ctx)] == [t[:, :2].tolist(), t[:, 2:4].tolist(), t[:, 4:].tolist()]
    assert all(x is t for x in REPLICATED.split([t], 3, ctx))
    assert all(x is t for x in ROW_BIAS.split([t], 3, Context(parallel_residual=False)))
    with pytest.raises(NeoxconvError, match="cannot split a column dimension of 4 into 3"):
        COLUMN.split([t], 3, ctx)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_bias_under_parallel_residual_splits_the_sum_exactly(dtype):
    """Ranks hold parts whose sum is the bias (T5): rank 0 the float64 remainder of p-1 shares
    fl(b/p). A plain b/p per rank does not come back at p = 3; this split does, exactly."""
    b = _random(torch.Generator().manual_seed(0), 4096, dtype=dtype)
    for p in (2, 3, 5, 8):
        parts = ROW_BIAS.split([b], p, Context(parallel_residual=True))
        assert all(torch.equal(x, y) for x, y in zip(parts, split_sum(b, p), strict=True))
        assert torch.equal(torch.stack([x.double() for x in parts]).sum(0).to(dtype), b)
        assert all(torch.equal(x, parts[1]) for x in parts[2:])  # ranks 1.. hold the same share
    naive = (b.double() / 3).to(dtype)
    assert not torch.equal((naive.double() * 3).to(dtype), b)  # why the remainder is needed


def test_replicated_copies_that_drifted_merge_to_their_float64_mean():
    """T6: norm copies differ slightly after training; the merge is their mean, rounded once."""
    g = torch.Generator().manual_seed(1)
    copies = [1 + 1e-3 * torch.randn(64, generator=g) for _ in range(3)]
    want = (torch.stack([c.double() for c in copies]).mean(0)).float()
    assert torch.equal(REPLICATED.merge(copies, Context())[0], want)
    assert torch.equal(ROW_BIAS.merge(copies, Context(parallel_residual=False))[0], want)
    assert torch.equal(ROW_BIAS.merge(copies, Context(parallel_residual=True))[0],
                       torch.stack([c.double() for c in copies]).sum(0).float())


def test_vocab_split_pads_and_trims_rows_but_never_real_tokens():
    t = torch.randn(10, 4)
    parts = VOCAB.split([t], 4, Context(vocab_size=10, vocab_rows=12))  # padded for TP 4
    assert [x.shape[0] for x in parts] == [3, 3, 3, 3]
    (back,) = VOCAB.merge(parts, Context())
    assert torch.equal(back[:10], t) and torch.equal(back[10:], torch.zeros(2, 4))
    (trimmed,) = VOCAB.split([back], 1, Context(vocab_size=10, vocab_rows=10))
    assert torch.equal(trimmed, t)
    with pytest.raises(NeoxconvError, match="below its 10 real tokens"):
        VOCAB.split([back], 1, Context(vocab_size=10, vocab_rows=8))
    assert torch.equal(resize_vocab(t, 10, 10), t)


# ---------------------------------------------------------------------------------------------
# fused roles


def _by_hand(q, k, v, heads, kv, layout, p):
    """Per-rank fused QKV built with explicit index arithmetic (not the fusing code's views)."""
    d = q.shape[0] // heads
    out = []
    for r in range(p):
        hs, ks = range(r * heads // p, (r + 1) * heads // p), range(r * kv // p, (r + 1) * kv // p)
        rows_q = [q[h * d + j] for h in hs for j in range(d)]
        rows_k = [k[h * d + j] for h in ks for j in range(d)]
        rows_v = [v[h * d + j] for h in ks for j in range(d)]
        if layout == "gqa_blocked":
            rows = rows_q + rows_k + rows_v
        elif layout == "mha_interleaved":
            rows = [x for n in range(len(hs)) for t in (rows_q, rows_k, rows_v) for x in t[n * d:(n + 1) * d]]
        else:  # fake-head: per query head, its d q rows then a g-row fragment of k and of v
            g = d * len(ks) // len(hs)
            rows = [x for n in range(len(hs))
                    for x in rows_q[n * d:(n + 1) * d] + rows_k[n * g:(n + 1) * g] + rows_v[n * g:(n + 1) * g]]
        out.append(torch.stack(rows))
    return out


@pytest.mark.parametrize("layout,heads,kv", [("mha_interleaved", 4, 4), ("gqa_blocked", 8, 2), ("gqa_fakehead", 8, 4)])
@pytest.mark.parametrize("p", [1, 2])
def test_fused_qkv_layouts_per_rank_and_back(layout, heads, kv, p):
    g = torch.Generator().manual_seed(2)
    d, h = 4, 6
    q, k, v = _random(g, heads * d, h), _random(g, kv * d, h), _random(g, kv * d, h)
    role, ctx = FusedQKV(layout=layout), Context(heads=heads, kv_heads=kv)
    parts = role.split([q, k, v], p, ctx)
    for got, want in zip(parts, _by_hand(q, k, v, heads, kv, layout, p), strict=True):
        assert torch.equal(got, want)
    back = role.merge(parts, ctx)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v), strict=True))
    with pytest.raises(NeoxconvError, match="unknown QKV layout"):
        FusedQKV(layout="blocked")


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_gated_mlp_holds_up_then_gate_on_every_rank(p):
    """T7: NeoX's linear1 holds [up_r ; gate_r] per rank, not [up ; gate] chunked."""
    g = torch.Generator().manual_seed(3)
    up, gate = _random(g, 12, 5), _random(g, 12, 5)
    parts = GATED_MLP.split([up, gate], p, Context())
    n = 12 // p
    for r, x in enumerate(parts):
        assert torch.equal(x, torch.cat([up[r * n:(r + 1) * n], gate[r * n:(r + 1) * n]]))
    back_up, back_gate = GATED_MLP.merge(parts, Context())
    assert torch.equal(back_up, up) and torch.equal(back_gate, gate)


# ---------------------------------------------------------------------------------------------
# the tables declare every role


def _hf_names(family: str) -> list[str]:
    """Every parameter name of the family's tiny HF model, with all optional biases switched on."""
    extra = {"llama": {"attention_bias": True, "mlp_bias": True}, "gptneox": {"attention_bias": True}}
    return list(tiny_hf_model(family, **extra.get(family, {})).state_dict())


@pytest.mark.parametrize("family", archs.families())
def test_every_tensor_of_every_family_has_a_declared_role(family):
    arch = archs.by_family(family)
    named = {n: torch.empty(0, device="meta") for n in _hf_names(family)}
    canonical = [n for hf in named for n in _canonical_names(arch, hf)]
    assert {"embed.weight", "layers.0.attn.q.weight", "layers.1.mlp.down.weight", "final_norm.weight"} <= set(canonical)
    for name in canonical:
        assert arch.role_of(name) in (VOCAB, COLUMN, ROW, ROW_BIAS, REPLICATED), name
    assert arch.role_of("layers.7.attn.o.bias") == ROW_BIAS and arch.role_of("layers.7.attn.k.weight") == COLUMN


def _canonical_names(arch, hf_name: str) -> list[str]:
    if arch.is_ignored(hf_name):
        return []
    entry = arch.table.by_name(arch.read_aliases.get(hf_name, hf_name))
    assert entry is not None, f"{arch.family}: no table row for {hf_name}"
    return list(entry.canonical)


def test_families_agree_on_every_shared_tensor():
    declared: dict[str, tuple[str, object]] = {}
    for arch in archs.all_archs():
        for e in arch.tensors:
            for c in e.canonical:
                role = arch.role_of(c)
                if c in declared:
                    assert declared[c][1] == role, f"{c}: {declared[c][0]} says {declared[c][1]}, {arch.family} {role}"
                declared[c] = (arch.family, role)
    assert len(declared) >= 20


def test_no_role_is_guessed_from_a_name():
    """0.1.0 called anything with "norm" in its name replicated; an undeclared tensor now has no role."""
    from neoxconv.roles import ROW_BIAS

    for name in ("layers.0.attn.q_norm.weight", "layers.0.mlp.o.weight", "embed.bias"):
        with pytest.raises(KeyError):
            archs.role_of(name)
    assert archs.role_of("layers.3.attn.o.bias") is ROW_BIAS


def _spec(family: str, **kw):
    from neoxconv.spec import ModelSpec

    return ModelSpec(family=family, hidden=32, layers=2, heads=4, kv_heads=4, intermediate=64, vocab_rows=64,
                     vocab_size=64, **kw)


@pytest.mark.parametrize("family", archs.families())
def test_neox_names_bind_a_role_to_every_stored_tensor(family):
    from neoxconv.formats.neox_schema import NeoxNames

    for schema in ("current", "legacy"):
        for activation in ("gelu", "swiglu"):
            for norm in ("layernorm", "rmsnorm"):
                names = NeoxNames.of(_spec(family, norm=norm, activation=activation), schema, "gqa_blocked")
                rows = names.embed + names.layer_at(0) + names.final + names.head
                assert all(e.role is not None for e in rows if e.canonical)
                assert {e.canonical[0] for e in names.embed + names.head} == {"embed.weight", "lm_head.weight"}
    # every norm, with QK-norm and learned positions (current names)
    for norm in ("layernorm", "rmsnorm", "scalenorm", "non_parametric_layernorm"):
        names = NeoxNames.of(_spec(family, norm=norm, qk_norm=True, position="learned"), "current", "mha_interleaved")
        rows = names.embed + names.layer_at(0) + names.final + names.head
        assert all(e.role is not None for e in rows if e.canonical)
        qk = {e.name for e in rows if e.name.startswith("attention.qk_layernorm")}
        assert qk == {"layernorm": {"attention.qk_layernorm.weight", "attention.qk_layernorm.bias"},
                      "rmsnorm": {"attention.qk_layernorm.scale"}, "scalenorm": {"attention.qk_layernorm.g"},
                      "non_parametric_layernorm": set()}[norm]
        assert "position_embeddings.weight" in {e.name for e in names.embed}


def test_qk_scalenorm_gain_is_one_per_rank_and_one_per_head_canonically():
    """NeoX's QK ScaleNorm keeps one gain per TP rank for that rank's heads; canonically each head
    has its rank's gain. A split needs the heads of each new rank to share one gain."""
    from neoxconv.roles import RANK_SHARED_GAIN

    ctx = Context(heads=8)
    per_rank = [torch.tensor([1.5]), torch.tensor([0.25])]
    (merged,) = RANK_SHARED_GAIN.merge(per_rank, ctx)
    assert merged.tolist() == [1.5] * 4 + [0.25] * 4
    assert [t.tolist() for t in RANK_SHARED_GAIN.split([merged], 2, ctx)] == [[1.5], [0.25]]
    assert [t.tolist() for t in RANK_SHARED_GAIN.split([merged], 4, ctx)] == [[1.5], [1.5], [0.25], [0.25]]
    with pytest.raises(NeoxconvError, match="gains differ between the heads of TP rank 0 of 1"):
        RANK_SHARED_GAIN.split([merged], 1, ctx)


def test_neox_refuses_a_family_that_declares_a_fused_member_otherwise(monkeypatch):
    """NeoX fuses q, k and v per rank as column-parallel tensors; a table that declares q
    otherwise is refused, not silently split another way."""
    import dataclasses

    from neoxconv.archs import llama
    from neoxconv.formats.neox_schema import NeoxNames

    rows = tuple(dataclasses.replace(e, role=ROW) if e.canonical == ("layers.{i}.attn.q.weight",) else e
                 for e in llama.TENSORS)
    monkeypatch.setattr(llama, "ARCH", dataclasses.replace(llama.ARCH, tensors=rows))
    with pytest.raises(NeoxconvError, match=r"query_key_value.weight fuses layers.{i}.attn.q.weight as column, "
                                            "but the model's family declares it row"):
        NeoxNames.of(_spec("llama", norm="rmsnorm", activation="swiglu"), "current", "gqa_blocked")


# ---------------------------------------------------------------------------------------------
# a family added as one table file converts through NeoX, adapters untouched


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setitem(archs.FAMILIES, "toy", "fixtures.toy_family")
    return archs.by_family("toy")


def _toy_hf_dir(path, parallel: bool):
    """An HF directory of the test-only family, written by hand (no transformers class)."""
    g = torch.Generator().manual_seed(4)
    h, heads, kv, ffn, vocab, layers = 32, 8, 4, 128, 96, 2
    d = h // heads
    t = {"tok.weight": _random(g, vocab, h), "ln_f.weight": 1 + _random(g, h), "ln_f.bias": _random(g, h),
         "head.weight": _random(g, vocab, h)}
    for i in range(layers):
        b = f"blocks.{i}."
        t.update({b + "ln1.weight": 1 + _random(g, h), b + "ln1.bias": _random(g, h),
                  b + "wqkv.weight": _random(g, (heads + 2 * kv) * d, h), b + "wqkv.bias": _random(g, (heads + 2 * kv) * d),
                  b + "proj.weight": _random(g, h, h), b + "proj.bias": _random(g, h),
                  b + "ln2.weight": 1 + _random(g, h), b + "ln2.bias": _random(g, h),
                  b + "fc_in.weight": _random(g, ffn, h), b + "fc_in.bias": _random(g, ffn),
                  b + "fc_out.weight": _random(g, h, ffn), b + "fc_out.bias": _random(g, h)})
    path.mkdir()
    save_file(t, str(path / "model.safetensors"))
    cfg = {"architectures": ["ToyForCausalLM"], "model_type": "toy", "n_layer": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "eps": 1e-5, "rotary_pct": 0.5, "parallel": parallel, "n_ctx": 64}
    (path / "config.json").write_text(json.dumps(cfg))
    return t


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel-residual", "sequential-residual"])
def test_a_family_added_as_one_table_converts_through_neox(tmp_path, toy_family, parallel):
    from neoxconv import graph
    from neoxconv.convert import convert
    from neoxconv.formats.neox import read_neox

    src = tmp_path / "toy"
    original = _toy_hf_dir(src, parallel)
    assert graph.read(src).spec.family == "toy"  # found by model_type through the registry
    convert(src, tmp_path / "tp4", to="neox", tp=4)
    neox = read_neox(tmp_path / "tp4")
    assert neox.spec.family == "toy" and neox.info["qkv_layout"] == "gqa_blocked"  # family recorded in neoxconv.json
    convert(tmp_path / "tp4", tmp_path / "tp2", to="neox", tp=2, layout="sequential", schema="legacy")
    convert(tmp_path / "tp2", tmp_path / "back", to="hf", trim_vocab_padding=True)
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == original.keys()
    for name, t in original.items():
        assert torch.equal(back[name], t), name
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["model_type"] == "toy" and cfg["parallel"] is parallel
