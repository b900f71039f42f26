"""The TP training core and `neoxconv train-check`: real multi-process torch.distributed (gloo).

Tiny seeded models (gptneox with parallel and sequential residual and biases, llama GQA tied,
mistral GQA with a sliding window), converted to NeoX at TP 2 and 4, trained by train-check in
spawned process groups (several checks per spawn, spawns cost seconds) and compared with HF.

fp32 tolerances asserted: loss |Δ| <= 1e-5 and gradient relative error <= 1e-4 (measured:
<= 1e-6 and <= ~1e-5). Saved checkpoints are exported with neox-to-hf and compared with HF models
trained *here* with torch.optim (the same steps, written independently of train-check).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fixtures.factories import save_hf, tiny_hf_model
from neoxconv import archs
from neoxconv.convert import convert
from neoxconv.reference import NeoxCheckpoint, SimulatedGroup, make_batch
from neoxconv.reference.train import (
    column_parallel_linear,
    row_parallel_linear,
    vocab_parallel_cross_entropy,
    vocab_parallel_embedding,
)
from neoxconv.traincheck import TrainCheckOptions, run_train_checks

torch.set_num_threads(2)

LOSS_TOL, GRAD_TOL = 1e-5, 1e-4
BATCH, TOKENS, STEPS = 2, 32, 2
GQA = dict(num_attention_heads=8, num_key_value_heads=4)  # 2 KV heads per rank at TP 2, 1 at TP 4
MODELS = {
    # name: (family, seed, overrides, NeoX layout, NeoX schema)
    "neox": ("gptneox", 0, {}, "pipeline", "current"),  # parallel residual, biases, untied
    "neox_seq": ("gptneox", 3, {"use_parallel_residual": False}, "sequential", "current"),
    "llama": ("llama", 1, {**GQA, "tie_word_embeddings": True}, "pipeline", "current"),
    "mistral": ("mistral", 2, GQA, "pipeline", "legacy"),  # sliding window 8 < TOKENS
}


def test_all_families_are_available():
    assert {"gptneox", "llama", "mistral"} <= set(archs.families())


# ------------------------------------------------------------------------------------------
# TP primitives on the simulated backend (same autograd pairs as the distributed one)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("limit", [None, 13])
def test_vocab_parallel_cross_entropy_is_the_full_softmax_loss(tp, limit):
    g = torch.Generator().manual_seed(tp)
    logits = (3 * torch.randn(5, 7, 16, generator=g)).requires_grad_()
    targets = torch.randint(0, limit or 16, (5, 7), generator=g)
    full = logits if limit is None else logits[..., :limit]
    ref = F.cross_entropy(full.reshape(-1, full.shape[-1]), targets.reshape(-1))
    (ref_grad,) = torch.autograd.grad(ref, logits)
    losses = vocab_parallel_cross_entropy(SimulatedGroup(tp), list(logits.chunk(tp, dim=-1)), targets, limit)
    (grad,) = torch.autograd.grad(sum(losses), logits)
    for loss in losses:
        torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-7, rtol=1e-6)
    if limit is not None:
        assert grad[..., limit:].abs().max() == 0  # excluded rows take no part in the softmax


def test_column_row_and_embedding_layers_match_unsharded():
    tp = 2
    g = torch.Generator().manual_seed(0)
    full = {"x": torch.randn(3, 8, generator=g), "w1": torch.randn(6, 8, generator=g), "b1": torch.randn(6, generator=g),
            "w2": torch.randn(8, 6, generator=g), "b2": torch.randn(8, generator=g)}
    full = {k: v.requires_grad_() for k, v in full.items()}
    ref = F.linear(F.gelu(F.linear(full["x"], full["w1"], full["b1"])), full["w2"], full["b2"])
    ref_grads = dict(zip(full, torch.autograd.grad(ref.square().sum(), list(full.values()))))
    group = SimulatedGroup(tp)

    def leaves(ts):
        return [t.detach().clone().requires_grad_() for t in ts]

    for before in (False, True):
        xs = leaves([full["x"]] * tp)  # the replicated input: one copy per rank
        w1s, b1s, w2s = leaves(full["w1"].chunk(tp)), leaves(full["b1"].chunk(tp)), leaves(full["w2"].chunk(tp, dim=1))
        b2s = leaves([full["b2"] / tp if before else full["b2"]] * tp)  # additive parts, or copies
        hs = column_parallel_linear(group, xs, w1s, b1s)
        ys = row_parallel_linear(group, [F.gelu(h) for h in hs], w2s, b2s, bias_before_reduce=before)
        for y in ys:
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        sum(y.square().sum() for y in ys).backward()  # every rank from its own loss replica (Megatron)
        close = dict(atol=1e-4, rtol=1e-5)
        for t in xs:
            torch.testing.assert_close(t.grad, ref_grads["x"], **close)
        torch.testing.assert_close(torch.cat([t.grad for t in w1s]), ref_grads["w1"], **close)
        torch.testing.assert_close(torch.cat([t.grad for t in b1s]), ref_grads["b1"], **close)
        torch.testing.assert_close(torch.cat([t.grad for t in w2s], dim=1), ref_grads["w2"], **close)
        for t in b2s:  # copies and additive parts alike receive the full gradient
            torch.testing.assert_close(t.grad, ref_grads["b2"], **close)
    emb = torch.randn(10, 4, generator=g)
    toks = torch.randint(0, 10, (2, 5), generator=g)
    for e in vocab_parallel_embedding(group, toks, list(emb.chunk(tp))):
        torch.testing.assert_close(e, F.embedding(toks, emb))


# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> {"hf": dir, 2: NeoX dir at TP 2, 4: NeoX dir at TP 4}, plus corrupted copies."""
    root = tmp_path_factory.mktemp("train")
    out = {}
    for name, (family, seed, overrides, layout, schema) in MODELS.items():
        hf = save_hf(tiny_hf_model(family, seed=seed, **overrides), root / name / "hf")
        out[name] = {"hf": hf}
        for tp in (2, 4):
            out[name][tp] = root / name / f"tp{tp}"
            convert(hf, out[name][tp], to="neox", tp=tp, layout=layout, schema=schema)
    # What a buggy HF -> NeoX importer would write (checked against the original HF model):
    out["bias_not_divided"] = _corrupt(out["neox"][2], root / "bias_not_divided", _full_bias_on_every_rank)
    out["gate_up_swapped"] = _corrupt(out["llama"][2], root / "gate_up_swapped", _swap_gate_up)
    # A legacy-named GQA checkpoint as old NeoX wrote it: no neoxconv.json to say its layout.
    out["mistral_bare"] = _corrupt(out["mistral"][2], root / "mistral_bare", lambda states: False)
    bare_tag = out["mistral_bare"] / (out["mistral_bare"] / "latest").read_text().strip()
    (bare_tag / "neoxconv.json").unlink()
    return out


