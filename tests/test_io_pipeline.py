"""How outputs are written (issue 12, issue 9 item 5): `--workers N` gives byte-identical files,
`--dry-run` prints the plan the run then follows and writes nothing, `--json` is quiet and
parseable, progress counts every weights byte once, the manifest holds the hashes taken while
writing, and `--resume` continues a failed or killed run into byte-identical output.

Conversions run in-process (fixtures.pristine.run_cli) on the session's tiny checkpoints; one
real process is killed to test a resume after SIGKILL.
"""

from __future__ import annotations

import errno
import hashlib
import json
import signal
from pathlib import Path

import pytest

from fixtures.killed import neoxconv_killed
from fixtures.pristine import run_cli

# (source, command and options): every writer (HF shards, NeoX pipeline and sequential, Meta
# shards) and every reader (NeoX both layouts, HF, Meta).
PATHS = {
    "neox-to-hf-sharded": ("neox_seq", ["neox-to-hf", "--max-shard-size", "20KB"]),
    "hf-to-neox-tp2-sequential": ("hf_sharded", ["hf-to-neox", "--tp", "2", "--layout", "sequential"]),
    "neox-tp2-to-tp4-pipeline": ("neox", ["convert", "--to", "neox", "--tp", "4"]),
    "hf-to-meta-2-shards": ("hf_gqa", ["convert", "--to", "meta", "--tp", "2"]),
    "meta-to-neox-tp1": ("meta", ["llama-to-neox", "--tp", "1"]),
}


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def convert(pristine, path: str, out: Path, *extra) -> tuple[int, str, str]:
    source, args = PATHS[path]
    return run_cli(args[0], pristine[source], out, *args[1:], *extra)


@pytest.fixture(scope="module")
def reference(pristine, tmp_path_factory) -> dict[str, Path]:
    """Every path converted once with one worker: the output the other runs must match (each
    named `out` as theirs are: the model card's title is OUT's name)."""
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for path in PATHS:
        out[path] = root / path / "out"
        code, _, err = convert(pristine, path, out[path], "--workers", "1")
        assert code == 0, err
    return out


@pytest.mark.parametrize("path", ["neox-to-hf-sharded", "neox-tp2-to-tp4-pipeline", "hf-to-neox-tp2-sequential",
                                  "meta-to-neox-tp1"])
def test_every_source_file_is_indexed_once_and_never_unpickled_whole(path, pristine, tmp_path, monkeypatch):
    """Planning and validation read headers only: each weights file of the source is indexed
    once per run (a sequential mp_rank file too, for all its layers), and torch.load never runs."""
    import torch

    import neoxconv.formats.hf as hf
    import neoxconv.formats.meta_llama as meta
    import neoxconv.formats.neox_files as neox_files

    seen: list[Path] = []

    def counting(real):
        def index(f, *args, **kwargs):
            seen.append(Path(f).resolve())
            return real(f, *args, **kwargs)
        return index
    for module, name in ((neox_files, "index_pt"), (hf, "index_pt"), (hf, "index_safetensors"),
                         (meta, "index_pt")):
        monkeypatch.setattr(module, name, counting(getattr(module, name)))

    def no_load(*args, **kwargs):
        raise AssertionError(f"torch.load{args[:1]}")
    monkeypatch.setattr(torch, "load", no_load)
    code, _, err = convert(pristine, path, tmp_path / "out")
    assert code == 0, err
    src = pristine[PATHS[path][0]]
    # NeoX weights: layer files (pipeline; its mp_rank files hold no weights and are not read),
    # else the mp_rank files (sequential).
    neox = sorted(src.rglob("layer_*.pt")) or sorted(src.rglob("mp_rank_*.pt"))
    weights = [*neox, *src.rglob("*.safetensors"), *src.rglob("*.pth")]
    assert sorted(seen) == sorted(p.resolve() for p in weights)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_workers_give_byte_identical_output(path, pristine, reference, tmp_path):
    code, _, err = convert(pristine, path, tmp_path / "out", "--workers", "4")
    assert code == 0, err
    assert files_of(tmp_path / "out") == files_of(reference[path])


