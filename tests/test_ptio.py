"""neoxconv.ptio: indexing torch files without reading tensor data, ranged reads, byte-range
copies, and a streaming writer whose files equal torch.save's byte for byte.

Everything is compared with torch itself on real files: torch.load(mmap=True, weights_only=True)
for the index, torch.save for the writer."""

from __future__ import annotations

import argparse
import collections
import os
import random
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.neox_raw import random_rank_tensors, write_neox_checkpoint
from neoxconv.errors import NeoxconvError
from neoxconv.formats.neox import read_neox, write_neox
from neoxconv.ptio import (FileRange, MappedFile, PtWriter, Slot, TensorRecord, copy_range, index_pt, index_safetensors,
                           read_tensor, save)
from neoxconv.ptio.zipformat import serialization_id

CFG = dict(num_layers=2, hidden_size=32, num_attention_heads=4, rotary_pct=0.25, gpt_j_residual=True,
           no_weight_tying=True, layernorm_epsilon="1e-5")


def _rich_tree() -> dict:
    """Every dtype NeoX uses and more, shared storages, views, empty and 0-dim tensors, and the
    non-tensor values DeepSpeed/NeoX files carry."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    same = [1, 2]
    return {
        "fp16": torch.randn(10, generator=g).half(), "bf16": torch.randn(3, 5, generator=g).bfloat16(),
        "fp32": torch.randn(2, 3, generator=g), "fp64": torch.randn(3, generator=g).double(),
        "i64": torch.arange(7), "i32": torch.arange(3, dtype=torch.int32), "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(4, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "u16": torch.arange(4, dtype=torch.int32).to(torch.uint16),  # saved with _rebuild_tensor_v3
        "empty": torch.empty(0, 3), "scalar": torch.tensor(3.5),
        "shared": [base, base[1:3], base.t(), base[:, 1]],  # one storage, views (non-contiguous too)
        "grad": torch.ones(2).requires_grad_(),
        "nested": {"x": [1, 2.5, (3, "s")], "n": None, "od": collections.OrderedDict(a=torch.ones(2))},
        "np_rng_state": np.random.RandomState(1).get_state(), "random_rng_state": random.Random(2).getstate(),
        "set": {1, 2}, "bytes": b"abc", "args": argparse.Namespace(a=1), "size": torch.Size([2, 3]),
        "alias1": same, "alias2": same,
        "pk": torch.frombuffer(bytearray(b"PK\x07\x08abcdefgh"), dtype=torch.uint8),  # looks like a zip descriptor
    }


def _same(loaded, idx_obj, mapped: MappedFile, fd: int, storages: dict) -> None:
    """The index tree equals torch.load's: values, and for tensors dtype/shape/stride/offset,
    bytes (via the mapping and via pread), and which tensors share a storage."""
    if isinstance(loaded, torch.Tensor):
        assert isinstance(idx_obj, TensorRecord)
        assert (idx_obj.dtype, idx_obj.shape, idx_obj.stride, idx_obj.storage_offset, idx_obj.requires_grad) == (
            loaded.dtype, tuple(loaded.shape), loaded.stride(), loaded.storage_offset(), loaded.requires_grad)
        view = mapped.tensor(idx_obj)
        assert view.stride() == loaded.stride() and torch.equal(view, loaded.detach())
        assert torch.equal(read_tensor(fd, idx_obj), loaded.detach())
        key = loaded.untyped_storage().data_ptr()
        assert storages.setdefault(idx_obj.storage, key) == key  # same record <-> same storage
        return
    assert not isinstance(idx_obj, TensorRecord)
    if isinstance(loaded, dict):
        assert type(idx_obj) is type(loaded) and list(idx_obj) == list(loaded)
        for k in loaded:
            _same(loaded[k], idx_obj[k], mapped, fd, storages)
    elif isinstance(loaded, (list, tuple)):
        assert type(idx_obj) is type(loaded) and len(idx_obj) == len(loaded)
        for a, b in zip(loaded, idx_obj, strict=True):
            _same(a, b, mapped, fd, storages)
    elif isinstance(loaded, np.ndarray):
        assert np.array_equal(idx_obj, loaded)
    else:
        assert idx_obj == loaded


def _check_index(path: Path) -> int:
    loaded = _torch_load(path)
    idx = index_pt(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        _same(loaded, idx.obj, MappedFile(path), fd, {})
    finally:
        os.close(fd)
    return len(idx.tensors())


def _torch_load(path: Path):
    from neoxconv.io import load_pickle

    return load_pickle(path)  # torch.load(mmap=True, weights_only=True) + neoxconv's allowlist (RNG state)


@pytest.fixture(scope="module")
def neox_files(tmp_path_factory) -> list[Path]:
    """NeoX files as DeepSpeed writes them (both layouts, fp16 and bf16) and as neoxconv writes them."""
    root = tmp_path_factory.mktemp("neox")
    files = []
    for layout, dtype in (("pipeline", torch.float16), ("sequential", torch.bfloat16)):
        ranks = random_rank_tensors(tp=2, layers=2, hidden=32, heads=4, ffn=128, vocab_rows=128, tied=False,
                                    dtype=dtype)
        save_dir = write_neox_checkpoint(root / f"raw-{layout}", ranks, CFG, layout=layout)
        files += sorted((save_dir / "global_step1000").glob("*.pt"))
        out = root / f"ours-{layout}"
        write_neox(read_neox(save_dir), out, tp=2, layout="sequential" if layout == "pipeline" else "pipeline")
        files += sorted((out / "global_step1000").glob("*.pt"))
    return files


def test_index_equals_torch_load_on_neox_files(neox_files):
    kinds = {p.name.split("-")[0].split("_model")[0][:8] for p in neox_files}
    assert {"layer_00", "mp_rank_"} <= kinds
    total = sum(_check_index(p) for p in neox_files)
    assert total > 50
    seq = index_pt(next(p for p in neox_files if "raw-sequential" in str(p) and p.name.startswith("mp_rank")))
    assert any(k.startswith("module.sequential.2.") for k in seq.tensors())
    assert seq.obj["torch_rng_state"].dtype == torch.uint8 and isinstance(seq.obj["np_rng_state"][1], np.ndarray)


def test_index_equals_torch_load_on_every_tensor_kind(tmp_path):
    path = tmp_path / "rich.pt"
    torch.save(_rich_tree(), path)
    _check_index(path)
    idx = index_pt(path)
    recs = idx.tensors()
    assert len({id(recs[f"shared.{i}"].storage) for i in range(4)}) == 1
    assert not recs["shared.2"].is_contiguous and recs["shared.2"].file_range is None
    assert recs["shared.1"].file_range == (recs["shared.1"].storage.offset + 16, 32)
    assert recs["fp16"].whole_storage and not recs["shared.1"].whole_storage
    assert recs["scalar"].shape == () and recs["empty"].nbytes == 0
    assert idx.obj["alias1"] is idx.obj["alias2"]


def test_index_reads_headers_not_tensor_data(tmp_path):
    path = tmp_path / "big.pt"
    torch.save({f"w{i}": torch.randn(1 << 20) for i in range(8)}, path)  # 32 MiB of tensors

    def rchar() -> int:
        lines = Path("/proc/self/io").read_text().splitlines()
        return int(next(ln for ln in lines if ln.startswith("rchar")).split()[1])

    before = rchar()
    idx = index_pt(path)
    read = rchar() - before
    assert len(idx.tensors()) == 8
    assert read < 256 << 10, f"indexing read {read} bytes of a {path.stat().st_size}-byte file"


def _rewrite(src: Path, dst: Path, patch) -> None:
    """Copy a torch zip record by record, changing some (Python's zipfile: torch reads it too)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, patch(info.filename.split("/", 1)[1], zin.read(info)))


def test_numpy1_rng_state_is_accepted(tmp_path):
    """NeoX files written with numpy 1 name numpy.core.multiarray; numpy 2 moved it to numpy._core."""
    src, dst = tmp_path / "np2.pt", tmp_path / "np1.pt"
    torch.save({"np_rng_state": np.random.RandomState(3).get_state(), "w": torch.ones(2)}, src)
    _rewrite(src, dst, lambda n, b: b.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    assert b"numpy.core.multiarray" in zipfile.ZipFile(dst).read("np2/data.pkl")
    idx = index_pt(dst)
    assert np.array_equal(idx.obj["np_rng_state"][1], np.random.RandomState(3).get_state()[1])


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_payload_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _Payload(marker)}, path)
    with pytest.raises(NeoxconvError) as e:
        index_pt(path, trust=False)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "system" in msg and "--trust-pickle" in msg
    assert not marker.exists()


