"""`neoxconv parity` and `--verify` as a user meets them: exit codes (0 pass, 1 fail, 2 bad
input), the JSON report, and what --verify leaves on disk.

--verify contract (docs/parity.md): pass -> OUT as usual with OUT/parity-report.json (and, for
HF outputs, the report in README.md's provenance); fail -> exit 1, nothing written to OUT (an
existing OUT that --force was to replace is left untouched), the output moved to
OUT.parity-failed/ with parity-report.json inside, no temporary directories left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fixtures.bugs import sum_row_biases_twice
from fixtures.neox_raw import random_rank_tensors, write_neox_checkpoint
from neoxconv.convert import convert
from neoxconv.errors import NeoxconvError, ParityFailure
from neoxconv.parity import check_verify_target, logits_for, run_parity, verifier
from neoxconv.reference import NeoxCheckpoint
from neoxconv.tiny import tiny_hf_model

torch.set_num_threads(2)
CFG = dict(num_layers=2, hidden_size=32, num_attention_heads=4, rotary_pct=0.25, gpt_j_residual=True,
           no_weight_tying=True)


def run(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "neoxconv", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def raw_neox(path, same_norms: bool):
    """A DeepSpeed-style NeoX checkpoint at tp 2; with same_norms=False its norm copies differ
    across ranks, which no HF export can reproduce (parity fails under NeoX's own semantics)."""
    ranks = random_rank_tensors(tp=2, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=128, tied=False,
                                seed=11, same_norms=same_norms)
    return write_neox_checkpoint(path, ranks, CFG)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli-pair")
    hf, neox = base / "hf", base / "neox"
    tiny_hf_model("gptneox", seed=4).save_pretrained(hf)
    convert(hf, neox, to="neox", tp=2)
    return hf, neox


def no_partials(parent):
    return not [p for p in parent.iterdir() if ".partial-" in p.name]


# ------------------------------------------------------------------------------------------ command


def test_parity_command_pass_writes_json(pair, tmp_path):
    hf, neox = pair
    res = run("parity", hf, neox, "--tokens", 16, "--batch", 3, "--seed", 2, "--json", tmp_path / "r.json")
    assert res.returncode == 0, res.stderr
    assert "PASS" in res.stdout and "numerics config" in res.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["verdict"] == "pass" and rep["positions"] == 48 and rep["vocab"] == 100
    assert (rep["atol"], rep["rtol"], rep["dtype"]) == (2e-4, 1e-4, "float32")
    assert rep["max_abs_diff"] < 1e-5 and rep["argmax_agreement"] == 1.0
    info = rep["info"]
    assert info["a"]["format"] == "hf" and info["b"]["format"] == "neox" and info["b"]["tp"] == 2
    assert info["b"]["qkv_layout"] == "mha_interleaved"
    assert info["a"]["config"] == info["b"]["config"] and info["a"]["config"]["rotary_pct"] == 0.5
    assert info["config_check"] == {"verdict": "pass", "fields": list(info["a"]["config"]), "differences": {}}
    assert info["batch"] == {"source": "random", "batch": 3, "tokens": 16, "seed": 2, "id_range": [0, 100]}
    assert info["reasons"] == [] and info["logits_verdict"] == "pass"


def test_parity_command_bad_input_exit_2(pair):
    hf, neox = pair
    res = run("parity", hf, neox, "--device", "cuda")
    if torch.cuda.is_available():  # pragma: no cover - CPU CI
        assert res.returncode == 0
        return
    assert res.returncode == 2
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and "CUDA is not available" in line and "--device cpu" in line


def test_run_parity_input_errors(pair, tmp_path):
    hf, neox = pair
    for kw, words in (({"dtype": "fp8"}, "fp32, fp16 or bf16"), ({"tokens": 0}, "at least 1"),
                      ({"replicated": "rank0"}, "own or mean"), ({"device": "tpu"}, "unknown --device"),
                      ({"device": "mps"}, "only cpu and cuda"),
                      ({"text": "hello"}, "needs a tokenizer")):
        with pytest.raises(NeoxconvError, match=words):
            run_parity(hf, neox, **kw)
    with pytest.raises(NeoxconvError, match="no such file"):
        run_parity(hf, tmp_path / "missing")


def test_text_batch_through_either_sides_tokenizer(pair, tmp_path):
    """--text: the HF side's tokenizer (AutoTokenizer), or the NeoX side's HFTokenizer vocab-file."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    hf, _ = pair
    tok_hf = tmp_path / "hf-tok"
    shutil.copytree(hf, tok_hf)
    vocab = {f"w{i}": i for i in range(99)} | {"[UNK]": 99}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tok_hf / "tokenizer.json"))
    (tok_hf / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    neox = tmp_path / "neox"
    convert(tok_hf, neox, to="neox", tp=2)  # copies the tokenizer and points vocab-file at it
    text = "w1 w2 w3 w50 w98 zz"
    for a, b in ((tok_hf, neox), (neox, hf)):
        rep = run_parity(a, b, text=text)
        assert rep.passed, rep.info["reasons"]
        assert rep.positions == 6 and rep.info["batch"]["source"] == "text"
    assert run_parity(tok_hf, neox, text=text).info["batch"]["tokenizer"] == str(tok_hf)


def test_meta_side_and_logits_for(tmp_path):
    """Meta shards go through meta_reference_logits (no merging); logits_for on every format."""
    hf = tmp_path / "hf"
    tiny_hf_model("llama", seed=6, hidden_size=64, num_attention_heads=8, num_key_value_heads=4).save_pretrained(hf)
    meta, neox = tmp_path / "meta", tmp_path / "neox"
    convert(hf, meta, to="meta", shards=2)
    convert(meta, neox, to="neox", tp=4, layout="sequential")
    for a, b in ((meta, hf), (meta, neox)):
        rep = run_parity(a, b, tokens=16)
        assert rep.passed, rep.info["reasons"]
        assert rep.info["a"]["format"] == "meta"
    ids = torch.tensor([[1, 5, 9, 3]])
    outs = [logits_for(p, ids) for p in (hf, meta, neox)]
    assert outs[0].shape == (1, 4, 96) and outs[2].shape[-1] >= 96
    for o in outs[1:]:
        assert torch.allclose(o[..., :96], outs[0], atol=1e-5)


# ------------------------------------------------------------------------------------------ --verify


def test_verify_pass_cli(tmp_path):
    src = raw_neox(tmp_path / "neox", same_norms=True)
    out = tmp_path / "hf"
    res = run("neox-to-hf", src, out, "--verify")
    assert res.returncode == 0, res.stderr
    rep = json.loads((out / "parity-report.json").read_text())
    assert rep["verdict"] == "pass" and rep["info"]["b"]["path"] == str(out)
    card = (out / "README.md").read_text()
    assert "### Parity check" in card and "parity-report.json" in card
    assert not (tmp_path / "hf.parity-failed").exists() and no_partials(tmp_path)


def run_in_process(capsys, *args) -> tuple[int, str]:
    """The real CLI entry point in this process (so an injected bug applies)."""
    from neoxconv import cli

    old = sys.argv
    sys.argv = ["neoxconv", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as e:
            cli.main()
    finally:
        sys.argv = old
    return e.value.code, capsys.readouterr().err


def test_verify_fail_cli(tmp_path, monkeypatch, capsys):
    """A broken conversion -> exit 1, report saved, output only at OUT.parity-failed."""
    src = raw_neox(tmp_path / "neox", same_norms=True)
    out = tmp_path / "hf"
    sum_row_biases_twice(monkeypatch)  # a real conversion bug (issue #962 style)
    code, err = run_in_process(capsys, "neox-to-hf", src, out, "--verify")
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: parity check failed") and "hf.parity-failed" in last
    assert "Traceback" not in err
    failed = tmp_path / "hf.parity-failed"
    assert not out.exists() and no_partials(tmp_path)
    rep = json.loads((failed / "parity-report.json").read_text())
    assert rep["verdict"] == "fail" and rep["info"]["b"]["path"] == str(failed)
    assert (failed / "config.json").is_file() and (failed / "model.safetensors").is_file()


def test_verify_passes_drifted_norms_and_reports_the_drift(tmp_path):
    """Norm copies that differ across ranks: --verify checks the conversion against their mean
    (all an export can hold) and says how far the copies differ."""
    src = raw_neox(tmp_path / "neox", same_norms=False)
    out = tmp_path / "hf"
    res = run("neox-to-hf", src, out, "--verify")
    assert res.returncode == 0, res.stderr
    rep = json.loads((out / "parity-report.json").read_text())
    assert rep["verdict"] == "pass" and rep["info"]["replicated"] == "mean"
    assert any("differ across the 2 TP ranks" in n for n in rep["info"]["notes"])
    # the plain parity command (NeoX's own per-rank semantics) still shows the averaging gap
    res = run("parity", src, out)
    assert res.returncode == 1, res.stdout


def test_verify_fail_with_force_keeps_out_and_replaces_old_failure(tmp_path, monkeypatch):
    """A failed --verify never costs the user the OUT they had: with --force the old OUT and its
    contents survive; only the new output goes to OUT.parity-failed (replacing an old failure)."""
    src = raw_neox(tmp_path / "neox", same_norms=True)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("previous export")
    (out / "sub").mkdir()
    (out / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    failed = tmp_path / "hf.parity-failed"
    failed.mkdir()
    (failed / "parity-report.json").write_text("{}")
    (failed / "old.txt").write_text("old failure")
    sum_row_biases_twice(monkeypatch)  # a real conversion bug (issue #962 style)
    with pytest.raises(ParityFailure) as err:
        convert(src, out, to="hf", force=True, after_write=verifier(src, out, to="hf", force=True))
    assert err.value.exit_code == 1 and "unchanged" in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == ["stale.txt", "sub"]
    assert (out / "stale.txt").read_text() == "previous export"
    assert (out / "sub" / "weights.bin").read_bytes() == b"\x00\x01"
    assert not (failed / "old.txt").exists() and (failed / "model.safetensors").is_file()
    assert json.loads((failed / "parity-report.json").read_text())["verdict"] == "fail"
    assert no_partials(tmp_path)


@pytest.mark.parametrize("same_norms", [False, True], ids=["drifted-norms", "same-norms"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_verify_low_precision_tp2_gptj(tmp_path, monkeypatch, capsys, dtype, same_norms):
    """fp16/bf16 NeoX at TP 2 with gpt_j_residual: an export holds the per-rank row-bias parts
    summed and the norm copies averaged, each rounded once to the stored dtype. --verify models
    exactly that, so a correct conversion passes under the fp32 tolerances (it used to fail by the
    rounding of the sums), and a wrong one still fails."""
    ranks = random_rank_tensors(tp=2, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=128, tied=False,
                                seed=21, dtype=dtype, same_norms=same_norms)
    src = write_neox_checkpoint(tmp_path / "neox", ranks, CFG)
    out = tmp_path / "hf"
    code, err = run_in_process(capsys, "neox-to-hf", src, out, "--verify")
    assert code == 0, err
    rep = json.loads((out / "parity-report.json").read_text())
    assert rep["verdict"] == "pass" and (rep["atol"], rep["rtol"]) == (2e-4, 1e-4)
    assert rep["max_abs_diff"] < 1e-5, rep["max_abs_diff"]
    wrong = tmp_path / "hf-wrong"
    sum_row_biases_twice(monkeypatch)  # a real conversion bug (issue #962 style)
    code, err = run_in_process(capsys, "neox-to-hf", src, wrong, "--verify")
    assert code == 1 and "parity check failed" in err
    assert not wrong.exists() and (tmp_path / "hf-wrong.parity-failed" / "parity-report.json").is_file()


@pytest.fixture(scope="module")
def gqa_fakehead(tmp_path_factory):
    """A GQA NeoX checkpoint in the 2024 fake-head QKV layout (recorded in its neoxconv.json)."""
    base = tmp_path_factory.mktemp("gqa-mig")
    hf, fh = base / "hf", base / "fh"
    tiny_hf_model("llama", seed=8, num_attention_heads=8, num_key_value_heads=2, hidden_size=64,
                  intermediate_size=96).save_pretrained(hf)
    convert(hf, fh, to="neox", tp=2, qkv_layout="gqa_fakehead")
    return hf, fh


def test_verify_layout_migration_checks_each_side_in_its_own_layout(gqa_fakehead, tmp_path, capsys):
    """`convert fh mig --to neox --qkv-layout gqa_fakehead --out-qkv-layout gqa_blocked --verify`:
    --qkv-layout is the source's layout (A only); the output is read in the layout it was written
    in. Then `parity` takes --qkv-layout for A and --qkv-layout-b for B (default: each side's
    recorded layout), and reading B in A's layout fails."""
    hf, fh = gqa_fakehead
    mig = tmp_path / "mig"
    code, err = run_in_process(capsys, "convert", fh, mig, "--to", "neox", "--qkv-layout", "gqa_fakehead",
                               "--out-qkv-layout", "gqa_blocked", "--verify")
    assert code == 0, err
    rep = json.loads((mig / "parity-report.json").read_text())
    assert rep["verdict"] == "pass" and rep["max_abs_diff"] < 1e-5
    assert (rep["info"]["a"]["qkv_layout"], rep["info"]["b"]["qkv_layout"]) == ("gqa_fakehead", "gqa_blocked")
    assert not (tmp_path / "mig.parity-failed").exists()
    for kw in ({}, {"qkv_layout": "gqa_fakehead", "qkv_layout_b": "gqa_blocked"}):
        assert run_parity(fh, mig, tokens=16, **kw).passed
    assert run_parity(hf, mig, tokens=16, qkv_layout="gqa_fakehead").passed  # A is HF: ignored there
    wrong = run_parity(fh, mig, tokens=16, qkv_layout="gqa_fakehead", qkv_layout_b="gqa_fakehead")
    assert wrong.info["logits_verdict"] == "fail"
    res = run("parity", fh, mig, "--tokens", 16, "--qkv-layout", "gqa_fakehead", "--qkv-layout-b", "gqa_blocked")
    assert res.returncode == 0, res.stdout + res.stderr
    res = run("parity", fh, mig, "--tokens", 16, "--qkv-layout-b", "gqa_fakehead")
    assert res.returncode == 1, res.stdout + res.stderr


def test_reference_reads_the_qkv_layout_from_the_files(gqa_fakehead, tmp_path):
    """The NeoX side's QKV layout is the reference's own reading of the files (never the
    converter's): the layout recorded in neoxconv.json, else NeoX's history by the stored names
    (legacy names + GQA = fake-head), unless declared."""
    hf, fh = gqa_fakehead
    assert NeoxCheckpoint(fh).qkv_layout == "gqa_fakehead"
    assert NeoxCheckpoint(fh, qkv_layout="gqa_blocked").qkv_layout == "gqa_blocked"
    legacy = tmp_path / "legacy"
    convert(hf, legacy, to="neox", tp=2, schema="legacy")
    (next(legacy.glob("global_step*")) / "neoxconv.json").unlink()
    ck = NeoxCheckpoint(legacy)
    assert (ck.schema, ck.qkv_layout) == ("legacy", "gqa_fakehead")
    assert run_parity(hf, legacy, tokens=16).passed


def test_verify_refuses_a_foreign_parity_failed_dir(tmp_path):
    out = tmp_path / "hf"
    (tmp_path / "hf.parity-failed").mkdir()
    with pytest.raises(NeoxconvError, match="not a neoxconv parity-failed output"):
        check_verify_target(out)


def test_verify_to_neox_in_fp16_uses_fp16_tolerance(pair, tmp_path):
    """--dtype fp16 rounds the weights: a fp16-level change even in fp32 compute, so the report
    uses the fp16 tolerances and says so; a correct conversion passes."""
    hf, _ = pair
    out = tmp_path / "neox16"
    convert(hf, out, to="neox", tp=2, layout="sequential", dtype="fp16", after_write=verifier(hf, out, to="neox"))
    rep = json.loads((out / "parity-report.json").read_text())
    assert rep["verdict"] == "pass" and rep["dtype"] == "float32" and (rep["atol"], rep["rtol"]) == (0.25, 0.02)
    assert rep["info"]["b"]["stored_dtype"] == "float16"
    assert any("float16 tolerances" in n for n in rep["info"]["notes"])
