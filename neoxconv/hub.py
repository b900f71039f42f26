"""The Hugging Face Hub client shared by ``neoxconv upload``, ``neox-to-hf --push-to-hub`` and
``neoxconv export-run``. Built on ``huggingface_hub``'s public API only (no hand-written HTTP).

Unlike NeoX's ``tools/ckpts/upload.py`` (spec §6.8) it:

* validates the directory first (``neoxconv.export_check``) and refuses a broken export;
* reports a bad token, a missing permission or a network failure as one-line errors instead of
  swallowing them ("already exists");
* uploads the whole folder, subdirectories included, as ONE commit (``HfApi.upload_folder``)
  instead of one commit per top-level file;
* creates the target branch when missing (one branch per training step, e.g. ``step143000`` as
  Pythia does), and offers a dry run that lists what would be sent without any network call.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import neoxconv
from neoxconv.errors import NeoxconvError
from neoxconv.export_check import list_upload_files, one_line, validate_export_dir

# Above this many bytes a folder is sent with HfApi.upload_large_folder when the installed
# huggingface_hub has it (0.25 .. 1.x: resumable, several commits). huggingface_hub 2.x drops
# it: there upload_folder with hf_xet is itself the resumable pipeline (see HubClient.push).
DEFAULT_LARGE_FOLDER_THRESHOLD = 20 * 1024**3


def _network_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for mod, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)), ("requests", ("ConnectionError", "Timeout"))):
        try:
            m = __import__(mod)
        except ImportError:
            continue
        errs += [getattr(m, n) for n in names if isinstance(getattr(m, n, None), type)]
    return tuple(errs)


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
    return msg or getattr(e, "server_message", None) or one_line(e)


def _status(e) -> int | None:
    return getattr(getattr(e, "response", None), "status_code", None)


@contextmanager
def hub_errors(step: str, repo_id: str, endpoint: str, revision: str | None = None):
    """Turn huggingface_hub / network exceptions into one-line NeoxconvErrors ("cannot <step>")."""
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
        status = _status(e)
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
        raise NeoxconvError(f"{endpoint}: cannot {step}: network error ({type(e).__name__}: {one_line(e)})") from None
    except (ValueError, RuntimeError, OSError) as e:
        detail = one_line(e)
        if e.__cause__ is not None:
            detail += f" ({one_line(e.__cause__)})"
        raise NeoxconvError(f"{repo_id}: cannot {step}: {detail}") from None


def hub_endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        raise NeoxconvError(f"{repo_id}: invalid repository id ({one_line(e)})") from None


@dataclass
class Pushed:
    method: str  # "upload_folder" or "upload_large_folder"
    commit_oid: str | None
    commit_url: str | None
    pr_url: str | None = None


@dataclass
class HubClient:
    """One repository on one Hub, with a checked token. Every call raises one-line errors."""

    api: Any  # huggingface_hub.HfApi
    repo_id: str
    endpoint: str

    @classmethod
    def connect(cls, repo_id: str, token: str | None = None, endpoint: str | None = None,
                require_token: bool = True) -> HubClient:
        """Token: ``token``, else ``huggingface_hub.get_token()`` (HF_TOKEN, then the stored
        ``hf auth login``). It is checked with ``whoami``; a bare repo name gets its owner's
        namespace. ``require_token=False`` allows anonymous read-only use (namespace required)."""
        from huggingface_hub import HfApi, get_token

        check_repo_id(repo_id)
        url = hub_endpoint(endpoint)
        tok = token or get_token()
        if not tok and (require_token or "/" not in repo_id):
            raise NeoxconvError(f"{repo_id}: no Hugging Face token (pass --token, set HF_TOKEN, or run `hf auth login`)")
        api = HfApi(endpoint=url, token=tok or False, library_name="neoxconv", library_version=neoxconv.__version__)
        if tok:
            with hub_errors("check the token", repo_id, url):
                user = api.whoami()
            if "/" not in repo_id:
                repo_id = f"{user['name']}/{repo_id}"
        return cls(api, repo_id, url)

    @contextmanager
    def errors(self, step: str, revision: str | None = None):
        with hub_errors(step, self.repo_id, self.endpoint, revision):
            yield

    def ensure_repo(self, private: bool = False) -> None:
        """Create the repository if missing; with ``private`` a new one is private and an existing
        *public* one is refused rather than silently published to."""
        with self.errors("create the repository"):
            self.api.create_repo(self.repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        if private:
            with self.errors("read the repository settings"):
                info = self.api.repo_info(self.repo_id, repo_type="model")
            if not getattr(info, "private", False):
                raise NeoxconvError(
                    f"{self.repo_id}: repository already exists and is public; refusing to upload with --private "
                    "(make it private on the Hub first, or drop --private)"
                )

    def ensure_branch(self, branch: str) -> bool:
        """Create ``branch`` from main when missing; True when it was created."""
        if branch == "main" or branch.startswith("refs/"):
            return False
        from huggingface_hub.utils import HfHubHTTPError

        with self.errors(f"create branch {branch}", branch):
            try:
                self.api.create_branch(self.repo_id, branch=branch, repo_type="model", exist_ok=False)
                return True
            except HfHubHTTPError as e:
                if _status(e) != 409:
                    raise
        return False

    def branches(self) -> dict[str, str] | None:
        """Branch name -> head commit, or None when the repository does not exist (or is not
        visible with this token)."""
        from huggingface_hub.utils import RepositoryNotFoundError

        with self.errors("list the branches"):
            try:
                refs = self.api.list_repo_refs(self.repo_id, repo_type="model")
            except RepositoryNotFoundError:
                return None
        return {b.name: b.target_commit for b in refs.branches}

    def head_message(self, branch: str) -> str:
        """Title and description of the newest commit on ``branch``."""
        with self.errors(f"read the commits of {branch}", branch):
            commits = self.api.list_repo_commits(self.repo_id, repo_type="model", revision=branch)
        if not commits:
            return ""
        return f"{commits[0].title}\n{commits[0].message or ''}"

    def push(self, directory: Path, branch: str, message: str, description: str = "", *, create_pr: bool = False,
             replace: bool = False, last: str | None = None,
             large_folder_threshold: int = DEFAULT_LARGE_FOLDER_THRESHOLD) -> Pushed:
        """Send ``directory`` to ``branch`` (which must exist) and return the final commit.

        * default: one ``upload_folder`` commit (files identical on the Hub are not re-sent);
        * ``last="README.md"``: every other file is sent first (``upload_folder``, which with
          hf_xet may commit a big folder in several parts), then ``last`` alone in the commit that
          carries ``message``: a branch whose head is that commit holds the complete folder,
          whatever interrupted an earlier try;
        * ``replace``: files on the branch that ``directory`` lacks are deleted, in that last commit;
        * above ``large_folder_threshold`` bytes, ``HfApi.upload_large_folder`` (resumable) is used
          where the installed huggingface_hub has it; it sets no commit message, so ``last``
          defaults to README.md there.
        """
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

        directory = Path(directory).resolve()
        files = list_upload_files(directory)
        large = (sum(size for _, size in files) > large_folder_threshold and not create_pr
                 and hasattr(HfApi, "upload_large_folder"))
        if large and last is None and (directory / "README.md").is_file():
            last = "README.md"
        if last is not None and not (directory / last).is_file():
            last = None
        if not (large or last or replace):
            with self.errors("upload the folder", branch):
                commit = self.api.upload_folder(
                    repo_id=self.repo_id, folder_path=str(directory), repo_type="model",
                    revision=None if create_pr else branch, commit_message=message,
                    commit_description=description or None, create_pr=create_pr,
                )
            return Pushed("upload_folder", getattr(commit, "oid", None),
                          getattr(commit, "commit_url", None) or str(commit), getattr(commit, "pr_url", None))
        with self.errors("upload the folder", branch):
            if large:
                self.api.upload_large_folder(repo_id=self.repo_id, folder_path=str(directory), repo_type="model",
                                             revision=branch, ignore_patterns=[last] if last else None)
            else:
                self.api.upload_folder(repo_id=self.repo_id, folder_path=str(directory), repo_type="model",
                                       revision=branch, commit_message=f"{message} (files)",
                                       ignore_patterns=[last] if last else None)
            ops: list = []
            if replace:
                local = {name for name, _ in files}
                remote = self.api.list_repo_files(self.repo_id, repo_type="model", revision=branch)
                ops += [CommitOperationDelete(p) for p in remote if p not in local and p != ".gitattributes"]
            if last:
                ops.append(CommitOperationAdd(path_in_repo=last, path_or_fileobj=str(directory / last)))
            if ops:
                commit = self.api.create_commit(self.repo_id, ops, commit_message=message,
                                                commit_description=description or None, repo_type="model",
                                                revision=branch)
                return Pushed("upload_large_folder" if large else "upload_folder", commit.oid, commit.commit_url)
            sha = self.api.repo_info(self.repo_id, repo_type="model", revision=branch).sha
        return Pushed("upload_large_folder" if large else "upload_folder", sha, f"{self.endpoint}/{self.repo_id}/commit/{sha}")


# --------------------------------------------------------------------------- neoxconv upload


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
    model_card: str = "foreign"  # what name_model_card did: named / unchanged / edited / foreign
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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
    * a README.md that is neoxconv's untouched model card is first retitled with the repo id
      (and branch), so that the card names the published model and ``dir`` matches the Hub;
    * ``dry_run`` validates and lists the files; no network request at all, nothing changed.
    * folders larger than ``large_folder_threshold`` bytes: see :meth:`HubClient.push`.
    * ``on_step`` is called with a short description before each network step (for progress).
    """
    from huggingface_hub import HfApi

    from neoxconv.modelcard import name_model_card

    step = on_step or (lambda _msg: None)
    check_repo_id(repo_id)
    branch = revision or "main"
    if create_pr and branch != "main":
        raise NeoxconvError(
            f"{repo_id}: --create-pr opens a pull request against main; it cannot be combined with --revision {branch}"
        )
    check = validate_export_dir(dir)  # before anything else: a broken export is refused even for a dry run
    client, card = None, "foreign"
    if not dry_run:
        step(f"checking the token with {hub_endpoint(endpoint)}")
        client = HubClient.connect(repo_id, token, endpoint)
        repo_id = client.repo_id
        card = name_model_card(dir, repo_id, repo_id, None if branch == "main" else branch)
        if card == "named":
            check.files = list_upload_files(dir)
            check.total_bytes = sum(size for _, size in check.files)
    large = check.total_bytes > large_folder_threshold and not create_pr and hasattr(HfApi, "upload_large_folder")
    result = UploadResult(
        repo_id=repo_id, revision=branch, files=check.files, total_bytes=check.total_bytes, dry_run=dry_run,
        method="upload_large_folder" if large else "upload_folder", endpoint=hub_endpoint(endpoint),
        private=bool(private), create_pr=bool(create_pr), model_card=card, warnings=list(check.warnings),
    )
    if client is None:
        return result

    step(f"creating {repo_id} if missing")
    client.ensure_repo(private)
    if branch != "main":
        step(f"creating branch {branch} if missing")
        result.created_branch = client.ensure_branch(branch)
    step(
        f"uploading {len(check.files)} files ({human_size(check.total_bytes)}) to {repo_id}@{branch}"
        + (" as a pull request" if create_pr else "")
        + (" with upload_large_folder (resumable, several commits)" if large else " in one commit")
    )
    pushed = client.push(check.directory, branch, commit_message or f"Upload {check.directory.name} with neoxconv "
                         f"{neoxconv.__version__}", create_pr=create_pr, large_folder_threshold=large_folder_threshold)
    result.method, result.commit_oid, result.commit_url, result.pr_url = (
        pushed.method, pushed.commit_oid, pushed.commit_url, pushed.pr_url)
    return result


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def upload_command(dir: str | os.PathLike, repo_id: str, console=None, **options) -> UploadResult:
    """What ``neoxconv upload`` runs: validate, upload (or list for --dry-run), print a summary.

    Errors are raised as NeoxconvError (the CLI prints them as one line, exit code 2).
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print(f"Checking {dir} ...")
    result = upload(dir, repo_id, on_step=lambda msg: console.print(f"[dim]-[/dim] {msg}"), **options)
    dry_run, create_pr, private = result.dry_run, result.create_pr, result.private

    console.print(
        f"{'Would upload' if dry_run else 'Uploaded'} {len(result.files)} files ({human_size(result.total_bytes)}) "
        f"to {result.repo_id}@{result.revision}"
    )
    table = Table()
    table.add_column("file")
    table.add_column("size", justify="right")
    for name, size in result.files:
        table.add_row(name, human_size(size))
    table.add_row(f"[bold]{len(result.files)} files[/bold]", f"[bold]{human_size(result.total_bytes)}[/bold]")
    console.print(table)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    if result.model_card == "named":
        console.print(f"Model card titled [bold]{result.repo_id}[/bold] (README.md in {dir} updated to match).")
    elif result.model_card == "edited":
        console.print("[yellow]warning:[/yellow] README.md was edited by hand; its title was left as is")
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