@pytest.mark.parametrize("path", sorted(PATHS))
def test_gathered_tensors_are_the_materialized_ones(path, pristine, reference, tmp_path, monkeypatch):
    """Merges, splits and permuted rows are gathered a chunk at a time (ptio.ranges.Gathered;
    here in chunks of 64 bytes, so every one spans many): the reference run's bytes equal those
    of a run that materializes every such tensor whole (torch.cat, .contiguous(), indexing)."""
    import neoxconv.pipeline as pipeline
    import neoxconv.ptio.ranges as ranges
    from neoxconv.io import tensor_bytes
    from neoxconv.lazy import Deferred

    gathered = []
    real = pipeline.tensor_parts

    def counting(t):
        parts = real(t)
        gathered.extend(p for p in parts if isinstance(p, ranges.Gathered))
        return parts
    monkeypatch.setattr(pipeline, "tensor_parts", counting)
    monkeypatch.setattr(ranges, "GATHER", 64)
    code, _, err = convert(pristine, path, tmp_path / "chunks" / "out", "--workers", "2")
    assert code == 0, err
    assert files_of(tmp_path / "chunks" / "out") == files_of(reference[path])
    assert gathered, "no tensor was gathered"

    def whole(t):
        if isinstance(t, Deferred) and not (isinstance(t, pipeline.Lazy) and len(t.runs()) <= pipeline.MAX_RUNS):
            t = t.materialize()
        return real(t) if isinstance(t, pipeline.Lazy) else [tensor_bytes(t.contiguous())]
    monkeypatch.setattr(pipeline, "tensor_parts", whole)
    code, _, err = convert(pristine, path, tmp_path / "out", "--workers", "2")
    assert code == 0, err
    assert files_of(tmp_path / "out") == files_of(reference[path])


def test_manifest_holds_the_hashes_taken_while_writing(reference):
    """Each manifest lists every other file of its output with its true size and SHA-256."""
    for out in reference.values():
        manifest = json.loads((out / "neoxconv-manifest.json").read_text())
        files = {rel: data for rel, data in files_of(out).items() if rel != "neoxconv-manifest.json"}
        assert manifest["format"] == "neoxconv-manifest" and manifest["version"] == 1
        assert manifest["files"] == {rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                                     for rel, data in files.items()}


