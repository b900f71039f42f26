"""The output side of bad input: a full or read-only disk and interrupted writes leave nothing at
OUT (no temporary sibling either) and end in one line: exit 2, or 130 when interrupted. Faults
are injected where the OS would raise them (the writer's file writes, the temporary directory),
the kernel's own file-size limit is used once, and one real process is killed mid-write.
"""

from __future__ import annotations

import errno
import re
import resource
import signal

from fixtures.killed import neoxconv_killed
from fixtures.pristine import no_output, run_cli

NEOX_TO_HF = "neox-to-hf"


# -- the output side: a full or read-only disk, interrupted writes --------------------------------


def _nth(real, failing, n: int):
    """Fault injection: the n-th call fails the way `failing` does, the others do the real thing."""
    calls = {"n": 0}

    def wrapped(*args):
        calls["n"] += 1
        return (failing if calls["n"] == n else real)(*args)
    return wrapped


def test_disk_full_while_writing_neox(pristine, tmp_path, monkeypatch):
    import neoxconv.pipeline as pipeline

    def full(out_file, path, on_write):  # the OS fails the write of the third shard file, partly written
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(pipeline, "open_writer", _nth(pipeline.open_writer, full, 3))
    out = tmp_path / "out"
    code, _, err = run_cli("hf-to-neox", pristine["hf"], out, "--tp", "2")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"out/global_step0/layer_02-model_00-model_states\.pt: cannot write the output \(No space left "
                     r"on device\); nothing was written to .*out$", err.strip()), err
    assert no_output(out)


def test_disk_full_while_writing_safetensors(pristine, tmp_path, monkeypatch):
    import neoxconv.io as nio

    real = nio.SafetensorsStreamWriter.write

    def failing(self, name, t):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(nio.SafetensorsStreamWriter, "write", _nth(real, failing, 5))
    out = tmp_path / "out"
    code, _, err = run_cli(NEOX_TO_HF, pristine["neox"], out)
    assert code == 2 and re.fullmatch(r"error: .*out: cannot write the output \(No space left on device\); nothing was "
                                      r"written to .*out", err.strip()), err
    assert no_output(out)


def test_read_only_output_directory(pristine, tmp_path, monkeypatch):
    """Tests run as root here, which ignores permissions: the OS's answer is injected instead."""
    import neoxconv.io as nio

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path))
    monkeypatch.setattr(nio.tempfile, "mkdtemp", read_only)
    out = tmp_path / "out"
    code, _, err = run_cli(NEOX_TO_HF, pristine["neox"], out)
    assert code == 2 and err.strip().endswith(f"{tmp_path}: cannot create the output here (Read-only file system)"), err
    assert not out.exists()


def test_interrupted_write_leaves_nothing(pristine, tmp_path, monkeypatch):
    import neoxconv.pipeline as pipeline

    def interrupt(out_file, path, on_write):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "open_writer", _nth(pipeline.open_writer, interrupt, 4))
    out = tmp_path / "out"
    code, _, err = run_cli("hf-to-neox", pristine["hf"], out, "--tp", "2")
    assert code == 130 and err.strip() == "aborted", err
    assert no_output(out)


def test_file_size_limit_from_the_kernel(pristine, tmp_path):
    """The kernel refuses writes past 20 kB (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC; no
    injection): one line, exit 2, nothing at OUT. Python ignores SIGXFSZ, so the write fails."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    out = tmp_path / "out"
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        code, _, err = run_cli("hf-to-neox", pristine["hf"], out, "--tp", "2")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    # The OS's own error (the writer writes with os calls, not through torch.save's zip writer).
    assert re.search(r"out/global_step0/layer_\d\d-model_\d\d-model_states\.pt: cannot write the output \(File too "
                     r"large\); nothing was written to", lines[0]), err
    assert no_output(out)


def test_process_killed_mid_write(pristine, tmp_path):
    """SIGKILL in the middle of writing (no chance to clean up): OUT never appears; only a hidden
    `.OUT.partial-*` directory is left, which `verify` calls damaged."""
    out = tmp_path / "out"
    r = neoxconv_killed("open", 3, "hf-to-neox", pristine["hf"], out, "--tp", "2")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists()
    left = list(tmp_path.iterdir())
    assert [p.name.startswith(".out.partial-") for p in left] == [True]
    code, text_out, _ = run_cli("verify", left[0])
    assert code == 1 and "DAMAGED" in text_out, text_out
