"""Is an exported Hugging Face directory complete enough to publish? (no network)

:func:`validate_export_dir` checks what a broken copy or an interrupted export leaves behind:
``config.json`` must load, every weights shard named by an index must be there and hold the
tensors the index assigns to it, and every safetensors file must be exactly as long as its
header says. Uploading (``neoxconv.hub``) refuses a directory that fails these checks.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from neoxconv.errors import NeoxconvError

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

# Bytes per element of the safetensors dtypes (sub-byte float formats are not size-checked).
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class ExportCheck:
    """What :func:`validate_export_dir` found in a valid export directory."""

    directory: Path
    files: list[tuple[str, int]]  # (path relative to the directory, size in bytes), upload order
    weight_files: list[str]
    total_bytes: int
    warnings: list[str] = field(default_factory=list)


# What HfApi.upload_folder never sends, as its documentation says: any `.git/` folder, and the
# `.cache/huggingface/` metadata that downloads into a local folder leave behind.
NEVER_UPLOADED = ((".git",), (".cache", "huggingface"))


def list_upload_files(directory: str | os.PathLike) -> list[tuple[str, int]]:
    """Files ``upload_folder`` would send (path relative to ``directory``, size), in path order."""
    root = Path(directory).expanduser().resolve()
    out = []
    for p in sorted(root.glob("**/*")):
        parts = p.relative_to(root).parts
        skipped = any(parts[i:i + len(rule)] == rule for rule in NEVER_UPLOADED for i in range(len(parts)))
        if p.is_file() and not skipped:
            out.append((p.relative_to(root).as_posix(), p.stat().st_size))
    return out


def _safetensors_problem(path: Path) -> tuple[str | None, set[str]]:
    """(problem or None, tensor names) for one safetensors file."""
    size = path.stat().st_size
    if size < 8:
        return f"{path.name}: truncated ({size} bytes, no safetensors header)", set()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > _MAX_HEADER:
            return f"{path.name}: header length {n} does not fit in a {size}-byte file (truncated?)", set()
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return f"{path.name}: safetensors header is not valid JSON", set()
    if not isinstance(header, dict):
        return f"{path.name}: safetensors header is not a JSON object", set()
    data_end = 0
    names = set()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        names.add(name)
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            return f"{path.name}: malformed header entry for tensor {name!r}", names
        if begin > end:
            return f"{path.name}: tensor {name!r} has negative extent", names
        if dtype in _ITEMSIZE and end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            return f"{path.name}: tensor {name!r} ({dtype} {shape}) occupies {end - begin} bytes", names
        data_end = max(data_end, end)
    have = size - 8 - n
    if have != data_end:
        return f"{path.name}: data section is {have} bytes but the header describes {data_end} (incomplete copy?)", names
    return None, names


def validate_export_dir(directory: str | os.PathLike) -> ExportCheck:
    """Check that ``directory`` is a complete Hugging Face export; NeoxconvError lists the problems.

    Checks: ``config.json`` loads with ``transformers.AutoConfig``; at least one weights file;
    every file named in ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json`` is
    present (and, for safetensors, holds the tensors the index assigns to it); every
    ``.safetensors`` header is readable and its data size matches the file size.
    """
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise NeoxconvError(f"{d}: not a directory")
    problems: list[str] = []
    warnings: list[str] = []

    if not (d / "config.json").is_file():
        problems.append("config.json is missing")
    else:
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(str(d), local_files_only=True)
        except Exception as e:
            problems.append(f"config.json does not load with transformers ({one_line(e)})")

    files = list_upload_files(d)
    names = {name for name, _ in files}
    top = [name for name in names if "/" not in name]
    weight_files = sorted(
        n for n in top if n.endswith(".safetensors") or (n.startswith("pytorch_model") and n.endswith(".bin"))
    )
    if not weight_files:
        problems.append("no weights file (*.safetensors or pytorch_model*.bin)")

    tensors_in: dict[str, set[str]] = {}
    for wf in weight_files:
        if wf.endswith(".safetensors"):
            problem, tensor_names = _safetensors_problem(d / wf)
            tensors_in[wf] = tensor_names
            if problem:
                problems.append(problem)

    for index_name in WEIGHT_INDEXES:
        index_path = d / index_name
        if not index_path.is_file():
            continue
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            problems.append(f"{index_name}: unreadable or has no weight_map")
            continue
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if s not in names]
        if missing:
            problems.append(f"{index_name} names missing file(s): {', '.join(missing)}")
        for shard in shards:
            if shard in tensors_in and shard not in missing:
                absent = sorted(t for t, s in weight_map.items() if s == shard and t not in tensors_in[shard])
                if absent:
                    more = f" (+{len(absent) - 3} more)" if len(absent) > 3 else ""
                    problems.append(f"{shard} lacks tensor(s) listed in {index_name}: {', '.join(absent[:3])}{more}")
        ext = ".safetensors" if index_name.startswith("model.safetensors") else ".bin"
        stray = [w for w in weight_files if w.endswith(ext) and w not in shards]
        if stray:
            warnings.append(f"{', '.join(stray)} not referenced by {index_name}")

    if not any(t in names for t in TOKENIZER_FILES):
        warnings.append("no tokenizer files: users will need a tokenizer from elsewhere")
    if "README.md" not in names:
        warnings.append("no README.md model card")

    if problems:
        raise NeoxconvError(f"{d}: not ready to upload: " + "; ".join(problems))
    return ExportCheck(
        directory=d.resolve(),
        files=files,
        weight_files=weight_files,
        total_bytes=sum(s for _, s in files),
        warnings=warnings,
    )


def one_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
