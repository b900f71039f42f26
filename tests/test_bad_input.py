"""Bad input, as a new user meets it: each case damages a fresh copy of a tiny checkpoint, runs the
CLI in-process and expects the exit code, ONE line on stderr naming the problem (and, for damage,
the file), no traceback, and nothing at OUT (no temporary sibling either). The output side (full
or read-only disk, interrupted writes) is in test_bad_input_output.py, fuzzing in
test_bad_input_fuzz.py.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fixtures.pristine import edit_pt, fresh, layer_file, no_output, run_cli

TAG = "global_step1000"


class Evil:
    """A pickle payload that runs code when unpickled (it must never be)."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/neoxconv-pwned",))


# -- damage helpers: each takes the copied checkpoint directory --------------------------------


def truncate(rel: str, keep: float = 0.5) -> Callable[[Path], None]:
    def fn(d: Path) -> None:
        data = (d / rel).read_bytes()
        (d / rel).write_bytes(data[: int(len(data) * keep)])
    return fn


def garbage(rel: str) -> Callable[[Path], None]:
    return lambda d: (d / rel).write_bytes(bytes(range(256)) * 8)


def remove(*rels: str) -> Callable[[Path], None]:
    def fn(d: Path) -> None:
        for rel in rels:
            (d / rel).unlink()
    return fn


def copy(src: str, dst: str) -> Callable[[Path], None]:
    return lambda d: (d / dst).write_bytes((d / src).read_bytes())