@pytest.mark.parametrize("path", ["neox-to-hf-sharded", "hf-to-neox-tp2-sequential", "hf-to-meta-2-shards"])
def test_dry_run_prints_the_plan_and_writes_nothing(path, pristine, reference, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = convert(pristine, path, out, "--dry-run", "--json", "--workers", "2")
    assert code == 0, err
    assert list(tmp_path.iterdir()) == []  # no OUT, no temporary sibling
    plan = json.loads(stdout)
    written = files_of(reference[path])
    # The weights files of the plan are exactly those the run writes, with their sizes.
    assert {f["path"]: f["bytes"] for f in plan["files"]} == \
        {rel: len(data) for rel, data in written.items() if rel.endswith((".pt", ".pth", ".safetensors"))}
    assert plan["bytes"] == sum(f["bytes"] for f in plan["files"])
    assert plan["bytes_copied"] + plan["bytes_computed"] <= plan["bytes"]  # headers besides tensor data
    assert plan["tensors"] == sum(f["tensors"] for f in plan["files"]) > 0
    assert plan["workers"] == 2 and plan["peak_memory_bytes"] >= 0


def test_dry_run_table(pristine, tmp_path):
    code, stdout, err = run_cli("hf-to-neox", pristine["hf"], tmp_path / "out", "--tp", "2", "--dry-run")
    assert code == 0, err
    assert "nothing written" in stdout and "layer_02-model_01-model_states.pt" in stdout
    assert "predicted peak memory" in stdout
    assert not (tmp_path / "out").exists()


def test_json_result_and_progress_bytes(pristine, reference, tmp_path):
    """--json prints one JSON object and nothing on stderr (no progress bar); the progress
    callback counts every tensor byte of the weights files once."""
    code, stdout, err = convert(pristine, "neox-tp2-to-tp4-pipeline", tmp_path / "out", "--json")
    assert code == 0 and err == "", err
    result = json.loads(stdout)
    assert result["format"] == "neox" and result["resumed_files"] == 0 and result["layers"] == 2

    from neoxconv.convert import convert as convert_fn

    seen, planned = [], {}
    convert_fn(pristine["neox"], tmp_path / "again", to="neox", tp=4, progress=seen.append,
               on_plan=lambda plan, done: planned.update(plan.summary(), data_bytes=plan.data_bytes(done)))
    assert sum(seen) == planned["bytes_copied"] + planned["bytes_computed"] > 0
    assert sum(seen) == planned["data_bytes"]  # the bar's total: it ends at 100%


# -- --resume ---------------------------------------------------------------------------------------


def _fail_opening(monkeypatch, n: int, exc: BaseException) -> None:
    """The n-th output file the pipeline opens fails (the first n-1 may be finished by then)."""
    import neoxconv.pipeline as pipeline

    real, calls = pipeline.open_writer, []

    def open_writer(out_file, path, on_write):
        calls.append(path)
        if len(calls) == n:
            raise exc
        return real(out_file, path, on_write)
    monkeypatch.setattr(pipeline, "open_writer", open_writer)


def _partial(tmp_path: Path) -> list[Path]:
    return [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]


# Outputs of many files, which finish one after another (a sequential NeoX or Meta file takes
# every layer group, so it finishes with the run: a resume keeps nothing of those).
@pytest.mark.parametrize("path", ["neox-to-hf-sharded", "neox-tp2-to-tp4-pipeline"])
def test_resume_after_a_failed_run(path, pristine, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    # The 6th file is opened with layer 1 (HF: shards 1-3 finished; NeoX: the embedding's 4 files).
    _fail_opening(monkeypatch, 6, OSError(errno.ENOSPC, "No space left on device"))
    code, _, err = convert(pristine, path, out, "--resume", "--workers", "1")
    assert code == 2 and "for --resume" in err and not out.exists(), err
    [left] = _partial(tmp_path)
    assert (left / ".neoxconv-journal.jsonl").is_file()
    monkeypatch.undo()
    code, stdout, err = convert(pristine, path, out, "--resume", "--json")
    assert code == 0, err
    assert json.loads(stdout)["resumed_files"] >= 1  # files finished before the failure were kept
    assert files_of(out) == files_of(reference[path])
    assert _partial(tmp_path) == []


def test_resume_rewrites_a_damaged_finished_file(pristine, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fail_opening(monkeypatch, 6, OSError(errno.ENOSPC, "No space left on device"))
    assert convert(pristine, "neox-tp2-to-tp4-pipeline", out, "--resume", "--workers", "1")[0] == 2
    monkeypatch.undo()
    [left] = _partial(tmp_path)
    journal = [json.loads(line) for line in (left / ".neoxconv-journal.jsonl").read_text().splitlines()]
    finished = [e["file"] for e in journal[1:]]
    assert len(finished) == 4  # the embedding's files, one per TP rank
    damaged = left / finished[0]
    data = bytearray(damaged.read_bytes())
    data[-100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    code, stdout, err = convert(pristine, "neox-tp2-to-tp4-pipeline", out, "--resume", "--json")
    assert code == 0, err
    assert json.loads(stdout)["resumed_files"] == len(finished) - 1
    assert files_of(out) == files_of(reference["neox-tp2-to-tp4-pipeline"])


def test_resume_refuses_another_conversions_leftovers(pristine, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fail_opening(monkeypatch, 3, OSError(errno.ENOSPC, "No space left on device"))
    assert convert(pristine, "neox-tp2-to-tp4-pipeline", out, "--resume")[0] == 2
    monkeypatch.undo()
    code, _, err = run_cli("convert", pristine["neox"], out, "--to", "neox", "--tp", "1", "--resume")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "other sources or options" in lines[0], err
    assert not out.exists()


def test_without_resume_a_failed_run_leaves_nothing(pristine, tmp_path, monkeypatch):
    _fail_opening(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))  # mp_rank_01
    code, _, err = convert(pristine, "hf-to-neox-tp2-sequential", tmp_path / "out")
    assert code == 2 and "--resume" not in err
    assert list(tmp_path.iterdir()) == []


def test_resume_after_the_process_was_killed(pristine, reference, tmp_path):
    """A real SIGKILL once two files are finished (no cleanup runs), then --resume keeps them and the output
    is byte-identical. (Killing at the Nth file opened instead left nothing finished on a busy machine.)"""
    out = tmp_path / "out"
    source, args = PATHS["neox-tp2-to-tp4-pipeline"]
    r = neoxconv_killed("finished", 2, args[0], pristine[source], out, *args[1:], "--workers", "1")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists() and len(_partial(tmp_path)) == 1
    code, stdout, err = convert(pristine, "neox-tp2-to-tp4-pipeline", out, "--resume", "--json")
    assert code == 0, err
    assert json.loads(stdout)["resumed_files"] >= 2
    assert files_of(out) == files_of(reference["neox-tp2-to-tp4-pipeline"])




def test_the_collector_leaves_the_libraries_alone_while_converting(pristine, tmp_path, monkeypatch):
    """Objects that exist when a conversion starts are frozen (gc.freeze) until it ends; a cycle
    made inside is still collected."""
    import gc
    import weakref

    import neoxconv.pipeline as pipeline
    from neoxconv.heap import frozen_heap

    seen = []
    real = pipeline.execute

    def recording(*args, **kwargs):
        seen.append(gc.get_freeze_count())
        return real(*args, **kwargs)
    monkeypatch.setattr(pipeline, "execute", recording)
    assert gc.get_freeze_count() == 0
    code, _, err = convert(pristine, "neox-to-hf-sharded", tmp_path / "out")
    assert code == 0, err
    assert seen and seen[0] > 1000  # the imported libraries' objects
    assert gc.get_freeze_count() == 0

    class Node:
        pass
    with frozen_heap(), frozen_heap():
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
