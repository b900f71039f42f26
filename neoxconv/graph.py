"""Format registry: detect a source, read it to canonical form, write any target.

"Convert X to Y" = detect X, read to the canonical Checkpoint, write Y. N formats need 2N
adapters, never N^2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from neoxconv.checkpoint import Checkpoint
from neoxconv.errors import NeoxconvError

FORMATS = ("neox", "hf", "meta")


def detect(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise NeoxconvError(f"{path}: no such file or directory")
    if path.is_dir():
        from neoxconv.formats.hf import is_hf_dir

        if is_hf_dir(path):
            return "hf"
        if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
            return "meta"
        if (path / "latest").is_file() or any(path.glob("layer_*-model_*-model_states.pt")) \
                or any(path.glob("mp_rank_*_model_states.pt")) or any(path.glob("*/mp_rank_*_model_states.pt")) \
                or any(path.glob("*/layer_*-model_*-model_states.pt")):
            return "neox"
        if (path / "config.json").is_file():
            return "hf"  # let the HF reader name the missing weights
    raise NeoxconvError(f"{path}: unknown format (expected a NeoX checkpoint, a Hugging Face model directory "
                        "or a Meta Llama directory with params.json)")


def read(path: Path, *, fmt: str | None = None, config_files: list[Path] | None = None, family: str | None = None,
         qkv_layout: str | None = None) -> Checkpoint:
    fmt = fmt or detect(path)
    if fmt == "neox":
        from neoxconv.formats.neox import read_neox

        return read_neox(path, config_files, family=family, qkv_layout=qkv_layout)
    if fmt == "hf":
        from neoxconv.formats.hf import read_hf

        return read_hf(path, family=family)
    if fmt == "meta":
        from neoxconv.formats.meta_llama import read_meta

        return read_meta(path, family=family)
    raise NeoxconvError(f"unknown source format {fmt!r}")


def plan(ckpt: Checkpoint, fmt: str, **opts):
    """The write plan (neoxconv.plan) of `ckpt` in format `fmt`, from shapes alone."""
    if fmt == "neox":
        from neoxconv.formats.neox_write import plan_neox

        return plan_neox(ckpt, **opts)
    if fmt == "hf":
        from neoxconv.formats.hf import plan_hf

        return plan_hf(ckpt, **opts)
    if fmt == "meta":
        from neoxconv.formats.meta_llama import plan_meta

        return plan_meta(ckpt, **opts)
    raise NeoxconvError(f"unknown target format {fmt!r} (known: {', '.join(FORMATS)})")


def write(ckpt: Checkpoint, fmt: str, out: Path, progress: Callable[[int], None] | None = None, **opts) -> dict:
    if fmt == "neox":
        from neoxconv.formats.neox import write_neox

        return write_neox(ckpt, out, progress=progress, **opts)
    if fmt == "hf":
        from neoxconv.formats.hf import write_hf

        return write_hf(ckpt, out, progress=progress, **opts)
    if fmt == "meta":
        from neoxconv.formats.meta_llama import write_meta

        return write_meta(ckpt, out, progress=progress, **opts)
    raise NeoxconvError(f"unknown target format {fmt!r} (known: {', '.join(FORMATS)})")
