"""The checkpoints of a GPT-NeoX training run, as ``neoxconv export-run`` sees them: which steps
exist (``global_stepN`` directories of the save dir), which ones ``--steps`` asks for, the
fingerprint of a step's source files, and the tokens a step has seen.

Fingerprint: name, size and SHA-256 of every file the conversion reads (model files, the
configs, neoxconv.json, the tokenizer the config points at; never optimizer states), and the
SHA-256 of that list. Hashing a 20B step reads ~40 GB, so each file's SHA-256 is cached by
(absolute path, size, mtime_ns) in ``$XDG_CACHE_HOME/neoxconv/sha256-cache.json`` (default
``~/.cache``): a rerun rehashes only files that were rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from neoxconv.errors import NeoxconvError
from neoxconv.manifest import sha256
from neoxconv.progress import Progress, counter

STEP_DIR = re.compile(r"^global_step(\d+)$")


def discover_steps(run_dir: Path) -> dict[int, Path]:
    """Step number -> ``global_stepN`` directory, for every such directory in ``run_dir``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NeoxconvError(f"{run_dir}: not a directory (expected a NeoX save dir with global_stepN directories)")
    steps = {int(m[1]): p for p in run_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))}
    if not steps:
        raise NeoxconvError(f"{run_dir}: no global_stepN directories (expected a NeoX save dir)")
    return dict(sorted(steps.items()))


def format_steps(steps) -> str:
    """Steps in --steps syntax, arithmetic runs of 3 or more as START:STOP:STRIDE."""
    s = sorted(steps)
    out, i = [], 0
    while i < len(s):
        j = i + 1
        if j < len(s):
            d = s[j] - s[i]
            while j + 1 < len(s) and s[j + 1] - s[j] == d:
                j += 1
            if j - i >= 2:
                out.append(f"{s[i]}:{s[j] + d}:{d}")
                i = j + 1
                continue
        out.append(str(s[i]))
        i += 1
    return ",".join(out)


def select_steps(available: dict[int, Path], spec: str, where: object) -> list[int]:
    """Steps chosen by ``spec``: ``all``, or comma-separated items, each a step or a range
    ``START:STOP:STRIDE`` (Python's ``range``, STOP exclusive; an empty START is the first
    step of the run, an empty STOP is just after the last). Every chosen step must exist."""
    spec = str(spec).strip()
    if spec.lower() in ("", "all"):
        return sorted(available)
    wanted: set[int] = set()
    for item in (x.strip() for x in spec.split(",")):
        try:
            if ":" not in item:
                wanted.add(int(item))
                continue
            start, stop, stride = item.split(":")
            lo = int(start) if start.strip() else min(available)
            hi = int(stop) if stop.strip() else max(available) + 1
            chosen = range(lo, hi, int(stride))
        except ValueError:
            raise NeoxconvError(f"cannot read --steps item {item!r} (use all, a list like 1000,2000, or "
                                "START:STOP:STRIDE like 0:144000:1000)") from None
        if int(stride) <= 0 or not chosen:
            raise NeoxconvError(f"--steps {item!r} selects no step (STOP is exclusive, STRIDE must be positive)")
        wanted.update(chosen)
    missing = sorted(wanted - set(available))
    if missing:
        raise NeoxconvError(f"{where}: step(s) {format_steps(missing)} not found; the run has steps "
                            f"{format_steps(available)}")
    return sorted(wanted)


def step_args(step_dir: Path) -> dict:
    """The merged NeoX config of a step (underscore keys), {} without configs."""
    from neoxconv.formats.neox_args import find_config_files, read_configs

    files = find_config_files(Path(step_dir))
    return read_configs(files)[0] if files else {}


def source_files(step_dir: Path) -> dict[str, Path]:
    """What the conversion of ``step_dir`` reads, by a name stable across machines: files of the
    step by their path inside it, the configs relative to it, the tokenizer as ``tokenizer:NAME``."""
    from neoxconv.formats.neox_args import find_config_files
    from neoxconv.formats.neox_files import LAYER_FILE, MP_FILE, SIDECAR
    from neoxconv.tokenizer import find_neox_tokenizer

    step_dir = Path(step_dir)
    files = {p.name: p for p in step_dir.iterdir()
             if p.is_file() and (LAYER_FILE.match(p.name) or MP_FILE.match(p.name) or p.name == SIDECAR)}
    for cfg in find_config_files(step_dir):
        files[Path(os.path.relpath(cfg, step_dir)).as_posix()] = cfg
    tok = find_neox_tokenizer(step_args(step_dir), step_dir)
    if tok is not None:
        files[f"tokenizer:{tok.name}"] = tok
    return dict(sorted(files.items()))


def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "neoxconv" / "sha256-cache.json"


class HashCache:
    """SHA-256 of files, remembered by (absolute path, size, mtime_ns)."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else _cache_path()
        self.entries: dict[str, dict] = self._read()
        self.hashed_bytes = 0  # bytes actually read by this instance

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def sha256(self, path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
        """The file's sha256, from the cache while its size and mtime are unchanged. ``on_bytes(n)``
        counts the bytes dealt with (a cached file's all at once)."""
        path = Path(path).resolve()
        st = path.stat()
        entry = self.entries.get(str(path))
        if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            if on_bytes is not None:
                on_bytes(st.st_size)
            return entry["sha256"]
        digest = sha256(path, on_bytes)
        self.entries[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self.hashed_bytes += st.st_size
        return digest

    def save(self) -> None:
        """Merge into the file on disk (atomically). The cache only saves time: a cache that
        cannot be written is skipped."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._read(), **self.entries}
            fd, tmp = tempfile.mkstemp(prefix=".sha256-cache-", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(merged, f)
            os.replace(tmp, self.path)
        except OSError:
            pass


def fingerprint(step_dir: Path, cache: HashCache, progress: Progress | None = None) -> dict:
    """``{"digest": "sha256:<hex>", "files": {name: {"size", "sha256"}}}`` of a step's sources.
    ``progress(done, total)``: bytes hashed (or found in the cache) of the sources' bytes."""
    sources = source_files(step_dir)
    on_bytes = counter(sum(p.stat().st_size for p in sources.values()), progress)

    files = {name: {"size": p.stat().st_size, "sha256": cache.sha256(p, on_bytes)} for name, p in sources.items()}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {"digest": f"sha256:{digest}", "files": files}


def tokens_seen(args: dict, step: int) -> tuple[int | None, str | None]:
    """Tokens trained on after ``step`` steps, and the rule used, when the config says:
    step × train_batch_size × seq_length, else with train_batch_size =
    train_micro_batch_size_per_gpu × gradient_accumulation_steps (default 1) × data-parallel size,
    the data-parallel size being global_num_gpus / (model_parallel_size × pipe_parallel_size),
    as NeoX derives it. (None, None) when the config lacks what is needed."""
    seq = args.get("seq_length")
    if not seq:
        return None, None
    batch = args.get("train_batch_size")
    if batch:
        return step * int(batch) * int(seq), f"step × train_batch_size {batch} × seq_length {seq}"
    micro, gpus = args.get("train_micro_batch_size_per_gpu"), args.get("global_num_gpus")
    if not (micro and gpus):
        return None, None
    gas = int(args.get("gradient_accumulation_steps") or 1)
    dp = int(gpus) // (max(int(args.get("model_parallel_size") or 1), 1) * max(int(args.get("pipe_parallel_size") or 1), 1))
    batch = int(micro) * gas * dp
    return step * batch * int(seq), (f"step × {batch} sequences (micro batch {micro} × {gas} accumulation × "
                                     f"{dp} data-parallel) × seq_length {seq}")