def _layer_files(ckpt: Path) -> dict[int, list[Path]]:
    tag = ckpt / (ckpt / "latest").read_text().strip()
    files: dict[int, list[Path]] = {}
    for p in sorted(tag.glob("layer_*-model_*-model_states.pt")):
        files.setdefault(int(p.name.split("-")[0][6:]), []).append(p)
    return files


def _corrupt(src: Path, dst: Path, fn) -> Path:
    shutil.copytree(src, dst)
    for paths in _layer_files(dst).values():
        states = [torch.load(p, weights_only=True) for p in paths]
        if fn(states):
            for p, st in zip(paths, states):
                torch.save(st, p)
    return dst


def _full_bias_on_every_rank(states) -> bool:
    """gpt_j_residual row biases copied whole to every rank instead of divided (T5)."""
    hit = False
    for key in ("attention.dense.bias", "mlp.linear2.bias"):
        if key in states[0]:
            total = sum(st[key] for st in states)
            for st in states:
                st[key] = total.clone()
            hit = True
    return hit


def _swap_gate_up(states) -> bool:
    """linear1 per rank as [gate ; up] instead of [up ; gate] (T7)."""
    if "mlp.linear1.weight" not in states[0]:
        return False
    for st in states:
        up, gate = st["mlp.linear1.weight"].chunk(2)
        st["mlp.linear1.weight"] = torch.cat([gate, up])
    return True


def test_each_rank_opens_only_its_own_files(ckpts, monkeypatch):
    import neoxconv.formats.neox_files as nf_mod

    for name in ("neox", "neox_seq"):  # pipeline and sequential layouts
        read: list[str] = []
        real = nf_mod.index_pt  # what NeoxFiles opens a file with (its header; data is mapped later)
        monkeypatch.setattr(nf_mod, "index_pt", lambda p: (read.append(Path(p).name), real(p))[1])
        src = NeoxCheckpoint(ckpts[name][2], ranks=(1,))
        states = {i: src.rank_states(i) for i in src.files.indices}
        monkeypatch.setattr(nf_mod, "index_pt", real)
        assert all(s[0] is None and s[1] for s in states.values())
        assert read and all(("model_01" in n) or n == "mp_rank_01_model_states.pt" for n in read), read


