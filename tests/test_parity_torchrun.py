"""`neoxconv parity` under torchrun: the NeoX reference runs one real process per TP rank
(gloo), with real all-reduce/all-gather, and must agree with the single-process result."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from neoxconv.convert import convert
from neoxconv.tiny import tiny_hf_model


def torchrun(nproc, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "neoxconv", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base = tmp_path_factory.mktemp("torchrun")
    hf, neox = base / "hf", base / "neox"
    tiny_hf_model("gptneox", seed=5).save_pretrained(hf)
    convert(hf, neox, to="neox", tp=2)
    return hf, neox


def test_parity_under_torchrun_matches_simulated(pair, tmp_path):
    hf, neox = pair
    r = torchrun(2, "parity", neox, hf, "--json", tmp_path / "dist.json")
    assert r.returncode == 0, r.stderr[-2000:]
    dist = json.loads((tmp_path / "dist.json").read_text())
    assert dist["verdict"] == "pass" and dist["info"]["neox_backend"].startswith("torch.distributed (2")
    single = subprocess.run([sys.executable, "-m", "neoxconv", "parity", neox, hf, "--json", tmp_path / "one.json"],
                            capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert single.returncode == 0, single.stderr
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["info"]["neox_backend"].startswith("simulated")
    # same batch, same comparison: the two backends agree to summation-order noise
    assert abs(dist["max_abs_diff"] - one["max_abs_diff"]) < 1e-5


def test_torchrun_world_size_must_equal_tp(pair):
    hf, neox = pair
    r = torchrun(1 + 2, "parity", neox, hf)
    assert r.returncode != 0
    assert "torchrun started 3 processes, but the NeoX checkpoint has TP 2" in r.stderr + r.stdout


def test_broken_checkpoint_fails_under_torchrun(pair, tmp_path):
    hf, neox = pair
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(neox, broken)
    f = next(broken.glob("global_step*")) / "layer_02-model_01-model_states.pt"
    sd = torch.load(f, weights_only=True)
    sd["attention.dense.bias"] = sd["attention.dense.bias"] * 3  # a row bias counted three times
    torch.save(sd, f)
    r = torchrun(2, "parity", broken, hf, "--json", tmp_path / "r.json")
    assert r.returncode != 0
    assert json.loads((tmp_path / "r.json").read_text())["verdict"] == "fail"