@pytest.mark.parametrize("case", ["big-endian", "legacy", "missing-record", "short-record", "not-torch"])
def test_bad_files_are_refused_in_one_line(tmp_path, case):
    src, path = tmp_path / "ok.pt", tmp_path / "bad.pt"
    torch.save({"w": torch.arange(4.0)}, src)
    if case == "big-endian":
        _rewrite(src, path, lambda n, b: b"big" if n == "byteorder" else b)
        want = "big-endian"
    elif case == "legacy":
        torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
        want = "legacy"
    elif case == "missing-record":
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
            for info in zin.infolist():
                if not info.filename.endswith("data/0"):
                    zout.writestr(info.filename, zin.read(info))
        want = "missing"
    elif case == "short-record":
        _rewrite(src, path, lambda n, b: b[:8] if n == "data/0" else b)
        want = "has 8 bytes"
    else:
        path.write_bytes(b"hello")
        want = "not a torch zip"
    with pytest.raises(NeoxconvError) as e:
        index_pt(path)
    assert want in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# ranges


@pytest.mark.parametrize("kernel", [True, False])
def test_copy_range_copies_exact_bytes(tmp_path, kernel):
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = os.urandom(3 << 20)
    src.write_bytes(data)
    dst.write_bytes(b"\0" * 100)
    s, d = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    try:
        how = copy_range(s, 12345, d, 100, len(data) - 12345, kernel=kernel)
    finally:
        os.close(s), os.close(d)
    assert how == ("copy_file_range" if kernel else "pread/pwrite")
    assert dst.read_bytes() == b"\0" * 100 + data[12345:]


