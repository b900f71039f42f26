"""Deferred tensors (neoxconv.lazy) and how their bytes are written (neoxconv.pipeline,
ptio.ranges): a row-parallel merge (`Joined`), a split (a strided view) and rows permuted one by
one are gathered a chunk at a time from the mapped rank files, never built whole in memory, and
give the bytes torch.cat, torch.chunk and indexing give. Pure reshuffles: compared bit for bit."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import neoxconv.ptio.ranges as ranges
from neoxconv.lazy import Joined, Lazy
from neoxconv.pipeline import tensor_parts
from neoxconv.ptio import FileRange, index_safetensors
from neoxconv.ptio.ranges import Gathered, MappedFile


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 4 KiB: every gathered tensor here spans many."""
    monkeypatch.setattr(ranges, "GATHER", 4096)
    monkeypatch.setattr(ranges, "_local", threading.local())


def _bytes(parts: list) -> bytes:
    out = b""
    for p in parts:
        if isinstance(p, FileRange):
            with open(p.path, "rb") as f:
                f.seek(p.offset)
                out += f.read(p.nbytes)
        elif isinstance(p, Gathered):
            chunks = [bytes(c) for c in p.chunks()]
            assert all(len(c) <= max(ranges.GATHER, p.row_bytes) for c in chunks)
            assert sum(map(len, chunks)) == p.nbytes
            out += b"".join(chunks)
        else:
            out += bytes(p)
    return out


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.fixture
def ranks(tmp_path: Path) -> tuple[list[Lazy], list[torch.Tensor], MappedFile]:
    """Two tensor-parallel ranks of a row-parallel weight [rows 64, cols 1024 each], fp16, as Lazy
    rows of one mapped safetensors file, and their real values."""
    gen = torch.Generator().manual_seed(0)
    real = [torch.randn(64, 1024, generator=gen).half() for _ in range(2)]
    path = tmp_path / "ranks.safetensors"
    save_file({f"rank{i}": t for i, t in enumerate(real)}, str(path))
    mapped = MappedFile(path)
    records, _ = index_safetensors(path)
    lazies = [Lazy.of_record(mapped.tensor(records[f"rank{i}"]), records[f"rank{i}"]) for i in range(2)]
    return lazies, real, mapped


def test_a_merge_on_dim_1_is_joined_and_gathered_from_the_mapping(ranks):
    lazies, real, _ = ranks
    merged = torch.cat(lazies, dim=1)
    assert isinstance(merged, Joined)
    assert merged.shape == (64, 2048) and merged.dtype == torch.float16
    expected = torch.cat(real, dim=1)
    assert torch.equal(merged.materialize(), expected)
    parts = tensor_parts(merged)
    assert len(parts) == 1 and isinstance(parts[0], Gathered)
    assert parts[0].nbytes == expected.numel() * 2 and parts[0].rows == 64
    assert _bytes(parts) == _raw(expected)


def test_a_split_of_a_merge_narrows_its_parts(ranks):
    """tp 2 -> tp 4: each new rank's block is a view of one old rank: nothing is merged."""
    lazies, real, _ = ranks
    merged = torch.cat(lazies, dim=1)
    expected = torch.cat(real, dim=1)
    for chunks in (1, 2, 3, 4, 8):
        got = merged.chunk(chunks, dim=1)
        want = expected.chunk(chunks, dim=1)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert tuple(g.shape) == tuple(w.shape)
            assert _bytes(tensor_parts(g)) == _raw(w)
    quarter = merged.chunk(4, dim=1)[1]  # inside rank 0: a strided view of its mapping
    assert isinstance(quarter, torch.Tensor) and not quarter.is_contiguous()
    assert isinstance(tensor_parts(quarter)[0], Gathered)
    straddling = merged.narrow(1, 900, 400)  # across the two ranks: joined again
    assert isinstance(straddling, Joined) and len(straddling.parts) == 2
    assert _bytes(tensor_parts(straddling)) == _raw(expected.narrow(1, 900, 400))
    assert torch.equal(merged.split([100, 1948], dim=1)[1].materialize(), expected[:, 100:])
    assert merged.narrow(1, 5, 0).shape == (64, 0)


def test_other_ops_on_a_joined_run_on_the_real_tensor(ranks):
    lazies, real, _ = ranks
    merged = torch.cat(lazies, dim=1)
    expected = torch.cat(real, dim=1)
    assert torch.equal(merged.float(), expected.float())
    assert torch.equal(merged * 2, expected * 2)
    assert torch.equal(merged.narrow(0, 3, 5), expected.narrow(0, 3, 5))
    assert torch.equal(torch.cat([merged, merged], dim=0), torch.cat([expected, expected], dim=0))
    assert merged.to(torch.float16) is merged
    assert torch.equal(merged.to(torch.float32), expected.float())


def test_mismatched_or_planning_tensors_are_not_joined():
    a, b = Lazy.leaf(torch.ones(4, 8)), Lazy.leaf(torch.ones(5, 8))
    assert Joined.of([a, b], 1) is None  # rows differ: torch.cat raises as it would
    with pytest.raises(RuntimeError):
        torch.cat([a, b], dim=1)
    planned = torch.cat([Lazy.shape_only((512, 512), torch.float16)] * 2, dim=1)
    assert not isinstance(planned, Joined) and planned.is_meta and planned.shape == (512, 1024)
    assert isinstance(torch.cat([a, a], dim=0), Lazy)  # dim 0 stays rows


def test_strided_tensors_of_any_shape_are_gathered_in_order():
    t = torch.arange(2 * 6 * 8 * 4, dtype=torch.int16).reshape(2, 6, 8, 4)
    for view in (t[:, 2:4], t[:, :, 3:5], t[:, 1::2], t.transpose(2, 3), t[:, :, :, 1]):
        parts = tensor_parts(view)
        assert isinstance(parts[0], Gathered) and _bytes(parts) == _raw(view)
    wide = torch.arange(3 * 5000, dtype=torch.float32).reshape(3, 5000)[:, 1:]  # a row > GATHER
    assert _bytes(tensor_parts(wide)) == _raw(wide)
    assert _bytes(tensor_parts(torch.arange(10)[::2])) == _raw(torch.arange(10)[::2])


def test_many_short_lazy_runs_are_gathered_from_the_mapping(ranks):
    """A per-row permutation (rotary for Meta files): more runs than FileRanges are worth."""
    lazies, real, _ = ranks
    order = torch.randperm(64, generator=torch.Generator().manual_seed(2)).tolist()
    rows = torch.stack([lazies[0][i] for i in order + order])
    assert isinstance(rows, Lazy) and len(rows.runs()) > 64
    parts = tensor_parts(rows)
    assert len(parts) == 1 and isinstance(parts[0], Gathered)
    assert _bytes(parts) == _raw(torch.cat([real[0][order], real[0][order]]))
    two = torch.stack([lazies[r][i] for r in (0, 1) for i in order])  # two sources: one gathering copy
    assert _bytes(tensor_parts(two)) == _raw(torch.cat([real[0][order], real[1][order]]))
