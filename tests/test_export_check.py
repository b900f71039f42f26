"""Validation of an export before it is published (neoxconv.export_check): no network."""

from __future__ import annotations

import json

import pytest

from fixtures.hf_export import build_export, copy_dir
from neoxconv.errors import NeoxconvError
from neoxconv.export_check import list_upload_files, validate_export_dir


def test_validate_complete_export(export_dir):
    check = validate_export_dir(export_dir)
    names = [n for n, _ in check.files]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(names)
    assert check.weight_files == ["model.safetensors"]
    assert check.total_bytes == sum((export_dir / n).stat().st_size for n in names)
    assert check.warnings == []


def test_validate_missing_shard(tmp_path):
    out = tmp_path / "sharded"
    build_export(out, max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    validate_export_dir(out)  # complete: fine
    (out / shards[-1]).unlink()
    with pytest.raises(NeoxconvError, match=rf"model.safetensors.index.json names missing file\(s\): {shards[-1]}") as e:
        validate_export_dir(out)
    assert "\n" not in str(e.value)


def test_validate_index_tensor_not_in_shard(tmp_path):
    out = tmp_path / "sharded"
    build_export(out, max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["gpt_neox.layers.9.attention.dense.weight"] = first
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(NeoxconvError, match=rf"{first} lacks tensor\(s\) listed in model.safetensors.index.json: gpt_neox.layers.9"):
        validate_export_dir(out)


def test_validate_truncated_and_garbage_safetensors(export_dir, tmp_path):
    d = copy_dir(export_dir, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(NeoxconvError, match=r"model.safetensors: data section is \d+ bytes but the header describes \d+"):
        validate_export_dir(d)
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(NeoxconvError, match="model.safetensors: header length"):
        validate_export_dir(d)
    (d / "model.safetensors").write_bytes((20).to_bytes(8, "little") + b"this is not json!!!!")
    with pytest.raises(NeoxconvError, match="header is not valid JSON"):
        validate_export_dir(d)


def test_validate_config_and_weights(export_dir, tmp_path):
    d = copy_dir(export_dir, tmp_path)
    (d / "config.json").write_text("{ broken")
    with pytest.raises(NeoxconvError, match="config.json does not load with transformers"):
        validate_export_dir(d)
    (d / "config.json").unlink()
    (d / "model.safetensors").unlink()
    with pytest.raises(NeoxconvError, match="config.json is missing; no weights file"):
        validate_export_dir(d)
    with pytest.raises(NeoxconvError, match="not a directory"):
        validate_export_dir(tmp_path / "nope")



def test_listing_skips_what_upload_folder_never_sends(export_dir, tmp_path):
    d = copy_dir(export_dir, tmp_path)
    for junk in (".git/config", "extra/.git/HEAD", ".cache/huggingface/download/x.lock"):
        (d / junk).parent.mkdir(parents=True, exist_ok=True)
        (d / junk).write_text("x")
    (d / "extra" / "notes.txt").write_text("kept")
    names = [n for n, _ in list_upload_files(d)]
    assert "extra/notes.txt" in names and names == sorted(names)
    assert not [n for n in names if ".git/" in n or n.startswith(".cache/")]