# ------------------------------------------------------------------------------------------
# train-check in spawned gloo process groups
# ------------------------------------------------------------------------------------------


def _job(ckpt, **kw) -> TrainCheckOptions:
    return TrainCheckOptions(ckpt=ckpt, steps=kw.pop("steps", STEPS), batch=BATCH, tokens=TOKENS, **kw)


@pytest.fixture(scope="module")
def tp2(ckpts, tmp_path_factory):
    """One spawn of 2 processes running every TP=2 check."""
    out = tmp_path_factory.mktemp("saved2")
    no_heads = out / "no_heads.yml"
    no_heads.write_text("num_layers: 2\nhidden_size: 32\n")
    jobs = {
        "neox_sgd": _job(ckpts["neox"][2], save=out / "neox_sgd"),
        "neox_adamw_given": _job(ckpts["neox"][2], hf=ckpts["neox"]["hf"], steps=1, optimizer="adamw",
                                 weight_decay=0.1, save=out / "neox_adamw_given"),
        "bad_config": _job(ckpts["neox"][2], config_files=(no_heads,)),  # every rank fails: the next jobs still run
        "neox_seq_adamw": _job(ckpts["neox_seq"][2], optimizer="adamw", weight_decay=0.1, save=out / "neox_seq_adamw"),
        "llama_adamw": _job(ckpts["llama"][2], optimizer="adamw", weight_decay=0.1, save=out / "llama_adamw"),
        "mistral_given": _job(ckpts["mistral"][2], hf=ckpts["mistral"]["hf"], save=out / "mistral_given"),
        "mistral_bare": _job(ckpts["mistral_bare"], hf=ckpts["mistral"]["hf"]),  # layout from the names alone
        "bias_not_divided": _job(ckpts["bias_not_divided"], hf=ckpts["neox"]["hf"], save=out / "never1"),
        "gate_up_swapped": _job(ckpts["gate_up_swapped"], hf=ckpts["llama"]["hf"], optimizer="adamw"),
        "neox_step_rule": _job(ckpts["neox"][2], steps=1, partial_bias_step="neox"),
        "llama_bf16": _job(ckpts["llama"][2], optimizer="adamw", dtype="bf16"),  # fp32 master weights
    }
    reports = dict(zip(jobs, run_train_checks(list(jobs.values()))))
    return jobs, reports


@pytest.fixture(scope="module")
def tp4(ckpts, tmp_path_factory):
    """One spawn of 4 processes."""
    out = tmp_path_factory.mktemp("saved4")
    jobs = {
        "neox_adamw": _job(ckpts["neox"][4], optimizer="adamw", weight_decay=0.1, save=out / "neox_adamw"),
        "llama_sgd": _job(ckpts["llama"][4], save=out / "llama_sgd"),
        "mistral_adamw": _job(ckpts["mistral"][4], optimizer="adamw", save=out / "mistral_adamw"),
    }
    return jobs, dict(zip(jobs, run_train_checks(list(jobs.values()))))


PASSING2 = ["neox_sgd", "neox_adamw_given", "neox_seq_adamw", "llama_adamw", "mistral_given", "mistral_bare"]
PASSING4 = ["neox_adamw", "llama_sgd", "mistral_adamw"]


def _assert_pass(report: dict, tp: int, steps: int) -> None:
    assert report["verdict"] == "pass", report["failures"]
    assert report["world_size"] == report["tp"] == tp and report["backend"] == "gloo"
    assert report["tolerances"]["loss_abs"] == LOSS_TOL and report["tolerances"]["grad_rel"] == GRAD_TOL
    assert len(report["per_step"]) == steps
    for s in report["per_step"]:
        assert s["loss_abs_diff"] <= LOSS_TOL and s["grad_max_rel_err"] <= GRAD_TOL
        assert s["replica_max_rel_spread"] <= GRAD_TOL
        assert s["tensors_compared"] >= 10 and 3.0 < s["loss_neox"] < 8.0
    assert report["neox_only_tensors"] == [] and report["update_failing"] == []


@pytest.mark.parametrize("name", PASSING2)
def test_tp2_loss_and_gradients_match_hf(tp2, name):
    jobs, reports = tp2
    _assert_pass(reports[name], 2, jobs[name].steps)


@pytest.mark.parametrize("name", PASSING4)
def test_tp4_loss_and_gradients_match_hf(tp4, name):
    jobs, reports = tp4
    _assert_pass(reports[name], 4, jobs[name].steps)