# ---------------------------------------------------------------------------------------------
# writer


def _identical(tree, tmp_path: Path, name: str = "x.pt") -> Path:
    (tmp_path / "torch").mkdir(exist_ok=True)
    (tmp_path / "ours").mkdir(exist_ok=True)
    torch.save(tree, tmp_path / "torch" / name)
    save(tree, tmp_path / "ours" / name)
    assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "torch" / name).read_bytes()
    return tmp_path / "ours" / name


def test_writer_equals_torch_save_byte_for_byte(tmp_path):
    path = _identical(_rich_tree(), tmp_path)
    back = torch.load(path, weights_only=False)
    assert torch.equal(back["bf16"], _rich_tree()["bf16"]) and back["alias1"] is back["alias2"]
    _identical({}, tmp_path, "empty.pt")
    # enough records for several rehashes of torch's record-name set (serialization id)
    _identical({f"t{i}": torch.full((i % 3,), float(i)) for i in range(300)}, tmp_path, "many.pt")


def test_writer_copies_records_from_source_files(neox_files, tmp_path):
    """Re-saving an index copies each storage with copy_file_range: the file equals torch.save's
    of torch.load's result, and equals the source when that was written by torch.save."""
    for src in neox_files:
        out = tmp_path / src.parent.parent.name / src.name
        out.parent.mkdir(parents=True, exist_ok=True)
        save(index_pt(src).obj, out)
        assert out.read_bytes() == src.read_bytes(), src


