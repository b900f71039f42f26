"""Progress of the long operations (issue 12 item 7): the rich bars on a terminal, and what the
operations report to them: conversions count bytes written (tests/test_io_pipeline.py), verify
the bytes it hashes and the layer groups it scans, parity the layer groups of each forward pass,
export-run the bytes it hashes and converts per step (tests/test_export_run.py)."""

from __future__ import annotations

import io
import json
import re
import time

import pytest

from neoxconv.convert import convert
from neoxconv.manifest import NAME
from neoxconv.parity import run_parity
from neoxconv.tiny import tiny_hf_model
from neoxconv.verify import verify


@pytest.fixture
def terminal(monkeypatch) -> io.StringIO:
    """The CLI's stderr console, made a terminal writing into a buffer."""
    from neoxconv.cli.app import console

    buf = io.StringIO()
    monkeypatch.setattr(console, "_force_terminal", True)
    monkeypatch.setattr(console, "_file", buf)
    monkeypatch.setattr(console, "is_interactive", True)
    return buf


def test_bytes_bar_on_a_terminal(terminal):
    """A bar over bytes shows done/total, bytes/s and the time left; quiet (--json) it is off."""
    from neoxconv.cli.progress import Bar

    bar = Bar("hf → neox", 8_000_000).start()
    bar.advance(1_000_000)
    time.sleep(0.2)  # the speed needs two samples apart in time
    bar.advance(1_000_000)
    bar.progress.refresh()
    text = terminal.getvalue()
    bar.stop()
    assert "hf → neox" in text and "2.0/8.0 MB" in text, text
    assert re.search(r"\d [kMG]?B/s", text) and re.search(r"\d:\d\d:\d\d", text), text  # speed, time left
    assert Bar("hf → neox", 8_000_000, quiet=True).disabled


def test_phase_bars_count_in_their_unit(terminal):
    """Bars: one bar per label, in the default unit or the call's; a new label replaces the bar."""
    from neoxconv.cli.progress import BYTES, GROUPS, Bars

    bars = Bars(GROUPS, quiet=False)
    bars("A (neox)", 3, 5)
    bars.bar.progress.refresh()
    first = bars.bar
    bars("hashing", 2_000_000, 4_000_000, BYTES)
    bars.bar.progress.refresh()
    assert bars.bar is not first and not first.progress.live.is_started
    text = terminal.getvalue()
    hashing = bars.bar
    bars("hashing", 4_000_000, 4_000_000)  # done: the bar goes, later calls of the phase change nothing
    assert bars.bar is None and not hashing.progress.live.is_started
    bars("hashing", 4_000_000, 4_000_000)
    assert bars.bar is None
    bars("B (hf)", 1, 5)
    assert bars.bar is not None and bars.bar.progress.live.is_started
    bars.stop()
    assert re.search(r"A \(neox\).*3/5 layer groups", text), text
    assert "hashing" in text and "2.0/4.0 MB" in text, text
    assert bars.bar is None
    assert Bars(GROUPS, quiet=True).quiet


def _last(events: list[tuple], label: str) -> tuple[int, int]:
    seen = [(d, t) for lab, d, t in events if lab == label]
    assert seen, (label, events)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen), seen  # never goes back
    return seen[-1]


def test_verify_reports_bytes_hashed_and_groups_scanned(tmp_path):
    hf, neox = tmp_path / "hf", tmp_path / "neox"
    tiny_hf_model("gptneox", seed=3).save_pretrained(hf)
    convert(hf, neox, to="neox", tp=2)
    events: list[tuple] = []
    report = verify(neox, progress=lambda phase, done, total: events.append((phase, done, total)))
    assert report.verdict == "sound"
    manifest = json.loads((neox / NAME).read_text())
    listed = sum(e["size"] for e in manifest["files"].values())
    assert _last(events, "hash") == (listed, listed)
    layers = json.loads((hf / "config.json").read_text())["num_hidden_layers"]
    done, total = _last(events, "scan")
    assert done == total == layers + 3  # the layer files, the embedding, the final norm, the head
    assert [p for p, _, _ in events] == sorted((p for p, _, _ in events), key=["hash", "scan"].index)


def test_parity_reports_each_forward_pass(tmp_path):
    """A (NeoX): embedding, each layer, final norm, head; B (HF): each group transformers runs."""
    hf, neox = tmp_path / "hf", tmp_path / "neox"
    tiny_hf_model("gptneox", seed=4).save_pretrained(hf)
    convert(hf, neox, to="neox", tp=2)
    events: list[tuple] = []
    report = run_parity(neox, hf, tokens=8, progress=lambda label, done, total: events.append((label, done, total)))
    assert report.passed
    assert [lab for lab, _, _ in events] == sorted((lab for lab, _, _ in events), key=["A (neox)", "B (hf)"].index)
    layers = json.loads((hf / "config.json").read_text())["num_hidden_layers"]
    assert _last(events, "A (neox)") == (layers + 3, layers + 3)
    done, total = _last(events, "B (hf)")
    assert done == total == layers + 3  # embed_in, the layers, final_layer_norm, embed_out
    assert [d for lab, d, _ in events if lab == "B (hf)"] == list(range(1, total + 1))