def test_padded_vocab_rows_take_part_in_the_softmax(tp2):
    _, reports = tp2
    converted, given = reports["neox_sgd"], reports["neox_adamw_given"]
    assert converted["hf_source"] == "converted" and given["hf_source"] == "given"
    assert converted["real_vocab"] == given["real_vocab"] == 100  # targets: real tokens only
    assert converted["softmax_vocab"] == converted["padded_vocab"] == 256  # export keeps padded rows
    assert given["softmax_vocab"] == 100 < given["padded_vocab"]  # original HF: padded rows masked out


def test_wrong_row_bias_rule_and_swapped_gate_up_fail(tp2, tmp_path):
    jobs, reports = tp2
    for name in ("bias_not_divided", "gate_up_swapped"):
        r = reports[name]
        assert r["verdict"] == "fail"
        assert r["loss_max_abs_diff"] > 1e-3 and r["grad_max_rel_err"] > 0.3  # bf16's tolerance is 0.2
        assert any(f.startswith("loss") for f in r["failures"])
    assert reports["bias_not_divided"]["saved"] is None and not jobs["bias_not_divided"].save.exists()
    assert not [p for p in jobs["bias_not_divided"].save.parent.iterdir() if ".partial-" in p.name]


def test_neox_own_bias_step_is_caught_by_the_update_check(tp2):
    """Stepping each additive bias part like a whole bias (NeoX's own rule) moves the summed bias
    p times as far: same loss and gradients, different update."""
    r = tp2[1]["neox_step_rule"]
    assert r["verdict"] == "fail" and r["loss_max_abs_diff"] <= LOSS_TOL and r["grad_max_rel_err"] <= GRAD_TOL
    assert set(r["update_failing"]) == {f"layers.{i}.{t}.bias" for i in (0, 1) for t in ("attn.o", "mlp.down")}
    assert 0.9 < r["update_max_rel_err"] < 1.1  # p - 1 = 1 at TP 2


def test_bf16_run_uses_bf16_tolerances(tp2):
    r = tp2[1]["llama_bf16"]
    assert r["verdict"] == "pass" and r["dtype"] == "bfloat16" and r["tolerances"]["grad_rel"] == 0.2
    assert 0 < r["grad_max_rel_err"] < 0.1 and r["update_max_rel_err"] < 0.1


def test_bad_input_in_a_worker_stops_every_rank_cleanly(tp2):
    r = tp2[1]["bad_config"]
    assert r["exit_code"] == 2 and "num_attention_heads" in r["error"]


# ------------------------------------------------------------------------------------------
# --save: the finetune-then-export loop
# ------------------------------------------------------------------------------------------


def _hf_after_steps(hf_dir: Path, job: TrainCheckOptions, real_vocab: int):
    """The HF side written out here: torch.optim on the HF model, the same batches and loss."""
    from neoxconv.reference import load_hf_model

    model = load_hf_model(hf_dir)
    cls = torch.optim.AdamW if job.optimizer == "adamw" else torch.optim.SGD
    opt = cls(model.parameters(), lr=job.lr, weight_decay=job.weight_decay)
    for step in range(job.steps):
        toks = make_batch(real_vocab, job.batch, job.tokens, job.seed + step)
        opt.zero_grad()
        logits = model(input_ids=toks, use_cache=False).logits.float()
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1)).backward()
        opt.step()
    return model


def _check_saved(job, report, ckpt_src: Path, tmp: Path, tp: int) -> None:
    from neoxconv.formats.neox_files import open_neox
    from neoxconv.reference import load_hf_model

    saved = Path(report["saved"])
    assert saved == job.save and (saved / "latest").read_text() == f"global_step{job.steps}"
    before, after = open_neox(ckpt_src), open_neox(saved)
    assert (after.tp, after.layout, after.num_layers, after.indices) == (before.tp, before.layout, before.num_layers,
                                                                       before.indices) and after.tp == tp
    assert not [p for p in saved.parent.iterdir() if ".partial-" in p.name]
    w0, w1 = before.rank_states(2)[1], after.rank_states(2)[1]
    assert set(w0) == set(w1) and any(not torch.equal(w0[k], w1[k]) for k in w0 if not k.endswith("inv_freq"))
    # export the finetuned checkpoint and compare with HF trained here
    exported = tmp / f"{saved.name}-hf"
    convert(saved, exported, to="hf")
    reference_dir = job.hf
    if reference_dir is None:  # the HF model train-check made: the source converted by neoxconv
        reference_dir = tmp / f"{saved.name}-ref"
        convert(ckpt_src, reference_dir, to="hf")
    trained = _hf_after_steps(reference_dir, job, report["real_vocab"])
    toks = make_batch(report["real_vocab"], 2, TOKENS, seed=99)
    with torch.no_grad():
        got = load_hf_model(exported)(input_ids=toks, use_cache=False).logits
        want = trained(input_ids=toks, use_cache=False).logits
        v = report["real_vocab"]
        torch.testing.assert_close(got[..., :v], want[..., :v], atol=1e-4, rtol=1e-4)
        untrained = load_hf_model(reference_dir)(input_ids=toks, use_cache=False).logits
        assert (untrained[..., :v] - want[..., :v]).abs().max() > 1e-3  # the steps did move the model