def test_streamed_slots_any_order_any_thread(tmp_path):
    """A sequential NeoX mp_rank file planned from shapes, tensors written out of order from
    threads: equals torch.save of the same dict; loads with and without mmap."""
    g = torch.Generator().manual_seed(1)
    module = {f"sequential.{i}.w{j}": torch.randn(17 * (j + 1), 8, generator=g).half()
              for i in range(3) for j in range(3)}
    state = {"module": module, "buffer_names": [], "optimizer": None, "lr_scheduler": None,
             "sparse_tensor_module_names": [], "skipped_steps": 0, "global_steps": 7, "global_samples": 0,
             "dp_world_size": 1, "mp_world_size": 2, "iteration": 7}
    slots = {k: Slot(v.dtype, tuple(v.shape)) for k, v in module.items()}
    (tmp_path / "torch").mkdir()
    torch.save(state, tmp_path / "torch" / "mp_rank_00_model_states.pt")
    path = tmp_path / "mp_rank_00_model_states.pt"
    with PtWriter(path, dict(state, module=slots)) as w:
        assert w.slots() == list(slots.values())
        names = list(module)[::-1]
        threads = [threading.Thread(target=w.write, args=(slots[k], module[k])) for k in names[:4]]
        for t in threads:
            t.start()
        for k in names[4:]:
            w.write(slots[k], _bytes(module[k]) if k.endswith("w0") else module[k])
        for t in threads:
            t.join()
    assert path.read_bytes() == (tmp_path / "torch" / path.name).read_bytes()
    for mmap in (True, False):
        back = torch.load(path, mmap=mmap, weights_only=True)
        assert all(torch.equal(back["module"][k], v) for k, v in module.items()) and back["iteration"] == 7


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_slot_from_file_range_and_failures_leave_no_file(tmp_path):
    src = tmp_path / "src.pt"
    w0 = torch.randn(64, 8)
    torch.save({"w": w0}, src)
    rec = index_pt(src).tensors()["w"]
    slot, rows = Slot(torch.float32, (64, 8)), Slot(torch.float32, (40, 8))
    out = tmp_path / "out.pt"
    off, n = rec.file_range
    with PtWriter(out, {"w": slot, "rows": rows}) as w:
        w.write(slot, FileRange(src, off, n))  # CRC computed from the mapped source
        # rows 0-9, 50-59 from the file, 20 rows from memory: one record from three parts
        w.write(rows, [FileRange(src, off, 10 * 32), w0[20:40], FileRange(src, off + 50 * 32, 10 * 32)])
    back = torch.load(out, weights_only=True)
    assert torch.equal(back["w"], w0) and torch.equal(back["rows"], torch.cat([w0[:10], w0[20:40], w0[50:60]]))
    assert zipfile.ZipFile(out).testzip() is None  # every record's CRC-32 is right
    with pytest.raises(ValueError, match="unwritten"):
        PtWriter(out, {"w": slot, "v": Slot(torch.float16, (2,))}).close()
    assert not out.exists()
    with pytest.raises(ValueError, match="slot is"):
        with PtWriter(out, {"w": slot}) as w:
            w.write(slot, torch.zeros(64, 8, dtype=torch.float16))
    assert not out.exists()


def test_safetensors_records_read_and_copy(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "m.safetensors"
    tensors = {"a": torch.randn(5, 3).bfloat16(), "b": torch.arange(4), "e": torch.empty(0, 2)}
    save_file(tensors, src, metadata={"format": "pt"})
    records, meta = index_safetensors(src)
    assert meta == {"format": "pt"} and set(records) == set(tensors)
    mapped = MappedFile(src)
    assert all(torch.equal(mapped.tensor(r), load_file(src)[k]) for k, r in records.items())
    slot = Slot(torch.bfloat16, (5, 3))
    with PtWriter(tmp_path / "x.pt", {"a": slot}) as w:
        w.write(slot, FileRange(src, *records["a"].file_range))  # CRC computed while copying
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["a"], tensors["a"])


def test_serialization_id_matches_torch(tmp_path):
    """The id torch computes from its record-name set and CRC words, for one archive."""
    path = tmp_path / "a.pt"
    torch.save({"a": torch.ones(3), "b": torch.empty(0)}, path)
    infos = zipfile.ZipFile(path).infolist()
    names = [i.filename.split("/", 1)[1] for i in infos]
    assert names[-1] == ".data/serialization_id"
    sid = serialization_id(names[:-1], [i.CRC for i in infos[:-1] if i.file_size])
    assert sid.encode() == zipfile.ZipFile(path).read(infos[-1])
