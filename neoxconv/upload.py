"""Publish an exported Hugging Face directory to the Hub.

Built on ``huggingface_hub`` only (no hand-written HTTP). Unlike NeoX's ``tools/ckpts/upload.py``
(spec §6.8) it:

* validates the directory first (config loads, every indexed shard is present, every
  safetensors file is complete) and refuses to publish a broken export;
* reports a bad token, a missing permission or a network failure as one-line errors instead of
  swallowing them ("already exists");
* uploads the whole folder, subdirectories included, as ONE commit (``HfApi.upload_folder``)
  instead of one commit per top-level file;
* creates the target branch when missing (one branch per training step, e.g. ``step143000`` as
  Pythia does), and offers a dry run that lists what would be sent without any network call.
"""

from __future__ import annotations

import json
import math
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import neoxconv
from neoxconv.errors import NeoxconvError

# Above this many bytes the folder is sent with HfApi.upload_large_folder when the installed
# huggingface_hub has it (resumable, several commits). huggingface_hub >= 1.x with hf_xet makes
# upload_folder itself resumable and drops upload_large_folder; see upload().
DEFAULT_LARGE_FOLDER_THRESHOLD = 20 * 1024**3

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

# Bytes per element of the safetensors dtypes (sub-byte float formats are not size-checked).
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
_MAX_HEADER = 100 * 1024 * 1024


# --------------------------------------------------------------------------- validation


@dataclass
class ExportCheck:
    """What :func:`validate_export_dir` found in a valid export directory."""

    directory: Path
    files: list[tuple[str, int]]  # (path relative to the directory, size in bytes), upload order
    weight_files: list[str]
    total_bytes: int
    warnings: list[str] = field(default_factory=list)


def list_upload_files(directory: str | os.PathLike) -> list[tuple[str, int]]:
    """Files ``upload_folder`` would send (same ignore rules: ``.git/``, ``.cache/huggingface/``)."""
    from huggingface_hub.utils import filter_repo_objects

    try:
        from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS
    except ImportError:  # pragma: no cover - very old huggingface_hub
        DEFAULT_IGNORE_PATTERNS = [".git", ".git/*", "*/.git", "**/.git/**"]
    root = Path(directory).expanduser().resolve()
    rel = {p.relative_to(root).as_posix(): p for p in sorted(root.glob("**/*")) if p.is_file()}
    kept = filter_repo_objects(rel.keys(), ignore_patterns=list(DEFAULT_IGNORE_PATTERNS))
    return [(r, rel[r].stat().st_size) for r in kept]


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
            problems.append(f"config.json does not load with transformers ({_one_line(e)})")

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


# --------------------------------------------------------------------------- upload


@dataclass
class UploadResult:
    repo_id: str
    revision: str
    files: list[tuple[str, int]]
    total_bytes: int
    dry_run: bool
    method: str  # "upload_folder", "upload_large_folder", or "none" for a dry run
    endpoint: str
    private: bool
    create_pr: bool
    commit_url: str | None = None
    commit_oid: str | None = None
    pr_url: str | None = None
    created_branch: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _network_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for mod, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)), ("requests", ("ConnectionError", "Timeout"))):
        try:
            m = __import__(mod)
        except ImportError:
            continue
        errs += [getattr(m, n) for n in names if isinstance(getattr(m, n, None), type)]
    return tuple(errs)


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _server_message(e) -> str:
    """The Hub's own error message from an HfHubHTTPError, if any."""
    response = getattr(e, "response", None)
    msg = None
    if response is not None:
        msg = response.headers.get("X-Error-Message")
        if not msg:
            try:
                msg = response.json().get("error")
            except Exception:
                msg = None
    return msg or getattr(e, "server_message", None) or _one_line(e)