@pytest.mark.parametrize("name", ["neox_sgd", "neox_adamw_given", "neox_seq_adamw", "llama_adamw", "mistral_given"])
def test_save_then_export_equals_hf_after_the_same_steps_tp2(tp2, ckpts, tmp_path, name):
    jobs, reports = tp2
    _check_saved(jobs[name], reports[name], jobs[name].ckpt, tmp_path, 2)


@pytest.mark.parametrize("name", PASSING4)
def test_save_then_export_equals_hf_after_the_same_steps_tp4(tp4, tmp_path, name):
    jobs, reports = tp4
    _check_saved(jobs[name], reports[name], jobs[name].ckpt, tmp_path, 4)


# ------------------------------------------------------------------------------------------
# The command line: its own launcher, torchrun, and bad input
# ------------------------------------------------------------------------------------------


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _neoxconv(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "neoxconv", *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=timeout)


def test_cli_fail_exits_1_with_json_report(ckpts, tmp_path):
    report, out = tmp_path / "r.json", tmp_path / "out"
    r = _neoxconv("train-check", ckpts["bias_not_divided"], "--hf", ckpts["neox"]["hf"], "--tokens", TOKENS,
                  "--json", report, "--save", out)
    assert r.returncode == 1, r.stderr
    assert "train-check failed: loss" in r.stderr and "Traceback" not in r.stderr
    data = json.loads(report.read_text())
    assert data["verdict"] == "fail" and data["world_size"] == 2 and data["saved"] is None
    assert not out.exists()


def test_torchrun_pass_save_and_export(ckpts, tmp_path):
    report, out, exported = tmp_path / "r.json", tmp_path / "out", tmp_path / "exported"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "neoxconv",
           "train-check", str(ckpts["mistral"][2]), "--steps", "1", "--optimizer", "adamw", "--tokens", str(TOKENS),
           "--json", str(report), "--save", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("train-check PASS") == 1  # only rank 0 reports
    data = json.loads(report.read_text())
    assert data["verdict"] == "pass" and data["world_size"] == 2 and data["optimizer"] == "adamw"
    assert data["loss_max_abs_diff"] <= LOSS_TOL and data["grad_max_rel_err"] <= GRAD_TOL
    r = _neoxconv("neox-to-hf", out, exported)
    assert r.returncode == 0, r.stderr
    job = TrainCheckOptions(ckpt=ckpts["mistral"][2], steps=1, optimizer="adamw", batch=BATCH, tokens=TOKENS)
    reference_dir = tmp_path / "ref"
    convert(ckpts["mistral"][2], reference_dir, to="hf")
    trained = _hf_after_steps(reference_dir, job, data["real_vocab"])
    from neoxconv.reference import load_hf_model

    toks = make_batch(data["real_vocab"], 2, TOKENS, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(load_hf_model(exported)(input_ids=toks).logits, trained(input_ids=toks).logits,
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("args,fragment", [
    (["--device", "cuda"], "CUDA is not available"),
    (["--steps", "0"], "--steps must be at least 1"),
], ids=["cuda", "steps"])  # a bad --optimizer is a usage error: tests/test_cli.py
def test_cli_bad_input_exits_2(ckpts, args, fragment):
    if args[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        args = ["--device", "tpu"]
        fragment = "unknown --device"
    r = _neoxconv("train-check", ckpts["neox"][2], *args)
    assert r.returncode == 2, r.stderr
    assert fragment in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_refuses_existing_save_dir_and_missing_checkpoint(ckpts, tmp_path):
    r = _neoxconv("train-check", ckpts["neox"][2], "--save", tmp_path)
    assert r.returncode == 2 and "already exists" in r.stderr
    r = _neoxconv("train-check", tmp_path / "nope")
    assert r.returncode == 2 and "no such file" in r.stderr


def test_torchrun_with_the_wrong_process_count_stops_every_rank(ckpts):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "-m", "neoxconv",
           "train-check", str(ckpts["neox"][2])]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode != 0
    assert r.stderr.count("use --nproc-per-node 2") == 1, r.stderr[-3000:]  # rank 0's one line, then all exit
    assert "train-check PASS" not in r.stdout
