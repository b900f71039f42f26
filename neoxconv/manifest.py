"""`neoxconv-manifest.json`: the size and sha256 of every file neoxconv wrote.

Written at the root of every conversion's output (the NeoX save dir with `latest`, the HF or
Meta directory) as the last step before the output is renamed into place (weights files are
hashed while they are written, by neoxconv.pipeline; the rest here); read by `neoxconv
verify` (every listed file present, same size, same hash) and shown by `neoxconv inspect`.

    {"format": "neoxconv-manifest", "version": 1, "neoxconv": "<version>",
     "files": {"<posix path relative to the root>": {"size": <int>, "sha256": "<hex>"}, ...}}

It lists every regular file under the root except itself. A file added later (a README, say)
is not damage; one that is missing, resized or changed is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from neoxconv.errors import DamagedInput
from neoxconv.progress import Progress, counter

NAME = "neoxconv-manifest.json"
FORMAT = "neoxconv-manifest"
VERSION = 1
_BLOCK = 1 << 22


def sha256(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file; ``on_bytes(n)`` after each block read (progress)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    from neoxconv.resume import JOURNAL

    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in (NAME, JOURNAL))


def write_manifest(root: Path, known: dict[str, tuple[int, str]] | None = None) -> dict:
    """Hash every file under `root` (a finished output) into root/neoxconv-manifest.json.
    `known`: (size, sha256) of files already hashed as they were written (neoxconv.pipeline);
    only the others are read."""
    from neoxconv import __version__

    root, known = Path(root), known or {}
    files = {}
    for p in _files(root):
        rel, size = p.relative_to(root).as_posix(), p.stat().st_size
        files[rel] = {"size": size, "sha256": known[rel][1] if known.get(rel, (None,))[0] == size else sha256(p)}
    manifest = {"format": FORMAT, "version": VERSION, "neoxconv": __version__, "files": files}
    (root / NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def find_manifest(path: Path) -> Path | None:
    """The manifest that covers `path`: in it, or, for a NeoX tag dir, in the save dir above."""
    path = Path(path)
    if (path / NAME).is_file():
        return path / NAME
    if (path.parent / "latest").is_file() and (path.parent / NAME).is_file():
        return path.parent / NAME
    return None


def read_manifest(file: Path) -> dict:
    """The manifest's content; a damaged manifest is damage (neoxconv wrote it)."""
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DamagedInput(f"{file}: unreadable manifest ({e})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(files, dict) \
            or not all(isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
                       for v in files.values()):
        raise DamagedInput(f"{file}: not a {FORMAT} file (expected format, version and files with size and sha256)")
    if data.get("version") != VERSION:
        raise DamagedInput(f"{file}: manifest version {data.get('version')!r} is not {VERSION}")
    return data


def check_manifest(file: Path, progress: Progress | None = None) -> tuple[dict, list[dict], list[str]]:
    """(manifest, problems, unlisted files). Each problem: {"file", "problem"}; every listed file
    is checked (missing, size, sha256), not just the first bad one. ``progress(done, total)``:
    bytes hashed of the listed bytes."""
    file = Path(file)
    root = file.parent
    manifest = read_manifest(file)
    problems: list[dict] = []
    on_bytes = counter(sum(int(e.get("size") or 0) for e in manifest["files"].values()), progress)

    for rel, want in sorted(manifest["files"].items()):
        p = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            problems.append({"file": rel, "problem": "manifest entry outside the checkpoint"})
        elif not p.is_file():
            problems.append({"file": str(p), "problem": "missing (listed in the manifest)"})
        elif p.stat().st_size != want["size"]:
            problems.append({"file": str(p), "problem": f"size {p.stat().st_size} bytes, the manifest says "
                                                        f"{want['size']} (truncated or extended)"})
        elif (digest := sha256(p, on_bytes)) != want["sha256"]:
            problems.append({"file": str(p), "problem": f"sha256 {digest[:16]}... differs from the manifest's "
                                                        f"{want['sha256'][:16]}... (contents changed)"})
    unlisted = [p.relative_to(root).as_posix() for p in _files(root)
                if p.relative_to(root).as_posix() not in manifest["files"]]
    return manifest, problems, unlisted