@contextmanager
def _hub_errors(step: str, repo_id: str, endpoint: str, revision: str | None = None):
    from huggingface_hub.utils import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    try:
        yield
    except NeoxconvError:
        raise
    except OfflineModeIsEnabled:
        raise NeoxconvError(f"{repo_id}: cannot {step}: HF_HUB_OFFLINE is set (unset it to upload)") from None
    except RevisionNotFoundError:
        raise NeoxconvError(f"{repo_id}: cannot {step}: revision {revision!r} not found") from None
    except RepositoryNotFoundError:
        raise NeoxconvError(f"{repo_id}: cannot {step}: repository not found or not accessible with this token") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise NeoxconvError(
                f"{endpoint}: cannot {step}: the Hugging Face token was rejected (401 Unauthorized); "
                "check --token, HF_TOKEN or `hf auth login`"
            ) from None
        if status == 403:
            raise NeoxconvError(
                f"{repo_id}: cannot {step}: no write permission with this token (403 Forbidden: {_server_message(e)})"
            ) from None
        raise NeoxconvError(f"{repo_id}: cannot {step}: Hub answered {status} ({_server_message(e)})") from None
    except _network_errors() as e:
        raise NeoxconvError(f"{endpoint}: cannot {step}: network error ({type(e).__name__}: {_one_line(e)})") from None
    except (ValueError, RuntimeError, OSError) as e:
        detail = _one_line(e)
        if e.__cause__ is not None:
            detail += f" ({_one_line(e.__cause__)})"
        raise NeoxconvError(f"{repo_id}: cannot {step}: {detail}") from None


def resolve_token(token: str | None) -> str | None:
    """The token to use: the argument, else HF_TOKEN, else huggingface_hub's stored login."""
    if token:
        return token
    env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if env:
        return env.strip()
    from huggingface_hub import get_token

    return get_token()


def upload(
    dir: str | os.PathLike,
    repo_id: str,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    dry_run: bool = False,
    large_folder_threshold: int = DEFAULT_LARGE_FOLDER_THRESHOLD,
    on_step: Callable[[str], None] | None = None,
) -> UploadResult:
    """Validate ``dir`` and upload it to ``repo_id`` (branch ``revision``) in one commit.

    * token: ``token``, else ``HF_TOKEN``, else the stored ``hf auth login`` token;
    * the repo is created when missing (private if ``private``; an existing *public* repo with
      ``private=True`` is refused rather than silently published);
    * ``revision`` (default ``main``) is created from ``main`` when missing;
    * ``create_pr`` opens a pull request against ``main`` instead of pushing (not combinable
      with a ``revision`` other than ``main``);
    * ``dry_run`` validates and lists the files; no network request at all.
    * folders larger than ``large_folder_threshold`` bytes use ``HfApi.upload_large_folder``
      (resumable, several commits) when the installed huggingface_hub provides it; otherwise
      ``upload_folder`` is used, which with ``hf_xet`` installed is resumable by re-running.
    * ``on_step`` is called with a short description before each network step (for progress).
    """
    step = on_step or (lambda _msg: None)
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        raise NeoxconvError(f"{repo_id}: invalid repository id ({_one_line(e)})") from None
    branch = revision or "main"
    if create_pr and branch != "main":
        raise NeoxconvError(
            f"{repo_id}: --create-pr opens a pull request against main; it cannot be combined with --revision {branch}"
        )
    check = validate_export_dir(dir)
    from huggingface_hub import constants

    endpoint_url = (endpoint or constants.ENDPOINT).rstrip("/")
    large = check.total_bytes > large_folder_threshold
    result = UploadResult(
        repo_id=repo_id,
        revision=branch,
        files=check.files,
        total_bytes=check.total_bytes,
        dry_run=dry_run,
        method="none",
        endpoint=endpoint_url,
        private=bool(private),
        create_pr=bool(create_pr),
        warnings=list(check.warnings),
    )
    from huggingface_hub import HfApi

    use_large = large and not create_pr and hasattr(HfApi, "upload_large_folder")
    if dry_run:
        result.method = "upload_large_folder" if use_large else "upload_folder"
        return result

    tok = resolve_token(token)
    if not tok:
        raise NeoxconvError(
            f"{repo_id}: no Hugging Face token (pass --token, set HF_TOKEN, or run `hf auth login`)"
        )
    api = HfApi(endpoint=endpoint_url, token=tok, library_name="neoxconv", library_version=neoxconv.__version__)

    step(f"checking the token with {endpoint_url}")
    with _hub_errors("check the token", repo_id, endpoint_url):
        user = api.whoami()
    if "/" not in repo_id:
        repo_id = f"{user['name']}/{repo_id}"
        result.repo_id = repo_id

    step(f"creating {repo_id} if missing")
    with _hub_errors("create the repository", repo_id, endpoint_url):
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
    if private:
        with _hub_errors("read the repository settings", repo_id, endpoint_url):
            info = api.repo_info(repo_id, repo_type="model")
        if not getattr(info, "private", False):
            raise NeoxconvError(
                f"{repo_id}: repository already exists and is public; refusing to upload with --private "
                "(make it private on the Hub first, or drop --private)"
            )

    if branch != "main" and not branch.startswith("refs/"):
        from huggingface_hub.utils import HfHubHTTPError

        step(f"creating branch {branch} if missing")
        with _hub_errors(f"create branch {branch}", repo_id, endpoint_url, branch):
            try:
                api.create_branch(repo_id, branch=branch, repo_type="model", exist_ok=False)
                result.created_branch = True
            except HfHubHTTPError as e:
                if getattr(getattr(e, "response", None), "status_code", None) != 409:
                    raise

    message = commit_message or f"Upload {check.directory.name} with neoxconv {neoxconv.__version__}"
    step(
        f"uploading {len(check.files)} files ({_human(check.total_bytes)}) to {repo_id}@{branch}"
        + (" as a pull request" if create_pr else "")
        + (" with upload_large_folder (resumable, several commits)" if use_large else " in one commit")
    )
    with _hub_errors("upload the folder", repo_id, endpoint_url, branch):
        if use_large:
            result.method = "upload_large_folder"
            api.upload_large_folder(
                repo_id=repo_id,
                folder_path=str(check.directory),
                repo_type="model",
                revision=branch,
                private=True if private else None,
            )
            info = api.repo_info(repo_id, repo_type="model", revision=branch)
            result.commit_oid = info.sha
            result.commit_url = f"{endpoint_url}/{repo_id}/commit/{info.sha}"
        else:
            result.method = "upload_folder"
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=str(check.directory),
                repo_type="model",
                revision=None if create_pr else branch,
                commit_message=message,
                create_pr=create_pr,
            )
            result.commit_url = getattr(commit, "commit_url", None) or str(commit)
            result.commit_oid = getattr(commit, "oid", None)
            result.pr_url = getattr(commit, "pr_url", None)
    return result