def layer(idx: int, ranks: tuple[int, ...], fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        for r in ranks:
            edit_pt(layer_file(d, idx, r), fn)
    return apply


def each_layer(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        for idx in (2, 3):
            layer(idx, (0, 1), fn)(d)
    return apply


def set_(key: str, value) -> Callable[[dict], None]:
    def fn(sd: dict) -> None:
        sd[key] = value(sd[key]) if callable(value) else value
    return fn


def short_cols(sd: dict, key: str = "attention.dense.weight") -> None:
    sd[key] = sd[key][:, :-1].clone()


def short_rows(sd: dict, key: str) -> None:
    sd[key] = sd[key][:-1].clone()


def poison(key: str, value: float, at: int = 3) -> Callable[[dict], None]:
    def fn(sd: dict) -> None:
        t = sd[key].clone()
        t.view(-1)[at] = value
        sd[key] = t
    return fn


def yaml_edit(file: str = "local_setup.yml", drop: tuple[str, ...] = (), **set_keys) -> Callable[[Path], None]:
    def fn(d: Path) -> None:
        path = d / TAG / "configs" / file
        cfg = yaml.safe_load(path.read_text())
        for k in drop:
            cfg.pop(k)
        for k, v in set_keys.items():  # the key as the file spells it (fixtures mix _ and -)
            cfg[k if k in cfg or k.replace("_", "-") not in cfg else k.replace("_", "-")] = v
        path.write_text(yaml.safe_dump(cfg))
    return fn


def text(rel: str, content: str) -> Callable[[Path], None]:
    return lambda d: (d / rel).write_text(content)


def json_edit(rel: str, fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        data = json.loads((d / rel).read_text())
        fn(data)
        (d / rel).write_text(json.dumps(data))
    return apply


def st_edit(rel: str, fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        tensors = load_file(str(d / rel))
        fn(tensors)
        save_file(tensors, str(d / rel), metadata={"format": "pt"})
    return apply


def evil_layer(d: Path) -> None:
    edit_pt(layer_file(d, 2, 0), set_("evil", Evil()))


def evil_mp_rank(d: Path) -> None:
    path = d / TAG / "mp_rank_01_model_states.pt"
    state = torch.load(path, weights_only=False)
    state["args"] = Evil()
    torch.save(state, path)


def evil_bin(d: Path) -> None:
    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    tensors["evil"] = Evil()
    torch.save(tensors, d / "pytorch_model.bin")


def weight_map(to: str) -> Callable[[Path], None]:
    def fn(d: Path) -> None:
        index = d / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        first = sorted(data["weight_map"])[0]
        data["weight_map"][first] = to
        index.write_text(json.dumps(data))
    return fn


def meta_shard(rank: int, fn: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda d: edit_pt(d / f"consolidated.{rank:02d}.pth", fn)


def meta_shards(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda d: [meta_shard(r, fn)(d) for r in (0, 1)]


def hf_config(**keys) -> Callable[[Path], None]:
    return json_edit("config.json", lambda c: c.update(keys))


def hf_tensors(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    return st_edit("model.safetensors", fn)


def drop_prefix(prefix: str) -> Callable[[dict], None]:
    return lambda t: [t.pop(k) for k in list(t) if k.startswith(prefix)]


def nothing(d: Path) -> None:
    pass


@dataclass(frozen=True)
class Case:
    source: str  # pristine checkpoint to copy
    damage: Callable[[Path], None]
    pattern: str  # regex the single stderr line must match
    args: tuple[str, ...] = ()  # extra CLI options
    command: str = ""  # default: by source format
    code: int = 2


NEOX_TO_HF = "neox-to-hf"
L2, L3 = f"{TAG}/layer_02-model_00-model_states.pt", f"{TAG}/layer_03-model_01-model_states.pt"
MP0 = f"{TAG}/mp_rank_00_model_states.pt"

CASES: dict[str, Case] = {
    # -- unreadable files ------------------------------------------------------------------------
    "pt-truncated": Case("neox", truncate(L2), r"layer_02-model_00-model_states\.pt: cannot load checkpoint"),
    "pt-garbage": Case("neox", garbage(L2), r"layer_02-model_00-model_states\.pt: cannot load checkpoint"),
    "pt-empty": Case("neox", truncate(L2, 0), r"layer_02-model_00-model_states\.pt: cannot load checkpoint"),
    "zip-truncated-end": Case("neox", truncate(L3, 0.97), r"layer_03-model_01-model_states\.pt: cannot load"),
    "mp-rank-truncated": Case("neox_seq", truncate(MP0), r"mp_rank_00_model_states\.pt: cannot load checkpoint"),
    "safetensors-truncated": Case("hf", truncate("model.safetensors"), r"model\.safetensors: not a readable safetensors"),
    "safetensors-garbage": Case("hf", garbage("model.safetensors"), r"model\.safetensors: not a readable safetensors"),
    "safetensors-header-too-long": Case("hf", lambda d: (d / "model.safetensors").write_bytes(
        (10**12).to_bytes(8, "little") + b"{}"), r"model\.safetensors: not a readable safetensors"),
    "meta-shard-truncated": Case("meta", truncate("consolidated.01.pth"), r"consolidated\.01\.pth: cannot load"),
    # -- pickles with code payloads ----------------------------------------------------------------
    "pickle-code-in-layer": Case("neox", evil_layer, r"layer_02-model_00-model_states\.pt: .*--trust-pickle"),
    "pickle-code-in-mp-rank": Case("neox_seq", evil_mp_rank, r"mp_rank_01_model_states\.pt: .*--trust-pickle"),
    "pickle-code-in-hf-bin": Case("hf", evil_bin, r"pytorch_model\.bin: .*--trust-pickle"),
    # -- missing or extra files ----------------------------------------------------------------------
    "layer-missing": Case("neox", remove(f"{TAG}/layer_03-model_00-model_states.pt",
                                         f"{TAG}/layer_03-model_01-model_states.pt"),
                          r"missing transformer layer 1: expected layer_03-model_00"),
    "rank-file-missing": Case("neox", remove(L3), r"layer_03 has 1 TP file\(s\) \(model_00\), expected 2"),
    "rank-file-extra": Case("neox", copy(L3, f"{TAG}/layer_03-model_02-model_states.pt"),
                            r"layer_03 has 3 TP file\(s\).*expected 2"),
    "layer-file-extra": Case("neox", lambda d: [copy(f"{TAG}/layer_03-model_0{r}-model_states.pt",
                                                     f"{TAG}/layer_04-model_0{r}-model_states.pt")(d) for r in (0, 1)],
                             r"transformer layer at spec index 4 beyond num_layers 2"),
    "mp-rank-missing": Case("neox_seq", lambda d: (d / TAG / "mp_rank_01_model_states.pt").rename(
        d / TAG / "mp_rank_02_model_states.pt"), r"mp_rank files are not numbered 00\.\.01"),
    "hf-weights-missing": Case("hf", remove("model.safetensors"), r"src: no model\.safetensors"),
    "hf-index-names-missing-file": Case("hf_sharded", weight_map("model-00009-of-00009.safetensors"),
                                        r"index\.json: names model-00009-of-00009\.safetensors, which does not exist"),
    "meta-shard-gap": Case("meta", lambda d: (d / "consolidated.01.pth").rename(d / "consolidated.02.pth"),
                           r"consolidated\.XX\.pth files are not numbered 00\.\.01 \(found \[0, 2\]\)"),
    "latest-names-missing-tag": Case("neox", text("latest", "global_step7"), r"latest: names tag 'global_step7', but"),
    # -- shards that disagree ------------------------------------------------------------------------
    "one-rank-column-short": Case("neox", layer(2, (1,), short_cols),
                                  r"layer_02-model_01-model_states\.pt: tensor attention\.dense\.weight on TP rank 1 "
                                  r"is float32 \[32, 15\], expected float32 \[32, 16\]"),
    "one-rank-fp16": Case("neox", layer(3, (1,), set_("mlp.linear1.weight", lambda t: t.half())),
                          r"layer_03-model_01-model_states\.pt: tensor mlp\.linear1\.weight on TP rank 1 is float16 "
                          r"\[64, 32\], expected float32 \[64, 32\]"),
    "one-rank-extra-tensor": Case("neox", layer(3, (0,), set_("attention.bias_k", torch.zeros(4))),
                                  r"layer_03-model_01-model_states\.pt: tensor attention\.bias_k is missing on TP rank 1"),
    "sequential-one-rank-short": Case("neox_seq", lambda d: edit_pt(d / TAG / "mp_rank_01_model_states.pt", lambda s: (
        s["module"].__setitem__("sequential.3.attention.dense.weight", s["module"]["sequential.3.attention.dense.weight"][:, :-1].clone()))),
        r"mp_rank_01_model_states\.pt: tensor sequential\.3\.attention\.dense\.weight on TP rank 1 is float32 \[32, 15\]"),
    "one-layer-both-ranks-short": Case("neox", layer(3, (0, 1), short_cols),
                                       r"layer_03-model_00-model_states\.pt: tensor attention\.dense\.weight of layer 1 "
                                       r"is float32 \[32, 15\] on TP rank 0, but float32 \[32, 16\] in layer 0"),
    "meta-shard-short": Case("meta", meta_shard(1, lambda s: short_rows(s, "layers.1.attention.wv.weight")),
                             r"consolidated\.01\.pth: tensor layers\.1\.attention\.wv\.weight is float32 \[7, 32\], "
                             r"expected float32 \[8, 32\]"),
    "meta-shard-bf16": Case("meta", meta_shard(0, set_("norm.weight", lambda t: t.bfloat16())),
                            r"consolidated\.01\.pth: tensor norm\.weight is float32 \[32\], expected bfloat16 \[32\]"),
    # -- shapes contradicting the config (the spec) --------------------------------------------------
    "all-ranks-column-short": Case("neox", each_layer(short_cols),
                                   r"layer_02-model_00-model_states\.pt: tensor attention\.dense\.weight of layer 0 on "
                                   r"TP rank 0 is \[32, 15\], expected \[32, 16\] \(4 heads"),
    "all-ranks-mlp-rows-short": Case("neox", each_layer(lambda s: short_rows(s, "mlp.linear1.weight")),
                                     r"tensor mlp\.linear1\.weight of layer 0 on TP rank 0 is \[63, 32\], expected \[64, 32\]"),
    "hf-one-layer-column-short": Case("hf", st_edit("model.safetensors", lambda t: short_cols(
        t, "gpt_neox.layers.1.attention.dense.weight")), r"model\.safetensors: tensor layers\.1\.attn\.o\.weight "
        r"\(canonical name\) is \[32, 31\], expected \[32, 32\] \(4 heads"),
    "hf-sharded-mlp-short": Case("hf_sharded", lambda d: [st_edit(f.name, lambda t: [short_rows(t, k) for k in list(t)
                                                                                      if k.endswith("1.mlp.dense_h_to_4h.weight")])(d)
                                                          for f in sorted(d.glob("*.safetensors"))],
                                 r"model-0000\d-of-00002\.safetensors: tensor layers\.1\.mlp\.up\.weight \(canonical name\) "
                                 r"is \[63, 32\], expected \[64, 32\]"),
    "neox-gated-mlp-rows-short": Case("neox_llama", each_layer(lambda s: short_rows(s, "mlp.linear1.weight")),
                                      r"layer_02-model_00-model_states\.pt: gated mlp\.linear1 has 47 rows per rank, "
                                      r"not twice mlp\.linear2's 24 columns"),
    "meta-all-shards-short": Case("meta", lambda d: [meta_shard(r, lambda s: short_cols(s, "layers.1.attention.wo.weight"))(d)
                                                     for r in (0, 1)],
                                  r"src/consolidated\.\*\.pth: tensor layers\.1\.attn\.o\.weight \(canonical name\) is "
                                  r"\[32, 30\], expected \[32, 32\]"),
    "qkv-contradicts-heads": Case("neox", yaml_edit("model.yml", num_attention_heads=6),
                                  r"query_key_value has 96 rows over 2 rank\(s\); 6 heads / 6 KV heads of size 5 need 90"),
    "layers-contradict-files": Case("neox", yaml_edit("model.yml", num_layers=3),
                                    r"missing transformer layer 2: expected layer_04-model_00"),
    "hf-layers-contradict-config": Case("hf", hf_config(num_hidden_layers=3),
                                        r"config\.json: num_hidden_layers is 3, but the weights hold 2 layer\(s\)"),
    "hf-layer-missing": Case("hf", hf_tensors(drop_prefix("gpt_neox.layers.1.")),
                             r"config\.json: num_hidden_layers is 2, but the weights hold 1 layer\(s\)"),
    "hf-first-layer-missing": Case("hf", hf_tensors(drop_prefix("gpt_neox.layers.0.")),
                                   r"src: missing tensors of layer 0 \(the weights hold layers up to 1\)"),
    "hf-mlp-size-contradicts-config": Case("hf", hf_config(intermediate_size=99),
                                           r"model\.safetensors: tensor layers\.0\.mlp\.up\.weight \(canonical name\) "
                                           r"is \[64, 32\], expected \[99, 32\] \(config\.json intermediate_size 99"),
    # a damaged first layer (the sizes are read from it) is named as such, not through layer 1
    "hf-first-layer-mlp-short": Case("hf", hf_tensors(lambda t: short_rows(
        t, "gpt_neox.layers.0.mlp.dense_h_to_4h.weight")),
                                     r"model\.safetensors: tensor layers\.0\.mlp\.up\.weight \(canonical name\) is "
                                     r"\[63, 32\], expected \[64, 32\] \(config\.json intermediate_size 64"),
    "hf-first-layer-qkv-short": Case("hf", hf_tensors(lambda t: short_rows(
        t, "gpt_neox.layers.0.attention.query_key_value.weight")), r"model\.safetensors: tensor gpt_neox\.layers\.0\."
        r"attention\.query_key_value\.weight: fused QKV has 95 rows"),
    "hf-first-layer-q-short": Case("hf_gqa", hf_tensors(lambda t: short_rows(
        t, "model.layers.0.self_attn.q_proj.weight")),
                                   r"config\.json: layer 0's q_proj has 31 rows and k_proj 16"),
    "hf-embedding-column-short": Case("hf_gqa", hf_tensors(lambda t: short_cols(t, "model.embed_tokens.weight")),
                                      r"model\.safetensors: tensor embed\.weight \(canonical name\) is \[96, 31\], "
                                      r"expected \[96, 32\] \(config\.json hidden_size 32"),
    "meta-first-layer-wq-short": Case("meta", meta_shards(lambda s: short_rows(s, "layers.0.attention.wq.weight")),
                                      r"consolidated\.00\.pth: tensor layers\.0\.attention\.wq\.weight has 30 rows over "
                                      r"2 shard\(s\), expected 32 \(params\.json dim\)"),
    "meta-first-layer-w1-short": Case("meta", meta_shards(lambda s: short_rows(s, "layers.0.feed_forward.w1.weight")),
                                      r"consolidated\.\*\.pth: tensor layers\.0\.mlp\.gate\.weight \(canonical name\) "
                                      r"is \[46, 32\], expected \[48, 32\]"),
    "meta-embedding-fits-no-split": Case("meta", meta_shards(lambda s: short_rows(s, "tok_embeddings.weight")),
                                         r"consolidated\.00\.pth: tok_embeddings shard \(47, 32\) fits neither a dim-0 "
                                         r"split \(48, 32\) nor a dim-1 split"),
    "tp-contradicts-files": Case("neox", yaml_edit(model_parallel_size=4), r"layer_00 has 2 TP file\(s\).*expected 4"),
    # -- bad or conflicting YAML ---------------------------------------------------------------------
    "yaml-string-for-number": Case("neox", yaml_edit("model.yml", num_attention_heads="four"),
                                   r"model\.yml: num-attention-heads must be an integer, got 'four'"),
    "yaml-string-for-float": Case("neox", yaml_edit(rotary_pct="quarter"),
                                  r"local_setup\.yml: rotary-pct must be a number, got 'quarter'"),
    "yaml-zero-heads": Case("neox", yaml_edit("model.yml", num_attention_heads=0),
                            r"model\.yml: num-attention-heads must be positive, got 0"),
    "yaml-negative-eps": Case("neox", yaml_edit(layernorm_epsilon=-1e-5),
                              r"local_setup\.yml: layernorm-epsilon must be at least 0, got -1e-05"),
    "hf-config-zero-hidden": Case("hf", hf_config(hidden_size=0),
                                  r"config\.json: hidden_size must be a positive integer, got 0"),
    "hf-config-zero-layers": Case("hf", hf_config(num_hidden_layers=0),
                                  r"config\.json: num_hidden_layers must be a positive integer, got 0"),
    "hf-config-negative-eps": Case("hf", hf_config(layer_norm_eps=-1),
                                   r"config\.json: layer_norm_eps must be a non-negative number, got -1"),
    "hf-config-zero-positions": Case("hf", hf_config(max_position_embeddings=0),
                                     r"config\.json: max_position_embeddings must be a positive integer, got 0"),
    "hf-config-negative-heads": Case("hf", json_edit("config.json", lambda c: c.update(num_attention_heads=-4)),
                                     r"config\.json: num_attention_heads must be a positive integer, got -4"),
    "meta-params-zero-heads": Case("meta", json_edit("params.json", lambda p: p.update(n_heads=0)),
                                   r"params\.json: n_heads must be a positive integer, got 0"),
    "yaml-unknown-activation": Case("neox", yaml_edit(activation="swish9"), r"activation 'swish9' is not a NeoX act"),
    "yaml-unknown-norm": Case("neox", yaml_edit(norm="fancynorm"), r"norm 'fancynorm' is not a NeoX norm"),
    "yaml-contradicting-norm": Case("neox", yaml_edit(norm="scalenorm"), r"'scalenorm' in the config, but the layers"),
    "yaml-missing-heads": Case("neox", yaml_edit("model.yml", drop=("num_attention_heads",)),
                               r"num_attention_heads is unknown: no NeoX YAML"),
    "yaml-conflict": Case("neox", yaml_edit(num_layers=3), r"model\.yml: num_layers = 2 conflicts with 3 in .*local_setup\.yml"),
    "yaml-syntax": Case("neox", text(f"{TAG}/configs/model.yml", "num-layers: [2\n"), r"model\.yml: invalid YAML"),
    "yaml-not-a-mapping": Case("neox", text(f"{TAG}/configs/model.yml", "- 1\n- 2\n"),
                               r"model\.yml: a NeoX config must be a YAML mapping"),
    "hf-config-invalid-json": Case("hf", text("config.json", "{\"model_type\": "), r"config\.json: invalid JSON"),
    "hf-config-not-object": Case("hf", text("config.json", "[1, 2]"), r"config\.json: expected a JSON object"),
    "hf-config-unknown-arch": Case("hf", json_edit("config.json", lambda c: c.update(model_type="bert",
                                                                                     architectures=["BertModel"])),
                                   r"config\.json"),
    "meta-params-missing-dim": Case("meta", json_edit("params.json", lambda p: p.pop("dim")), r"params\.json: missing 'dim'"),
    # -- non-dividing TP / KV heads -------------------------------------------------------------------
    "tp-does-not-divide-heads": Case("hf", nothing, r"--tp 3 does not divide the 4 attention heads", ("--tp", "3")),
    "tp-does-not-divide-kv-heads": Case("hf_gqa", nothing, r"--tp 4 does not divide the 2 KV heads", ("--tp", "4")),
    "drop-window-without-window": Case("neox", nothing, r"--drop-sliding-window: the model has no sliding window",
                                       ("--drop-sliding-window",)),
    "meta-shards-do-not-divide-kv": Case("hf_gqa", nothing, r"--tp 4 does not divide the 2 KV heads",
                                         ("--to", "meta", "--tp", "4"), command="convert"),
    # -- paths escaping the checkpoint ---------------------------------------------------------------
    "latest-escapes": Case("neox", text("latest", f"../outside/{TAG}"),
                           r"latest: names '\.\./outside/global_step1000', which is not a path inside"),
    "latest-absolute": Case("neox", text("latest", "/etc"), r"latest: names '/etc', which is not a path inside"),
    "weight-map-escapes": Case("hf_sharded", weight_map("../elsewhere.safetensors"),
                               r"index\.json: weight_map names '\.\./elsewhere\.safetensors', which is not a path inside"),
    "weight-map-absolute": Case("hf_sharded", weight_map("/tmp/x.safetensors"),
                                r"weight_map names '/tmp/x\.safetensors', which is not a path inside"),
    # -- NaN / Inf (--check-finite) -------------------------------------------------------------------
    "nan-in-layer": Case("neox", layer(3, (1,), poison("post_attention_layernorm.bias", float("nan"))),
                         r"layer_03-model_01-model_states\.pt: tensor post_attention_layernorm\.bias on TP rank 1 has 1 "
                         r"non-finite value\(s\) \(first: nan at index \[3\]\)", ("--check-finite",)),
    "inf-in-sequential": Case("neox_seq", lambda d: edit_pt(d / TAG / "mp_rank_01_model_states.pt", lambda s: poison(
        "sequential.0.word_embeddings.weight", float("inf"), 40)(s["module"])),
        r"mp_rank_01_model_states\.pt: tensor sequential\.0\.word_embeddings\.weight on TP rank 1 has 1 non-finite "
        r"value\(s\) \(first: inf at index \[1, 8\]\)", ("--check-finite",)),
    "nan-in-safetensors": Case("hf", st_edit("model.safetensors", poison("gpt_neox.layers.1.attention.dense.weight",
                                                                         float("-inf"), 5)),
                               r"model\.safetensors: tensor gpt_neox\.layers\.1\.attention\.dense\.weight has 1 "
                               r"non-finite value\(s\) \(first: -inf at index \[0, 5\]\)", ("--check-finite",)),
    "nan-in-meta-shard": Case("meta", meta_shard(1, poison("layers.0.ffn_norm.weight", float("nan"))),
                              r"consolidated\.01\.pth: tensor layers\.0\.ffn_norm\.weight on TP rank 1 has 1 non-finite",
                              ("--check-finite",)),
}

COMMANDS = {"neox": NEOX_TO_HF, "neox_seq": NEOX_TO_HF, "neox_llama": NEOX_TO_HF, "hf": "hf-to-neox",
            "hf_sharded": "hf-to-neox", "hf_gqa": "hf-to-neox", "meta": "llama-to-neox"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, pristine, tmp_path):
    case = CASES[name]
    src = fresh(pristine, case.source, tmp_path / "src")
    case.damage(src)
    out = tmp_path / "out"
    code, _, err = run_cli(case.command or COMMANDS[case.source], src, out, *case.args)
    lines = err.strip().splitlines()
    assert code == case.code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(case.pattern, lines[0]), lines[0]
    assert no_output(out)


@pytest.mark.parametrize("name", ["all-ranks-column-short", "qkv-contradicts-heads", "neox-gated-mlp-rows-short",
                                  "hf-mlp-size-contradicts-config", "meta-first-layer-wq-short"])
def test_every_command_refuses_damage_the_spec_shows(name, pristine, tmp_path):
    """Damage that is the same on every rank (only the spec can see it) and shapes contradicting the
    config are refused by every command that reads the checkpoint: the readers check, not the
    conversion. Conversions, parity and inspect exit 2; verify calls it damage (exit 1)."""
    case = CASES[name]
    src = fresh(pristine, case.source, tmp_path / "src")
    case.damage(src)
    for args in ((COMMANDS[case.source], src, tmp_path / "out"), ("parity", src, pristine["hf_gqa"]), ("inspect", src)):
        code, _, err = run_cli(*args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and re.search(case.pattern, lines[0]), (args[0], err)
    assert no_output(tmp_path / "out")
    code, out, _ = run_cli("verify", src, "--json")
    report = json.loads(out)
    assert code == 1 and report["verdict"] == "damaged" and re.search(case.pattern, report["problems"][0]), report


def test_pickle_payload_never_runs(pristine, tmp_path):
    marker = Path("/tmp/neoxconv-pwned")
    marker.unlink(missing_ok=True)
    src = fresh(pristine, "neox", tmp_path / "src")
    evil_layer(src)
    code, _, _ = run_cli("inspect", src)
    assert code == 2 and not marker.exists()


def test_nan_passes_without_check_finite(pristine, tmp_path):
    """--check-finite is what turns NaN into an error: without it the values convert as they are."""
    src = fresh(pristine, "neox", tmp_path / "src")
    layer(3, (1,), poison("post_attention_layernorm.bias", float("nan")))(src)
    code, _, err = run_cli("inspect", src, "--check-finite")
    assert code == 2 and "layer_03-model_01-model_states.pt: tensor post_attention_layernorm.bias" in err
    code, _, err = run_cli(NEOX_TO_HF, src, tmp_path / "out")
    assert code == 0, err


# -- what stays allowed --------------------------------------------------------------------------


@pytest.mark.parametrize("ref, ok", [("model-00001-of-00002.safetensors", True), ("sub/dir/x.safetensors", True),
                                     ("./x", True), ("../x", False), ("a/../../x", False), ("/etc/passwd", False),
                                     ("", False), (".", False), (7, False), (None, False)])
def test_reference_rule(ref, ok, tmp_path):
    from neoxconv.errors import DamagedInput
    from neoxconv.io import inside

    if ok:
        assert inside(tmp_path, ref, "index") == tmp_path / ref
    else:
        with pytest.raises(DamagedInput, match=r"index names .*, which is not a path inside"):
            inside(tmp_path, ref, "index")


def test_hf_cache_symlinks_stay_allowed(pristine, tmp_path):
    """The HF cache layout: snapshots/REV/<file> -> ../../blobs/<sha>, outside the snapshot dir."""
    cache = tmp_path / "models--tiny"
    snap, blobs = cache / "snapshots" / "abc123", cache / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in sorted(pristine["hf_sharded"].iterdir()):
        (blobs / f"sha-{f.name}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / f"sha-{f.name}")
    out = tmp_path / "neox"
    code, _, err = run_cli("hf-to-neox", snap, out, "--tp", "2")
    assert code == 0, err
    code, text_out, _ = run_cli("verify", snap)
    assert code == 0 and text_out.startswith("SOUND"), text_out


def test_check_finite_scans_in_chunks(monkeypatch):
    """Huge tensors are scanned in chunks (bounded memory): a NaN and an Inf in later chunks are
    counted and the first is located in the tensor's own coordinates."""
    import neoxconv.io as nio
    from neoxconv.errors import DamagedInput

    monkeypatch.setattr(nio, "_FINITE_CHUNK", 7)
    t = torch.zeros(5, 6, dtype=torch.bfloat16)
    nio.set_check_finite(True)
    try:
        nio.check_finite(t, "f.pt", "w", 3)
        t[2, 3], t[4, 0] = float("inf"), float("nan")
        with pytest.raises(DamagedInput, match=r"^f\.pt: tensor w on TP rank 3 has 2 non-finite value\(s\) "
                                               r"\(first: inf at index \[2, 3\]\)$"):
            nio.check_finite(t, "f.pt", "w", 3)
        nio.check_finite(torch.tensor([1, 2]), "f.pt", "ints", 0)  # integers cannot be non-finite
    finally:
        nio.set_check_finite(False)
    nio.check_finite(t, "f.pt", "w", 3)  # off unless asked for


def test_numpy1_rng_state_is_accepted(pristine, tmp_path):
    """NeoX files written under numpy 1 pickle their RNG state naming numpy.core.multiarray; numpy 2
    moved it to numpy._core. The allowlist accepts both names (and nothing more)."""
    from neoxconv.io import load_pickle

    src = pristine["neox_seq"] / TAG / "mp_rank_00_model_states.pt"
    dst = tmp_path / "np1.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
                assert b"cnumpy.core.multiarray\n_reconstruct\n" in data  # the numpy-1 name, for real
            zout.writestr(info, data)
    state = load_pickle(dst)
    assert np.array_equal(state["np_rng_state"][1], load_pickle(src)["np_rng_state"][1])
