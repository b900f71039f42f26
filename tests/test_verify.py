"""`neoxconv verify`, the manifest conversions write, the spec-level shape table, and the drift
report of replicated NeoX tensors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.neox_raw import random_rank_tensors, write_neox_checkpoint
from fixtures.pristine import NEOX_CFG, edit_pt, fresh, layer_file, run_cli
from neoxconv.convert import convert
from neoxconv.formats.neox import read_neox
from neoxconv.formats.neox_files import Drift
from neoxconv.manifest import NAME
from neoxconv.validate import neox_mismatch, neox_rank_shapes


@pytest.fixture(scope="module")
def outputs(pristine, tmp_path_factory) -> dict[str, Path]:
    """Checkpoints neoxconv wrote (each with a manifest): NeoX pipeline TP 2, NeoX legacy
    sequential GQA TP 2, HF from NeoX, Meta (2 shards)."""
    root = tmp_path_factory.mktemp("outputs")
    convert(pristine["hf"], root / "neox", to="neox", tp=2)
    convert(pristine["hf_gqa"], root / "neox_legacy", to="neox", tp=2, layout="sequential", schema="legacy")
    convert(pristine["neox"], root / "hf", to="hf")
    convert(pristine["hf_gqa"], root / "meta", to="meta", shards=2)
    return {p.name: p for p in root.iterdir()}


def verify(path) -> tuple[int, dict]:
    code, out, err = run_cli("verify", path, "--json")
    return code, json.loads(out)


def flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file_with_size_and_sha256(outputs):
    for out in outputs.values():
        manifest = json.loads((out / NAME).read_text())
        assert manifest["format"] == "neoxconv-manifest" and manifest["version"] == 1 and manifest["neoxconv"]
        files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != NAME)
        assert sorted(manifest["files"]) == files and files
        for rel, entry in manifest["files"].items():
            data = (out / rel).read_bytes()
            assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("name", ["neox", "neox_legacy", "hf", "meta"])
def test_sound_output_verifies(outputs, name):
    code, report = verify(outputs[name])
    assert code == 0 and report["verdict"] == "sound", report
    assert report["manifest"]["files"] == len(json.loads((outputs[name] / NAME).read_text())["files"])
    assert report["problems"] == [] and report["tensors"] > 0


@pytest.mark.parametrize("name", ["neox", "hf", "meta"])
def test_one_flipped_byte_in_any_file_is_damage(outputs, name, tmp_path):
    """With a manifest, a single flipped bit anywhere (tensor data included) is exit 1, naming the file."""
    src = outputs[name]
    files = sorted(json.loads((src / NAME).read_text())["files"])
    if name == "neox":  # one file of each kind: a layer on each rank, embedding, head, mp_rank, YAML, records
        keep = {f"global_step0/layer_{n}-model_states.pt" for n in ("00-model_01", "03-model_00", "06-model_01")}
        files = [f for f in files if not f.startswith("global_step0/layer_") or f in keep]
        assert len(files) == 8, files
    for i, rel in enumerate(files):
        copy = shutil.copytree(src, tmp_path / f"c{i}")
        flip(copy / rel)
        code, report = verify(copy)
        assert code == 1 and report["verdict"] == "damaged", (rel, report)
        assert any(p.startswith(f"{copy / rel}: sha256") for p in report["problems"]), (rel, report)


def test_truncated_missing_and_added_files(outputs, tmp_path):
    neox = shutil.copytree(outputs["neox"], tmp_path / "neox")
    layer = neox / "global_step0" / "layer_03-model_01-model_states.pt"
    layer.write_bytes(layer.read_bytes()[:-10])
    (neox / "global_step0" / "neoxconv.json").unlink()
    (neox / "README.md").write_text("mine")
    code, report = verify(neox)
    assert code == 1
    assert f"{layer}: size" in report["problems"][0] and "truncated" in report["problems"][0]
    assert report["problems"][1].startswith(f"{neox / 'global_step0' / 'neoxconv.json'}: missing")
    assert any("README.md" in n for n in report["notes"])
    # A file added after the conversion is not damage.
    clean = shutil.copytree(outputs["hf"], tmp_path / "hf")
    (clean / "NOTES.txt").write_text("mine")
    code, report = verify(clean)
    assert code == 0 and "1 file(s) not in the manifest" in report["notes"][0]


def test_tag_dir_is_covered_by_the_save_dirs_manifest(outputs, tmp_path):
    neox = shutil.copytree(outputs["neox"], tmp_path / "neox")
    code, report = verify(neox / "global_step0")
    assert code == 0 and report["manifest"]["file"] == str(neox / NAME)
    flip(neox / "global_step0" / "layer_00-model_01-model_states.pt", at=-20)
    assert verify(neox / "global_step0")[0] == 1


def test_damaged_manifest_is_damage(outputs, tmp_path):
    hf = shutil.copytree(outputs["hf"], tmp_path / "hf")
    (hf / NAME).write_text("{\"format\": \"neoxconv-manifest\", \"files\": 3}")
    code, report = verify(hf)
    assert code == 1 and "not a neoxconv-manifest file" in report["problems"][0]


def test_foreign_checkpoints(pristine, tmp_path):
    """Without a manifest: structure, shapes and finite values are what verify can check."""
    code, report = verify(pristine["neox"])
    assert code == 0 and report["manifest"] is None and "no neoxconv-manifest.json" in report["notes"][0]
    nan = fresh(pristine, "neox_seq", tmp_path / "nan")
    edit_pt(nan / "global_step1000" / "mp_rank_00_model_states.pt",
            lambda s: s["module"]["sequential.5.norm.weight"].__setitem__(0, float("nan")))
    code, report = verify(nan)
    assert code == 1 and report["problems"] == [
        f"{nan / 'global_step1000' / 'mp_rank_00_model_states.pt'}: tensor sequential.5.norm.weight on TP rank 0 has "
        "1 non-finite value(s) (first: nan at index [0])"]
    short = fresh(pristine, "neox", tmp_path / "short")  # the same damage in every layer and rank: the spec sees it
    for idx in (2, 3):
        for r in (0, 1):
            edit_pt(layer_file(short, idx, r), lambda s: s.__setitem__("mlp.linear1.weight", s["mlp.linear1.weight"][1:].clone()))
    code, report = verify(short)
    assert code == 1 and "mlp.linear1.weight of layer 0 on TP rank 0 is [63, 32], expected [64, 32]" in report["problems"][0]
    hf = fresh(pristine, "hf", tmp_path / "hf")  # HF and Meta: the canonical tensors against the spec
    tensors = load_file(str(hf / "model.safetensors"))
    tensors["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"] = tensors["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"][:, :60]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(hf / "model.safetensors"))
    code, report = verify(hf)
    assert code == 1 and report["problems"] == [
        f"{hf / 'model.safetensors'}: tensor layers.1.mlp.down.weight (canonical name) is [32, 60], expected [32, 64] "
        "(4 heads, 4 KV heads, hidden 32, MLP 64, vocab rows 100)"]
    truncated = fresh(pristine, "hf", tmp_path / "truncated")
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:-4])
    code, report = verify(truncated)
    assert code == 1 and "model.safetensors: not a readable safetensors file" in report["problems"][0]


def test_unreadable_input_is_exit_2(pristine, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    code, report = verify(junk)
    assert code == 2 and report["verdict"] == "unreadable" and "unknown format" in report["error"]
    bad_yaml = fresh(pristine, "neox", tmp_path / "yaml")
    (bad_yaml / "global_step1000" / "configs" / "model.yml").write_text("num-layers: [2\n")
    code, report = verify(bad_yaml)
    assert code == 2 and "invalid YAML" in report["error"]
    code, text, _ = run_cli("verify", junk)
    assert code == 2 and text.startswith("UNREADABLE")


def test_hf_side_files_must_parse(pristine, tmp_path):
    hf = fresh(pristine, "hf", tmp_path / "hf")
    (hf / "generation_config.json").write_text("{")
    code, report = verify(hf)
    assert code == 1 and "generation_config.json: does not parse as JSON" in report["problems"][0]


# -- the spec-level table against what the writer writes -----------------------------------------


@pytest.mark.parametrize("name", ["neox", "neox_legacy"])
def test_spec_table_equals_written_shapes(outputs, name):
    ckpt = read_neox(outputs[name])
    nf, spec = ckpt.info["files"], ckpt.spec
    assert sorted(nf.stored) == nf.indices
    for idx, ranks in nf.stored.items():
        want = neox_rank_shapes(spec, nf.tp, ckpt.info["schema"], idx)
        for stored in ranks:
            got = {k: shape for k, (shape, _) in stored.items() if k != "attention.rotary_emb.inv_freq"}
            assert got == want, idx


def test_spec_mismatch_names_tensor_and_numbers(outputs):
    ckpt = read_neox(outputs["neox_legacy"])  # GQA llama, legacy names: mlp.w1/w2/w3, TP 2
    spec = ckpt.spec
    shapes = neox_rank_shapes(spec, 2, "legacy", 3)
    assert neox_mismatch(spec, 2, "legacy", 3, shapes) is None
    assert neox_mismatch(spec, 2, "legacy", 3, {**shapes, "mlp.w3.weight": (23, 32)}, rank=1) == (
        "tensor mlp.w3.weight of layer 1 on TP rank 1 is [23, 32], expected [24, 32] (4 heads, 2 KV heads, hidden 32, "
        "MLP 48, vocab rows 256, TP 2)")
    missing = {k: v for k, v in shapes.items() if k != "attention.dense.weight"}
    assert "tensor attention.dense.weight of layer 1 is missing" in neox_mismatch(spec, 2, "legacy", 3, missing)
    assert "unexpected tensor attention.bias_k" in neox_mismatch(spec, 2, "legacy", 3, {**shapes, "attention.bias_k": (4,)})
    assert neox_mismatch(spec, 2, "current", 3, shapes).startswith("tensor mlp.linear1.weight of layer 1 is missing")


# -- drift of replicated copies ------------------------------------------------------------------


def test_drift_rule_is_one_rounding_step():
    one = torch.tensor([1.0, 0.5], dtype=torch.float16)
    ulp = torch.tensor([1.0 + 2**-10, 0.5], dtype=torch.float16)  # the next fp16 value after 1.0
    two = torch.tensor([1.0 + 2**-9, 0.5], dtype=torch.float16)
    assert Drift.of(one, one.clone(), 1) is None
    assert Drift.of(one, ulp, 1) == Drift(2**-10, 1, False)
    assert Drift.of(one, two, 1) == Drift(2**-9, 1, True)


def test_drifted_norms_warn_with_numbers(tmp_path):
    """Copies that differ beyond rounding (as GPT-NeoX-20B's do): the conversion warns, naming the
    worst tensor, file and size; inspect shows it; verify notes it and still says sound."""
    ranks = random_rank_tensors(tp=2, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=128, tied=False,
                                same_norms=True)
    ranks[3][1]["input_layernorm.weight"] = ranks[3][0]["input_layernorm.weight"] + 0.25
    src = write_neox_checkpoint(tmp_path / "src", ranks, NEOX_CFG)
    code, _, err = run_cli("neox-to-hf", src, tmp_path / "hf")
    assert code == 0, err
    text = " ".join(err.split())
    assert ("1 replicated tensor(s) (norms) differ across the 2 TP ranks by more than one rounding step of their dtype "
            "(the tolerance); the largest difference is 0.25 in input_layernorm.weight "
            "(layer_03-model_01-model_states.pt, rank 1 vs rank 0)") in text, text
    code, out, _ = run_cli("inspect", src, "--json")
    assert code == 0 and "replicated tensor(s)" in json.loads(out)["warnings"][0]
    code, report = verify(src)
    assert code == 0 and any("replicated tensor(s)" in n for n in report["notes"])


def test_equal_norm_copies_give_no_warning(pristine, tmp_path):
    code, _, err = run_cli("neox-to-hf", pristine["neox"], tmp_path / "hf")
    assert code == 0 and "replicated tensor(s)" not in err and "differ across" not in err, err


def test_inspect_shows_the_manifest_and_verify_renders(outputs):
    code, out, _ = run_cli("inspect", outputs["hf"], "--json")
    info = json.loads(out)
    assert code == 0 and info["manifest"]["files"] == 4 and info["manifest"]["neoxconv"]
    assert info["manifest"]["bytes"] == sum(e["size"] for e in json.loads((outputs["hf"] / NAME).read_text())["files"].values())
    code, out, _ = run_cli("verify", outputs["meta"])
    assert code == 0 and out.startswith(f"SOUND {outputs['meta']} (meta, ") and "files in the manifest" in out
