"""Property-based fuzzing of the readers: random truncations and byte flips of one file of a tiny
checkpoint, then one conversion in-process. Every run must end in a clean error (exit 1 or 2,
one line on stderr, nothing at OUT) or a complete conversion (exit 0, OUT with its manifest):
never a traceback or "internal error" (exit 3), a hang, or a partial output.

Bounded for CI: NEOXCONV_FUZZ_EXAMPLES examples per file type (default 10), 30 s per example at
most. Run deeper locally with e.g. NEOXCONV_FUZZ_EXAMPLES=500.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures.pristine import no_output, run_cli

EXAMPLES = int(os.environ.get("NEOXCONV_FUZZ_EXAMPLES", "10"))
TAG = "global_step1000"

# file type -> (pristine checkpoint, file inside it, command)
TARGETS = {
    "pipeline-pt": ("neox", f"{TAG}/layer_02-model_01-model_states.pt", "neox-to-hf"),
    "mp-rank-pt": ("neox_seq", f"{TAG}/mp_rank_00_model_states.pt", "neox-to-hf"),
    "yaml": ("neox", f"{TAG}/configs/model.yml", "neox-to-hf"),
    "latest": ("neox", "latest", "neox-to-hf"),
    "safetensors": ("hf", "model.safetensors", "hf-to-neox"),
    "safetensors-index": ("hf_sharded", "model.safetensors.index.json", "hf-to-neox"),
    "config-json": ("hf", "config.json", "hf-to-neox"),
    "meta-pth": ("meta", "consolidated.01.pth", "llama-to-neox"),
    "params-json": ("meta", "params.json", "llama-to-neox"),
}


@st.composite
def damage(draw, size: int):
    """(kind, position, bit): truncate at a position or flip one bit; positions favour the first
    4 KiB, where headers, pickles' opcodes and configs live."""
    head = st.integers(0, max(0, min(size, 4096) - 1))
    position = draw(st.one_of(head, st.integers(0, max(0, size - 1))))
    kind = draw(st.sampled_from(["truncate", "flip"]))
    return kind, position, draw(st.integers(0, 7))


def apply(path: Path, kind: str, position: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    if kind == "truncate":
        del data[position:]
    elif data:
        data[position % len(data)] ^= 1 << bit
    path.write_bytes(bytes(data))


def check_outcome(code: int, err: str, out: Path) -> None:
    if code == 0:
        assert (out / "neoxconv-manifest.json").is_file(), "a conversion that succeeded must be complete"
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        return
    lines = err.strip().splitlines()
    assert code in (1, 2), err
    assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
    assert no_output(out)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_reader(target, pristine):
    source, rel, command = TARGETS[target]
    size = (pristine[source] / rel).stat().st_size

    @settings(max_examples=EXAMPLES, deadline=timedelta(seconds=30), database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(damage(size))
    def run(change):
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(shutil.copytree(pristine[source], Path(tmp) / "src"))
            apply(src / rel, *change)
            out = Path(tmp) / "out"
            args = ("--tp", "2") if command != "neox-to-hf" else ()
            code, _, err = run_cli(command, src, out, *args)
            check_outcome(code, err, out)

    run()
