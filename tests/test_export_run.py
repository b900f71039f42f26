"""`neoxconv export-run`: a NeoX training run (several global_stepN dirs written as NeoX would,
without neoxconv's writer) to a local stand-in Hub driven by the real huggingface_hub client,
one branch per step, incremental; local mode; --steps forms; a step that fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hub_server import USER, VALID_TOKEN
from fixtures.hf_export import LOADER, PROMPT_IDS, tokenizer_json
from typer.testing import CliRunner

from fixtures.neox_raw import random_rank_tensors, write_neox_checkpoint
from neoxconv.errors import NeoxconvError
from neoxconv.export_check import validate_export_dir
from neoxconv.export_run import export_run, read_record
from neoxconv.run_steps import HashCache, fingerprint, format_steps, select_steps, source_files, tokens_seen

REPO = f"{USER}/tiny-run"
CFG = dict(num_layers=2, hidden_size=32, num_attention_heads=4, rotary_pct=0.25, gpt_j_residual=True,
           no_weight_tying=True, tokenizer_type="HFTokenizer", vocab_file="data/tokenizer.json", seq_length=64,
           train_batch_size=8)


def add_step(save: Path, step: int) -> Path:
    """One more checkpoint of the run (weights seeded by the step), as NeoX saves it."""
    ranks = random_rank_tensors(tp=2, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=384, tied=False, seed=step)
    write_neox_checkpoint(save, ranks, CFG, iteration=step)
    return save / f"global_step{step}"


@pytest.fixture(scope="module")
def run_template(tmp_path_factory):
    save = tmp_path_factory.mktemp("run") / "pythia-tiny"
    (save / "data").mkdir(parents=True)
    tokenizer_json(save / "data" / "tokenizer.json")
    for step in (100, 200, 300):
        add_step(save, step)
    return save


@pytest.fixture
def run(run_template, tmp_path, monkeypatch):
    """A private copy of the 3-step run, and a private SHA-256 cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return Path(shutil.copytree(run_template, tmp_path / "pythia-tiny"))


def statuses(report) -> dict[int, str]:
    return {r.step: r.status for r in report.steps}


def card(text: bytes | str) -> tuple[dict, str]:
    text = text.decode() if isinstance(text, bytes) else text
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def sends(hub) -> list[str]:
    """Requests that would change the Hub: commits, preuploads, branches, LFS content."""
    return [f"{r.method} {r.path}" for r in hub.requests
            if r.method in ("POST", "PUT") and any(k in r.path for k in ("/commit/", "/preupload/", "/branch/", "/_lfs/"))]