# --------------------------------------------------------------------------- CLI glue


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def upload_command(
    dir: str | os.PathLike,
    repo_id: str,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    dry_run: bool = False,
    console=None,
) -> UploadResult:
    """What ``neoxconv upload`` runs: validate, upload (or list for --dry-run), print a summary.

    Errors are raised as NeoxconvError (the CLI prints them as one line, exit code 2).
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print(f"Checking {dir} ...")
    result = upload(
        dir, repo_id, revision, private, commit_message, create_pr, token, endpoint, dry_run=dry_run,
        on_step=lambda msg: console.print(f"[dim]-[/dim] {msg}"),
    )

    console.print(
        f"{'Would upload' if dry_run else 'Uploaded'} {len(result.files)} files ({_human(result.total_bytes)}) "
        f"to {result.repo_id}@{result.revision}"
    )
    table = Table()
    table.add_column("file")
    table.add_column("size", justify="right")
    for name, size in result.files:
        table.add_row(name, _human(size))
    table.add_row(f"[bold]{len(result.files)} files[/bold]", f"[bold]{_human(result.total_bytes)}[/bold]")
    console.print(table)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    if dry_run:
        console.print(
            f"Dry run: nothing was sent. A real run would use {result.method} "
            f"({'pull request' if create_pr else 'push'}, {'private' if private else 'default visibility'})."
        )
    else:
        if result.created_branch:
            console.print(f"Created branch [bold]{result.revision}[/bold].")
        console.print(f"Commit: {result.commit_url}")
        if result.pr_url:
            console.print(f"Pull request: {result.pr_url}")
    return result
