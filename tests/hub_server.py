"""A small in-memory Hugging Face Hub for tests.

It speaks enough of the Hub's HTTP API for the real, unmodified ``huggingface_hub`` client and
``transformers.from_pretrained`` (pointed at it with ``endpoint=`` or ``HF_ENDPOINT``) to create
repos and branches, upload a folder in one commit (inline base64 files and Git LFS files through
the LFS batch API), and download files back.

Start it with :class:`FakeHub` (a context manager) or the ``fake_hub`` pytest fixture below. Every
request is recorded in ``hub.requests`` (method, path, query, lower-cased headers, parsed body).

What it serves::

    GET  /api/whoami-v2                              GET  /api/agent-harnesses
    POST /api/repos/create                           POST /api/validate-yaml
    GET  /api/models/{repo}[/revision/{rev}]         GET  /api/models/{repo}/refs
    POST /api/models/{repo}/branch/{branch}          POST /api/models/{repo}/preupload/{rev}
    POST /api/models/{repo}/commit/{rev}             POST /api/models/{repo}/paths-info/{rev}
    GET  /api/models/{repo}/tree/{rev}[/{path}]      GET  /api/models/{repo}/commits/{rev}
    POST /{repo}.git/info/lfs/objects/batch          PUT  /_lfs/upload/{oid}
    POST /_lfs/verify/{oid}                          GET|HEAD /{repo}/resolve/{rev}/{path}

``hub.fail_next(method, pattern, status, skip)`` makes a later matching request fail once.
The state lives in tests/hub_model.py, the endpoints in tests/hub_endpoints.py.

Not served: Xet storage. ``huggingface_hub`` uploads LFS-mode files through Xet when ``hf_xet``
is installed; tests disable that with ``huggingface_hub.constants.HF_HUB_DISABLE_XET = True``
(see the ``hub_client_env`` fixture), or construct the hub with ``regular_only=True`` so that every
file is an inline git blob and no large-file storage is involved at all.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from hub_endpoints import Endpoints
from hub_model import (  # noqa: F401  (ORG, READ_TOKEN, USER, VALID_TOKEN: tests import them from here)
    LFS_PATTERNS, LFS_SIZE_THRESHOLD, ORG, READ_TOKEN, USER, VALID_TOKEN, Commit, HubError, RecordedRequest, Repo,
)


class FakeHub:
    """The server. ``tokens`` maps token -> (user, can_write); ``orgs`` maps user -> org names."""

    def __init__(
        self,
        tokens: dict[str, tuple[str, bool]] | None = None,
        orgs: dict[str, list[str]] | None = None,
        *,
        regular_only: bool = False,
        lfs_patterns=LFS_PATTERNS,
        lfs_threshold: int = LFS_SIZE_THRESHOLD,
    ):
        self.tokens = tokens if tokens is not None else {VALID_TOKEN: (USER, True), READ_TOKEN: (USER, False)}
        self.orgs = orgs if orgs is not None else {USER: [ORG]}
        self.regular_only = regular_only
        self.lfs_patterns = tuple(lfs_patterns)
        self.lfs_threshold = lfs_threshold
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self._lfs_expected: dict[str, int] = {}  # oids announced by a batch call -> size
        self.requests: list[RecordedRequest] = []
        self.faults: list[list] = []  # [method, path pattern, status, matches to let pass]: see fail_next
        self.lock = threading.RLock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ inspection helpers
    def clear_requests(self) -> None:
        with self.lock:
            self.requests.clear()

    def requests_matching(self, method: str | None = None, pattern: str = "") -> list[RecordedRequest]:
        with self.lock:
            return [
                r for r in self.requests if (method is None or r.method == method) and re.search(pattern, r.path)
            ]

    def fail_next(self, method: str, pattern: str, status: int = 500, skip: int = 0) -> None:
        """After ``skip`` matching requests pass, the next ``method`` request whose path matches
        ``pattern`` fails with ``status`` (once): an interrupted upload, a flaky server."""
        with self.lock:
            self.faults.append([method, pattern, status, skip])

    def _take_fault(self, method: str, path: str) -> int | None:
        with self.lock:
            for i, fault in enumerate(self.faults):
                if fault[0] == method and re.search(fault[1], path):
                    if fault[3] > 0:
                        fault[3] -= 1
                        return None
                    del self.faults[i]
                    return fault[2]
        return None

    def head(self, repo_id: str, revision: str = "main") -> Commit:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches[revision]]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return {p: e.data for p, e in self.head(repo_id, revision).files.items()}

    def history(self, repo_id: str, revision: str = "main") -> list[Commit]:
        """Commits reachable from ``revision``, newest first."""
        repo = self.repos[repo_id]
        out, oid = [], repo.branches[revision]
        while oid is not None:
            commit = repo.commits[oid]
            out.append(commit)
            oid = commit.parent
        return out

    # ------------------------------------------------------------------ state helpers
    def _new_commit(self, repo: Repo, parent: str | None, title: str, description: str, files, author: str) -> Commit:
        self._counter += 1
        digest = hashlib.sha1(
            json.dumps([parent, title, sorted((p, e.git_oid) for p, e in files.items()), self._counter]).encode()
        ).hexdigest()
        commit = Commit(digest, parent, title, description, dict(files), author, time.time())
        repo.commits[digest] = commit
        return commit

    def is_lfs_path(self, path: str, size: int) -> bool:
        if self.regular_only:
            return False
        name = path.rsplit("/", 1)[-1]
        return size >= self.lfs_threshold or any(
            fnmatch.fnmatch(name, pat) or fnmatch.fnmatch(path, pat) for pat in self.lfs_patterns
        )

    def gitattributes(self) -> bytes:
        if self.regular_only:
            return b""
        return "".join(f"{pat} filter=lfs diff=lfs merge=lfs -text\n" for pat in self.lfs_patterns).encode()


# ---------------------------------------------------------------------- request handling


class _Handler(Endpoints, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, format, *args):  # keep test output quiet
        pass

    # one entry point for every method
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # -------------------------------------------------------------- plumbing
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline().strip()
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self, method: str):
        hub = self.hub
        split = urlsplit(self.path)
        raw_path = split.path
        query = parse_qs(split.query, keep_blank_values=True)
        raw = self._read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        body = self._parse_body(raw, headers.get("content-type", ""), raw_path)
        rec = RecordedRequest(method, unquote(raw_path), raw_path, query, headers, body)
        with hub.lock:
            hub.requests.append(rec)
        try:
            status = hub._take_fault(method, rec.path)
            if status is not None:
                raise HubError(status, f"injected failure of {method} {rec.path}")
            self._route(method, raw_path, query, raw, rec)
        except HubError as e:
            h = dict(e.headers)
            if e.code:
                h["X-Error-Code"] = e.code
            h["X-Error-Message"] = e.message
            self._json({"error": e.message, **e.body}, e.status, h)
        except Exception as e:  # a bug in the fake hub: make it visible to the client
            self._json({"error": f"fake hub crashed: {type(e).__name__}: {e}"}, 500)

    @staticmethod
    def _parse_body(raw: bytes, ctype: str, path: str):
        if not raw:
            return None
        if path.startswith("/_lfs/upload/"):
            return {"bytes": len(raw)}
        if "ndjson" in ctype:
            return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        if "json" in ctype:
            try:
                return json.loads(raw)
            except ValueError:
                return {"bytes": len(raw)}
        if "x-www-form-urlencoded" in ctype:
            return parse_qs(raw.decode(), keep_blank_values=True)
        return {"bytes": len(raw)}

    # -------------------------------------------------------------- auth
    def _user(self, rec: RecordedRequest, required: bool) -> str | None:
        token = rec.token
        if token is None:
            if required:
                raise HubError(401, "Authorization header is missing")
            return None
        if token not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token][0]

    def _check_write(self, rec: RecordedRequest, namespace: str) -> str:
        user = self._user(rec, required=True)
        _, can_write = self.hub.tokens[rec.token]
        if not can_write:
            raise HubError(403, "You don't have the rights to write with this token (read-only token)")
        if namespace != user and namespace not in self.hub.orgs.get(user, []):
            raise HubError(403, f"You don't have the rights to create or write to repos in '{namespace}'")
        return user

    def _repo(self, repo_id: str, rec: RecordedRequest, write: bool = False) -> Repo:
        repo = self.hub.repos.get(repo_id)
        user = self._user(rec, required=False)
        visible = repo is not None and (
            not repo.private or (user is not None and (repo.owner == user or repo.owner in self.hub.orgs.get(user, [])))
        )
        if not visible:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write:
            self._check_write(rec, repo.owner)
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        oid = repo.branches.get(revision)
        if oid is None and revision in repo.commits:
            oid = revision
        if oid is None and len(revision) >= 7:
            matches = [c for c in repo.commits if c.startswith(revision)]
            oid = matches[0] if len(matches) == 1 else None
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    # -------------------------------------------------------------- routing
    def _route(self, method: str, raw_path: str, query, raw: bytes, rec: RecordedRequest):
        seg = [unquote(s) for s in raw_path.strip("/").split("/")] if raw_path.strip("/") else []
        hub = self.hub
        with hub.lock:
            if seg[:2] == ["api", "whoami-v2"] and method == "GET":
                return self._whoami(rec)
            if seg[:2] == ["api", "agent-harnesses"]:
                return self._json({"harnesses": {}, "standardEnvVars": []})
            if seg[:3] == ["api", "repos", "create"] and method == "POST":
                return self._create_repo(rec)
            if seg[:2] == ["api", "validate-yaml"] and method == "POST":
                return self._validate_yaml(rec)
            if len(seg) >= 4 and seg[:2] == ["api", "models"]:
                repo_id = f"{seg[2]}/{seg[3]}"
                rest = seg[4:]
                if not rest and method == "GET":
                    return self._repo_info(repo_id, "main", rec, query)
                if rest[:1] == ["revision"] and method == "GET":
                    return self._repo_info(repo_id, "/".join(rest[1:]), rec, query)
                if rest[:1] == ["refs"] and method == "GET":
                    return self._refs(repo_id, rec, query)
                if rest[:1] == ["branch"] and method == "POST":
                    return self._create_branch(repo_id, "/".join(rest[1:]), rec)
                if rest[:1] == ["preupload"] and method == "POST":
                    return self._preupload(repo_id, "/".join(rest[1:]), rec, query)
                if rest[:1] == ["commit"] and method == "POST":
                    return self._commit(repo_id, "/".join(rest[1:]), rec, query)
                if rest[:1] == ["paths-info"] and method == "POST":
                    return self._paths_info(repo_id, "/".join(rest[1:]), rec)
                if rest[:1] == ["tree"] and method == "GET" and len(rest) >= 2:
                    return self._tree(repo_id, rest[1], "/".join(rest[2:]), rec, query)
                if rest[:1] == ["commits"] and method == "GET":
                    return self._commits(repo_id, "/".join(rest[1:]) or "main", rec)
                if rest[:1] in (["xet-write-token"], ["xet-read-token"]):
                    raise HubError(501, "Xet storage is not implemented by the neoxconv test hub")
            if seg[:2] == ["_lfs", "upload"] and method == "PUT" and len(seg) == 3:
                return self._lfs_put(seg[2], raw)
            if seg[:2] == ["_lfs", "verify"] and method == "POST" and len(seg) == 3:
                return self._lfs_verify(seg[2], rec)
            if len(seg) >= 5 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
                return self._lfs_batch(f"{seg[0]}/{seg[1][:-4]}", rec)
            if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]), rec)
        raise HubError(404, f"no route for {method} {raw_path}")

    # -------------------------------------------------------------- endpoints


# ---------------------------------------------------------------------- pytest fixtures


@pytest.fixture
def hub_client_env(monkeypatch, tmp_path):
    """Configure the in-process huggingface_hub client for a local hub (restored after the test).

    * HF_HUB_OFFLINE off (the suite may run with it on) so requests to 127.0.0.1 are allowed;
    * Xet disabled, so LFS-mode files go through the LFS batch API the fake hub implements;
    * telemetry off, so building headers does not try to reach huggingface.co;
    * HF_TOKEN unset and an empty HF_HOME-like token path, so no real login is ever used.
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    return constants


@pytest.fixture
def fake_hub(hub_client_env):
    """A started :class:`FakeHub` (stopped after the test)."""
    with FakeHub() as hub:
        yield hub