def hub_logits(hub, revision: str, tmp_path: Path) -> torch.Tensor:
    """from_pretrained(REPO, revision=...) in a fresh process against the stand-in Hub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / f"hf_home_{revision}"), HF_TOKEN=VALID_TOKEN,
               HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    out = tmp_path / f"{revision}.pt"
    proc = subprocess.run([sys.executable, "-c", LOADER, REPO, revision, json.dumps(PROMPT_IDS), str(out)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)["logits"]


def test_hub_run_incremental(run, fake_hub, tmp_path):
    hub_args = dict(repo_id=REPO, token=VALID_TOKEN, endpoint=fake_hub.url)

    # dry run against a repo that does not exist yet: everything would be sent, nothing is
    report = export_run(run, **hub_args, dry_run=True)
    assert statuses(report) == {100: "would upload", 200: "would upload", 300: "would upload"}
    assert report.main["status"] == "would update" and sends(fake_hub) == [] and fake_hub.repos == {}

    report = export_run(run, **hub_args, private=True)
    assert statuses(report) == {100: "uploaded", 200: "uploaded", 300: "uploaded"} and report.failed == 0
    assert report.main == {"status": "updated", "step": 300, "commit_url": report.main["commit_url"]}
    repo = fake_hub.repos[REPO]
    assert repo.private and sorted(repo.branches) == ["main", "step100", "step200", "step300"]
    for step in (100, 200, 300):
        files = fake_hub.files(REPO, f"step{step}")
        assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(files)
        meta, body = card(files["README.md"])
        fp = fingerprint(run / f"global_step{step}", HashCache())
        # the card names the repo, loads this branch, and records step, tokens and fingerprint
        assert body.lstrip().startswith(f"# {REPO}\n")
        assert f'from_pretrained("{REPO}", revision="step{step}")' in body
        assert f"| Tokens seen | {step * 8 * 64:,} (step × train_batch_size 8 × seq_length 64) |" in body
        assert fp["digest"] in body and meta["neoxconv"]["source_fingerprint"] == fp
        assert meta["neoxconv"]["iteration"] == step and meta["neoxconv"]["model_name"] == REPO
        head = fake_hub.head(REPO, f"step{step}")
        assert read_record(head.description) == {"step": step, "fingerprint": fp["digest"]}
        assert "layer_02-model_01-model_states.pt" in head.description  # source files' sizes and hashes
    # main holds the newest step: the same files, its card without a revision
    main, newest = fake_hub.files(REPO, "main"), fake_hub.files(REPO, "step300")
    assert {k: v for k, v in main.items() if k != "README.md"} == {k: v for k, v in newest.items() if k != "README.md"}
    assert f'from_pretrained("{REPO}")' in card(main["README.md"])[1]

    # step 200 from the Hub gives exactly the logits of step 200 converted here
    from transformers import AutoModelForCausalLM

    from neoxconv.convert import convert

    convert(run / "global_step200", tmp_path / "hf200", to="hf")
    with torch.no_grad():
        local = AutoModelForCausalLM.from_pretrained(tmp_path / "hf200").eval()(torch.tensor(PROMPT_IDS)).logits
    assert torch.equal(hub_logits(fake_hub, "step200", tmp_path), local)

    # rerun: nothing to send
    fake_hub.clear_requests()
    report = export_run(run, **hub_args)
    assert set(statuses(report).values()) == {"up to date"} and report.main["status"] == "up to date"
    assert sends(fake_hub) == []

    # a fourth checkpoint, whose upload is interrupted before the commit that completes its branch
    add_step(run, 400)
    fake_hub.fail_next("POST", r"/commit/step400$", skip=1)
    report = export_run(run, **hub_args)
    assert statuses(report) == {100: "up to date", 200: "up to date", 300: "up to date", 400: "failed"}
    assert "injected failure" in report.steps[-1].error and report.failed == 1
    assert report.main == {"status": "not updated", "step": None, "error": "step 400 failed"}
    assert "model.safetensors" in fake_hub.files(REPO, "step400")  # the weights got there, the record did not
    assert read_record(fake_hub.head(REPO, "step400").description) is None
    # the rerun (with --verify) picks it up: no weights sent again, only step 400's card and main committed
    fake_hub.clear_requests()
    report = export_run(run, **hub_args, verify=True)
    assert statuses(report)[400] == "uploaded" and report.steps[-1].parity.startswith("pass")
    assert report.main["status"] == "updated" and report.failed == 0
    assert {s.split("/")[-1] for s in sends(fake_hub) if "/commit/" in s} == {"step400", "main"}
    assert not [s for s in sends(fake_hub) if s.startswith("PUT /_lfs/upload/")]
    assert "### Parity check" in card(fake_hub.files(REPO, "step400")["README.md"])[1]
    assert read_record(fake_hub.head(REPO, "main").description)["step"] == 400

    # step 200's source changes: a dry run sees it, a real run sends it again; main keeps step 400
    layer = run / "global_step200" / "layer_02-model_00-model_states.pt"
    torch.save({k: v * 1.5 for k, v in torch.load(layer).items()}, layer)
    fake_hub.clear_requests()
    assert statuses(export_run(run, **hub_args, steps="100:300:100", dry_run=True)) == {100: "would skip",
                                                                                        200: "would upload"}
    assert sends(fake_hub) == []
    main_head = fake_hub.head(REPO, "main").oid
    report = export_run(run, **hub_args, steps="200")
    assert statuses(report) == {200: "uploaded"} and report.main == {"status": "kept (holds a newer step)", "step": 400}
    new_fp = fingerprint(run / "global_step200", HashCache())["digest"]
    assert read_record(fake_hub.head(REPO, "step200").description)["fingerprint"] == new_fp
    assert fake_hub.head(REPO, "main").oid == main_head


def test_verify_failure_is_a_failed_step(run, fake_hub, monkeypatch):
    """A real conversion bug injected (row biases of a parallel residual merged twice, issue #962
    style): --verify fails the step, which is not uploaded; main is not touched."""
    from fixtures.bugs import sum_row_biases_twice

    sum_row_biases_twice(monkeypatch)
    report = export_run(run, repo_id=REPO, token=VALID_TOKEN, endpoint=fake_hub.url, steps="300", verify=True)
    (rep,) = report.steps
    assert rep.status == "failed" and rep.error.startswith("parity check failed (logits differ beyond tolerance")
    assert rep.error.endswith("; not uploaded") and report.failed == 1
    assert sorted(fake_hub.repos[REPO].branches) == ["main"] and len(fake_hub.history(REPO)) == 1
    assert report.main == {"status": "not updated", "step": None, "error": "step 300 failed"}


def test_local_mode(run, tmp_path):
    out = tmp_path / "exports"
    report = export_run(run, out, steps="100,300")
    assert statuses(report) == {100: "written", 300: "written"} and report.main is None
    assert sorted(p.name for p in out.iterdir()) == ["step100", "step300"]
    check = validate_export_dir(out / "step100")
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= {
        n for n, _ in check.files}
    meta, body = card((out / "step100" / "README.md").read_text())
    assert body.lstrip().startswith("# exports\n") and ".partial-" not in body
    assert meta["neoxconv"]["source_fingerprint"]["digest"] == report.steps[0].fingerprint
    assert report.steps[0].tokens_seen == 100 * 8 * 64

    written = (out / "step300" / "README.md").stat().st_mtime_ns
    report = export_run(run, out, steps="100:301:100", branch_template="step{step}")
    assert statuses(report) == {100: "up to date", 200: "written", 300: "up to date"}
    assert (out / "step300" / "README.md").stat().st_mtime_ns == written

    # a directory that export-run did not write is never replaced
    shutil.rmtree(out / "step200")
    (out / "step200").mkdir()
    report = export_run(run, out, steps="200")
    assert report.steps[0].status == "failed" and "not written by export-run" in report.steps[0].error


def test_failed_step_is_reported_and_the_others_go_on(run, tmp_path):
    from neoxconv.cli import app

    broken = run / "global_step200" / "layer_03-model_01-model_states.pt"
    broken.write_bytes(broken.read_bytes()[:100])
    out = tmp_path / "exports"
    result = CliRunner().invoke(app, ["export-run", str(run), str(out), "--json"])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [(100, "written"), (200, "failed"), (300, "written")]
    assert "layer_03-model_01-model_states.pt" in summary["steps"][1]["error"] and summary["failed"] == 1
    assert not (out / "step200").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]
    result = CliRunner().invoke(app, ["export-run", str(run), str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "failed: " in result.stdout and "3 steps: 0 written, 2 up to date, 1 failed" in result.stdout


def test_missing_step_is_a_clean_exit_2(run, tmp_path):
    r = subprocess.run([sys.executable, "-m", "neoxconv", "export-run", str(run), str(tmp_path / "o"), "--steps",
                        "100,250"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="300"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "step(s) 250 not found; the run has steps 100:400:100" in r.stderr and not (tmp_path / "o").exists()


def test_bad_input_before_any_step(run, tmp_path, fake_hub):
    with pytest.raises(NeoxconvError, match="must contain {step}"):
        export_run(run, tmp_path / "o", branch_template="ckpt")
    with pytest.raises(NeoxconvError, match="exactly one"):
        export_run(run, tmp_path / "o", repo_id=REPO)
    with pytest.raises(NeoxconvError, match="no global_stepN directories"):
        export_run(run / "data", tmp_path / "o")
    with pytest.raises(NeoxconvError, match="no Hugging Face token"):
        export_run(run, repo_id=REPO, endpoint=fake_hub.url)
    with pytest.raises(NeoxconvError, match="token was rejected"):
        export_run(run, repo_id=REPO, token="hf_wrong", endpoint=fake_hub.url)
    assert not (tmp_path / "o").exists() and fake_hub.repos == {}


def test_steps_forms():
    have = {s: Path(f"global_step{s}") for s in (0, 1, 2, 4, 8, 1000, 2000, 3000, 4000)}
    assert select_steps(have, "all", "run") == sorted(have)
    assert select_steps(have, "2000,1000, 1000", "run") == [1000, 2000]
    assert select_steps(have, "1000:4000:1000", "run") == [1000, 2000, 3000]  # STOP exclusive
    assert select_steps(have, "1000::2000", "run") == [1000, 3000]  # empty STOP: up to the last step
    assert select_steps(have, "0,1,2,4,8,2000:5000:2000", "run") == [0, 1, 2, 4, 8, 2000, 4000]
    assert format_steps(have) == "0:3:1,4,8,1000:5000:1000"
    with pytest.raises(NeoxconvError, match=r"run: step\(s\) 500,1500 not found; the run has steps 0:3:1,4,8,1000:5000:1000"):
        select_steps(have, "500:2000:1000", "run")
    for bad in ("1000:2000", "a", "1000:3000:0"):
        with pytest.raises(NeoxconvError, match="cannot read --steps item"):
            select_steps(have, bad, "run")
    with pytest.raises(NeoxconvError, match="selects no step"):
        select_steps(have, "3000:1000:1000", "run")


def test_fingerprint_and_hash_cache(run, tmp_path):
    step = run / "global_step100"
    (step / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optimizer state")  # never read
    names = set(source_files(step))
    assert "configs/model.yml" in names and "tokenizer:tokenizer.json" in names
    assert "layer_00-model_00-model_states.pt" in names and "mp_rank_01_model_states.pt" in names
    assert not any("optim" in n for n in names)

    cache = HashCache(tmp_path / "c.json")
    first = fingerprint(step, cache)
    assert cache.hashed_bytes == sum(f["size"] for f in first["files"].values())
    cache.save()
    again = HashCache(tmp_path / "c.json")
    assert fingerprint(step, again) == first and again.hashed_bytes == 0  # from the cache: nothing read
    # the cache key is (path, size, mtime): a rewritten file (new mtime) is hashed again
    cfg = step / "configs" / "model.yml"
    cfg.write_text(cfg.read_text() + "# comment\n")
    changed = fingerprint(step, again)
    assert changed["digest"] != first["digest"] and again.hashed_bytes == cfg.stat().st_size


def test_progress_of_each_step(run, tmp_path):
    """export-run reports how far each step's long phases are: the source's bytes hashed (all at
    once when cached), the bytes converted, --verify's forward passes in layer groups."""
    events: list[tuple] = []

    def progress(label, done, total, unit):
        events.append((label, done, total, unit))

    def last(label):
        seen = [(d, t, u) for lab, d, t, u in events if lab == label]
        assert seen and [d for d, _, _ in seen] == sorted(d for d, _, _ in seen), (label, events)
        return seen[-1]

    report = export_run(run, tmp_path / "exports", steps="100", verify=True, progress=progress)
    assert statuses(report) == {100: "written"}
    source = sum(f["size"] for f in fingerprint(run / "global_step100", HashCache(tmp_path / "c.json"))["files"].values())
    assert last("step 100: hashing the source") == (source, source, "bytes")
    from neoxconv.convert import convert

    planned: dict = {}
    convert(run / "global_step100", tmp_path / "again", to="hf", on_plan=lambda plan, _: planned.update(plan.summary()))
    assert last("step 100: converting") == (planned["bytes_copied"] + planned["bytes_computed"],) * 2 + ("bytes",)
    assert last("step 100: parity, forward A (neox)") == (2 + 3, 2 + 3, "layer groups")
    assert last("step 100: parity, forward B (hf)")[0] == last("step 100: parity, forward B (hf)")[1]

    events.clear()  # the same step again: up to date, its hashes from the cache, reported at once
    report = export_run(run, tmp_path / "exports", steps="100", progress=progress)
    assert statuses(report) == {100: "up to date"}
    hashed = [e for e in events if e[0] == "step 100: hashing the source"]
    assert hashed[-1][1:3] == (source, source) and not any("converting" in e[0] for e in events)


def test_tokens_seen_rules():
    assert tokens_seen({"seq_length": 2048, "train_batch_size": 1024}, 1000) == (
        1000 * 1024 * 2048, "step × train_batch_size 1024 × seq_length 2048")
    args = {"seq_length": 2048, "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 2,
            "global_num_gpus": 64, "model_parallel_size": 2, "pipe_parallel_size": 2}
    tokens, rule = tokens_seen(args, 10)
    assert tokens == 10 * (16 * 2 * 16) * 2048 and "16 data-parallel" in rule
    assert tokens_seen({"seq_length": 2048, "train_micro_batch_size_per_gpu": 16}, 10) == (None, None)
    assert tokens_seen({"train_batch_size": 8}, 10) == (None, None)
