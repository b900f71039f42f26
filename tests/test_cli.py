"""The command line as a user meets it: help, inspect, and bad input (one line, exit 2,
no traceback, nothing left that looks like a finished output)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.factories import save_hf, tiny_hf_model
from fixtures.neox_raw import random_rank_tensors, write_neox_checkpoint

CFG = dict(num_layers=2, hidden_size=32, num_attention_heads=4, rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True)


def run(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "neoxconv", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_hf(tiny_hf_model("gptneox"), tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture
def neox_tp2(tmp_path):
    ranks = random_rank_tensors(tp=2, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=128, tied=False)
    return write_neox_checkpoint(tmp_path / "ckpt", ranks, CFG)


def assert_clean_failure(result, out: Path, *fragments):
    assert result.returncode == 2, result.stderr
    text = result.stderr.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    for f in fragments:
        assert f in text, text
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "partial output left behind"


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("neox-to-hf", "hf-to-neox", "convert", "inspect"):
        assert cmd in r.stdout
    r = run("hf-to-neox", "--help")
    assert r.returncode == 0 and "--tp" in r.stdout and "--neox-schema" in r.stdout


def test_cli_end_to_end_and_inspect(tmp_path, hf_dir):
    neox = tmp_path / "neox"
    r = run("hf-to-neox", hf_dir, neox, "--tp", "2", "--layout", "sequential")
    assert r.returncode == 0, r.stderr
    r = run("inspect", neox, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "neox" and info["layout"] == "sequential" and info["tp"] == 2
    assert info["arch"] == "gptneox" and info["dtype"] == "float32"
    model = tiny_hf_model("gptneox")
    padding = (256 - 100) * 32 * 2  # 100 real rows padded to 128 x TP=2, in embedding and head
    assert info["parameters"] == sum(p.numel() for p in model.parameters()) + padding
    names = {t["name"] for t in info["tensors"]}
    assert "layers.1.attn.q.weight" in names and "lm_head.weight" in names
    r = run("neox-to-hf", neox, tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    r = run("inspect", tmp_path / "hf")
    assert r.returncode == 0 and "gptneox" in r.stdout and "hf" in r.stdout


def test_missing_layer_file(tmp_path, neox_tp2):
    for f in (neox_tp2 / "global_step1000").glob("layer_03-*"):
        f.unlink()
    out = tmp_path / "out"
    assert_clean_failure(run("neox-to-hf", neox_tp2, out), out, "missing transformer layer 1", "layer_03")


def test_tp_file_count_mismatch(tmp_path, neox_tp2):
    (neox_tp2 / "global_step1000" / "layer_03-model_01-model_states.pt").unlink()
    out = tmp_path / "out"
    assert_clean_failure(run("neox-to-hf", neox_tp2, out), out, "layer_03 has 1 TP file(s)", "expected 2")


def test_missing_rank_file_of_the_embedding(tmp_path, neox_tp2):
    """Missing layer_00-model_01: the error names layer_00, not every other layer."""
    (neox_tp2 / "global_step1000" / "layer_00-model_01-model_states.pt").unlink()
    out = tmp_path / "out"
    assert_clean_failure(run("neox-to-hf", neox_tp2, out), out, "layer_00 has 1 TP file(s) (model_00)", "expected 2")


def test_tp_that_does_not_divide(tmp_path, hf_dir):
    out = tmp_path / "out"
    assert_clean_failure(run("hf-to-neox", hf_dir, out, "--tp", "3"), out, "--tp 3 does not divide the 4 attention heads")


def test_unknown_format(tmp_path):
    src = tmp_path / "junk"
    src.mkdir()
    (src / "notes.txt").write_text("hello")
    out = tmp_path / "out"
    assert_clean_failure(run("convert", src, out, "--to", "hf"), out, "junk: unknown format")


def test_existing_output_refused_unless_force(tmp_path, hf_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run("hf-to-neox", hf_dir, out)
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    r = run("hf-to-neox", hf_dir, out, "--force")
    assert r.returncode == 0, r.stderr
    assert (out / "latest").is_file() and not (out / "keep.txt").exists()


def test_failure_midway_leaves_no_output(tmp_path, hf_dir):
    """A corrupt weights file is found while writing: no OUT, no partial dir."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((hf_dir / "config.json").read_text())
    data = (hf_dir / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    r = run("hf-to-neox", bad, out, "--tp", "2")
    assert_clean_failure(r, out, "model.safetensors")


def test_debug_shows_traceback(tmp_path, hf_dir):
    out = tmp_path / "out"
    r = run("--debug", "hf-to-neox", hf_dir, out, "--tp", "3")
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_demo_runs_and_proves_the_round_trip(tmp_path):
    r = run("demo", tmp_path / "demo")
    assert r.returncode == 0, r.stderr
    assert "bit-exact" in r.stdout and "parity: PASS" in r.stdout
    assert (tmp_path / "demo" / "neox-tp2" / "latest").is_file()
    assert (tmp_path / "demo" / "hf-export" / "config.json").is_file()


def test_version():
    from neoxconv import __version__

    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"neoxconv {__version__}"


# Every choice option is an Enum: --help lists the values, typer refuses others as a usage
# error (exit 2, usage text) before any work starts. In-process: parsing needs no subprocess.
BAD_CHOICES = [
    (["convert", "SRC", "OUT", "--to", "safetensors"], "--to"),
    (["convert", "SRC", "OUT", "--to", "neox", "--layout", "diagonal"], "--layout"),
    (["hf-to-neox", "SRC", "OUT", "--neox-schema", "v2"], "--neox-schema"),
    (["hf-to-neox", "SRC", "OUT", "--dtype", "fp8"], "--dtype"),
    (["neox-to-hf", "SRC", "OUT", "--arch", "qwen2"], "--arch"),
    (["llama-to-neox", "SRC", "OUT", "--qkv-layout", "blocked"], "--qkv-layout"),
    (["convert", "SRC", "OUT", "--to", "neox", "--out-qkv-layout", "fakehead"], "--out-qkv-layout"),
    (["convert", "SRC", "OUT", "--to", "meta", "--meta-style", "llama4"], "--meta-style"),
    (["parity", "A", "B", "--dtype", "auto"], "--dtype"),  # auto is a conversion choice only
    (["parity", "A", "B", "--replicated", "rank0"], "--replicated"),
    (["parity", "A", "B", "--qkv-layout-b", "gqa"], "--qkv-layout-b"),
    (["train-check", "CKPT", "--optimizer", "lamb"], "--optimizer"),
    (["train-check", "CKPT", "--dtype", "fp64"], "--dtype"),
]


@pytest.mark.parametrize("args,option", BAD_CHOICES, ids=lambda x: x if isinstance(x, str) else x[0])
def test_bad_choice_is_a_usage_error(tmp_path, args, option):
    from typer.testing import CliRunner

    from neoxconv.cli import app

    r = CliRunner().invoke(app, [str(tmp_path / a) if a in ("SRC", "OUT", "A", "B", "CKPT") else a for a in args])
    assert r.exit_code == 2, r.output
    assert "Usage:" in r.output and f"Invalid value for '{option}'" in r.output, r.output
    assert not list(tmp_path.iterdir())  # nothing started


def test_help_lists_the_choices():
    from typer.testing import CliRunner

    from neoxconv.cli import app

    runner = CliRunner(env={"COLUMNS": "250"})
    text = runner.invoke(app, ["convert", "--help"]).output
    for choices in ("neox|hf|meta", "pipeline|sequential", "current|legacy", "auto|fp32|fp16|bf16",
                    "auto|gptneox|llama|mistral", "mha_interleaved|gqa_blocked|gqa_fakehead", "llama3|llama2"):
        assert choices in text, choices
    text = runner.invoke(app, ["parity", "--help"]).output
    assert "fp32|fp16|bf16" in text and "own|mean" in text and "auto|fp32" not in text
    assert "sgd|adamw" in runner.invoke(app, ["train-check", "--help"]).output


def test_choices_are_the_library_s():
    """The CLI's sets are the ones the library accepts (it takes the plain strings)."""
    from neoxconv import archs, choices, convert, export_run, fusing, graph
    from neoxconv.formats import meta_llama, neox_files, neox_write
    from neoxconv.reference import parity
    from neoxconv.traincheck import options as train_check

    def values(e) -> list[str]:
        return [m.value for m in e]

    assert values(choices.Target) == list(graph.FORMATS)
    assert values(choices.NeoxLayout) == list(neox_write.LAYOUTS)
    assert values(choices.NeoxSchema) == list(neox_files.SCHEMAS)
    assert values(choices.QkvLayout) == list(fusing.QKV_LAYOUTS)
    assert values(choices.MetaStyle) == list(meta_llama.STYLES)
    assert values(choices.Family) == ["auto", *archs.FAMILIES]
    assert values(choices.Optimizer) == list(train_check.OPTIMIZERS)
    assert values(choices.MainBranch) == list(export_run.MAIN_MODES)
    assert set(values(choices.OutDtype)) <= set(convert.DTYPES)
    assert {parity.canonical_dtype(d) for d in values(choices.ComputeDtype)} == {"float32", "float16", "bfloat16"}


# -- usage mistakes are usage errors (exit 2, usage line, --help hint), never "internal error" ---


@pytest.mark.parametrize("args, message", [
    (["frobnicate"], "Error: No such command 'frobnicate'."),
    (["neox-to-hf"], "Error: Missing argument"),
    (["hf-to-neox", "a", "b", "--tp", "abc"], "Error: Invalid value for '--tp'"),
    (["convert", "a", "b"], "Error: Missing option '--to'."),
    (["verify", "x", "--bogus"], "Error: No such option: --bogus"),
])
def test_usage_errors(args, message):
    from fixtures.pristine import run_cli

    code, _, err = run_cli(*args)
    assert code == 2, err
    assert err.startswith(f"Usage: neoxconv {args[0] if args[0] != 'frobnicate' else ''}".rstrip())
    assert "for help." in err and message in err and "internal error" not in err


def test_bad_choice_values_through_the_entry_point(tmp_path, hf_dir):
    """Bad values of choice options end in exit 2 naming the value, through main() (the real entry
    point), whether the option refuses them while parsing (a usage error) or the library does."""
    from fixtures.pristine import run_cli

    for args, value in ((["convert", hf_dir, tmp_path / "o", "--to", "xyz"], "xyz"),
                        (["hf-to-neox", hf_dir, tmp_path / "o", "--layout", "diagonal"], "diagonal"),
                        (["convert", hf_dir, tmp_path / "o", "--to", "hf", "--dtype", "fp8"], "fp8")):
        code, _, err = run_cli(*args)
        assert code == 2 and value in err and "internal error" not in err and "Traceback" not in err, err
        assert not (tmp_path / "o").exists()


def test_usage_error_in_a_real_process():
    r = run("frobnicate")
    assert r.returncode == 2 and "Try 'neoxconv --help' for help." in r.stderr and "internal error" not in r.stderr
    r = run()
    assert r.returncode == 2 and "Commands" in r.stderr + r.stdout  # bare `neoxconv` shows the help
