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

Not served: Xet storage. ``huggingface_hub`` uploads LFS-mode files through Xet when ``hf_xet``
is installed; tests disable that with ``huggingface_hub.constants.HF_HUB_DISABLE_XET = True``
(see the ``hub_client_env`` fixture), or construct the hub with ``regular_only=True`` so that every
file is an inline git blob and no large-file storage is involved at all.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

VALID_TOKEN = "hf_neoxconv_test_write_token"
READ_TOKEN = "hf_neoxconv_test_read_token"
USER = "tester"
ORG = "neoxconv-org"

# File name patterns stored with Git LFS (the Hub's default .gitattributes covers these and more).
LFS_PATTERNS = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.model",
    "*.npy", "*.npz", "*.pkl", "*.pickle", "*.gz", "*.zip", "*.tar", "*.zst", "*.tflite", "*tfevents*",
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class FileEntry:
    data: bytes
    lfs: bool
    sha256: str

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def git_oid(self) -> str:
        return git_blob_oid(lfs_pointer(self.sha256, self.size) if self.lfs else self.data)


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    files: dict[str, FileEntry]
    author: str
    date: float


@dataclass
class Repo:
    repo_id: str
    private: bool
    owner: str
    branches: dict[str, str] = field(default_factory=dict)  # ref name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    pull_requests: int = 0


@dataclass
class RecordedRequest:
    method: str
    path: str  # URL path, percent-decoded
    raw_path: str  # URL path as sent
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: object  # parsed: dict/list for JSON or NDJSON, dict for forms, {"bytes": n} for uploads

    @property
    def token(self) -> str | None:
        auth = self.headers.get("authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, body=None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.body = body or {}


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


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


class _Handler(BaseHTTPRequestHandler):
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
    def _whoami(self, rec):
        user = self._user(rec, required=True)
        _, can_write = self.hub.tokens[rec.token]
        self._json(
            {
                "type": "user",
                "id": hashlib.md5(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user.title(),
                "orgs": [{"type": "org", "name": o} for o in self.hub.orgs.get(user, [])],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "test", "role": "write" if can_write else "read"},
                },
            }
        )

    def _create_repo(self, rec):
        body = rec.body or {}
        user = self._user(rec, required=True)
        namespace = body.get("organization") or user
        name = body.get("name")
        if not name:
            raise HubError(400, "missing repo name")
        if body.get("type", "model") not in ("model", None):
            raise HubError(400, "the neoxconv test hub only hosts model repos")
        self._check_write(rec, namespace)
        repo_id = f"{namespace}/{name}"
        if repo_id in self.hub.repos:
            # The Hub answers a conflict with the existing repo's URL (huggingface_hub reads it).
            raise HubError(409, "You already created this model repo", body={"url": f"{self.hub.url}/{repo_id}"})
        private = body.get("visibility") == "private" or bool(body.get("private"))
        repo = Repo(repo_id=repo_id, private=private, owner=namespace)
        files = {}
        attrs = self.hub.gitattributes()
        if attrs:
            files[".gitattributes"] = FileEntry(attrs, False, hashlib.sha256(attrs).hexdigest())
        commit = self.hub._new_commit(repo, None, "initial commit", "", files, user)
        repo.branches["main"] = commit.oid
        self.hub.repos[repo_id] = repo
        self._json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id}, 200)

    def _validate_yaml(self, rec):
        import yaml

        content = (rec.body or {}).get("content", "")
        errors = []
        if content.startswith("---"):
            parts = content.split("---", 2)
            if len(parts) < 3:
                errors.append({"message": "unterminated YAML front matter"})
            else:
                try:
                    meta = yaml.safe_load(parts[1])
                    if meta is not None and not isinstance(meta, dict):
                        errors.append({"message": "front matter must be a mapping"})
                except yaml.YAMLError as e:
                    errors.append({"message": f"invalid YAML: {e}"})
        if errors:
            return self._json({"errors": errors, "warnings": []}, 400)
        self._json({"errors": [], "warnings": []})

    def _repo_info(self, repo_id, revision, rec, query):
        repo = self._repo(repo_id, rec)
        commit = self._commit_at(repo, revision)
        with_meta = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, e in sorted(commit.files.items()):
            s = {"rfilename": path}
            if with_meta:
                s.update(size=e.size, blobId=e.git_oid)
                if e.lfs:
                    s["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
            siblings.append(s)
        self._json(
            {
                "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo.owner,
                "sha": commit.oid,
                "lastModified": _iso(commit.date),
                "createdAt": _iso(repo.commits[self._first(repo)].date),
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "tags": [],
                "siblings": siblings,
            }
        )

    @staticmethod
    def _first(repo: Repo) -> str:
        return min(repo.commits.values(), key=lambda c: c.date).oid

    def _refs(self, repo_id, rec, query):
        repo = self._repo(repo_id, rec)

        def ref(name, oid):
            return {"name": name, "ref": name if name.startswith("refs/") else f"refs/heads/{name}", "targetCommit": oid}

        branches = [ref(n, o) for n, o in repo.branches.items() if not n.startswith("refs/pr/")]
        out = {"branches": branches, "converts": [], "tags": []}
        if query.get("include_prs"):
            out["pullRequests"] = [ref(n, o) for n, o in repo.branches.items() if n.startswith("refs/pr/")]
        self._json(out)

    def _create_branch(self, repo_id, branch, rec):
        repo = self._repo(repo_id, rec, write=True)
        if not branch or branch.startswith("refs/"):
            raise HubError(400, f"invalid branch name {branch!r}")
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = (rec.body or {}).get("startingPoint") or "main"
        commit = self._commit_at(repo, start)
        repo.branches[branch] = commit.oid
        self._json({})

    def _target_ref(self, repo: Repo, revision: str, create_pr: bool) -> str:
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return revision

    def _preupload(self, repo_id, revision, rec, query):
        repo = self._repo(repo_id, rec, write=True)
        ref = self._target_ref(repo, revision, bool(query.get("create_pr")))
        current = repo.commits[repo.branches[ref]].files
        out = []
        for f in (rec.body or {}).get("files", []):
            mode = "lfs" if self.hub.is_lfs_path(f["path"], int(f.get("size", 0))) else "regular"
            existing = current.get(f["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if mode == "lfs" else git_blob_oid(existing.data)
            out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json({"files": out, "commitOid": repo.branches[ref]})

    def _lfs_batch(self, repo_id, rec):
        repo = self._repo(repo_id, rec, write=True)
        body = rec.body or {}
        if body.get("operation") != "upload":
            raise HubError(400, "only the upload operation is implemented")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.lfs_objects:
                self.hub._lfs_expected[oid] = size
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/_lfs/upload/{oid}"},
                    "verify": {"href": f"{self.hub.url}/_lfs/verify/{oid}"},
                }
            objects.append(entry)
        del repo  # permission check only
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, oid, raw):
        size = self.hub._lfs_expected.get(oid)
        if size is None:
            raise HubError(403, "upload URL not issued by a batch call")
        if len(raw) != size or hashlib.sha256(raw).hexdigest() != oid:
            raise HubError(400, f"content does not match oid {oid} / size {size}")
        self.hub.lfs_objects[oid] = raw
        self.hub._lfs_expected.pop(oid, None)
        self._send(200, b"", {"ETag": f'"{hashlib.md5(raw).hexdigest()}"'})

    def _lfs_verify(self, oid, rec):
        body = rec.body or {}
        data = self.hub.lfs_objects.get(oid)
        if data is None or len(data) != int(body.get("size", -1)):
            raise HubError(404, f"LFS object {oid} not found")
        self._json({"success": True})

    def _commit(self, repo_id, revision, rec, query):
        repo = self._repo(repo_id, rec, write=True)
        user = self.hub.tokens[rec.token][0]
        lines = rec.body if isinstance(rec.body, list) else []
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        ref = self._target_ref(repo, revision, bool(query.get("create_pr")))
        head = repo.commits[repo.branches[ref]]
        parent_commit = header.get("parentCommit")
        if parent_commit and not head.oid.startswith(parent_commit):
            raise HubError(412, f"A commit has happened since. Please refresh and try again. ({head.oid})")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = value.get("path", "")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding for {path}")
                data = base64.b64decode(value.get("content", ""))
                files[path] = FileEntry(data, False, hashlib.sha256(data).hexdigest())
            elif key == "lfsFile":
                oid = value.get("oid")
                data = self.hub.lfs_objects.get(oid)
                if data is None:
                    raise HubError(422, f"LFS file {path}: object {oid} was never uploaded")
                if "size" in value and int(value["size"]) != len(data):
                    raise HubError(422, f"LFS file {path}: size mismatch")
                files[path] = FileEntry(data, True, oid)
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                for p in [p for p in files if p.startswith(prefix)]:
                    del files[p]
            else:
                raise HubError(400, f"unsupported commit operation {key!r}")
        pr_url = None
        if query.get("create_pr"):
            repo.pull_requests += 1
            ref = f"refs/pr/{repo.pull_requests}"
            pr_url = f"{self.hub.url}/{repo_id}/discussions/{repo.pull_requests}"
        commit = self.hub._new_commit(repo, head.oid, header.get("summary", ""), header.get("description", ""), files, user)
        repo.branches[ref] = commit.oid
        self._json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit.oid}",
                "pullRequestUrl": pr_url,
                "hookOutput": "",
            }
        )

    @staticmethod
    def _file_json(path: str, e: FileEntry) -> dict:
        out = {"type": "file", "path": path, "size": e.size, "oid": e.git_oid}
        if e.lfs:
            out["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
        return out

    @staticmethod
    def _dir_json(path: str) -> dict:
        return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}

    def _paths_info(self, repo_id, revision, rec):
        repo = self._repo(repo_id, rec)
        commit = self._commit_at(repo, revision)
        body = rec.body or {}
        out = []
        for p in body.get("paths", []):
            p = p.strip("/")
            if p in commit.files:
                out.append(self._file_json(p, commit.files[p]))
            elif any(f.startswith(p + "/") for f in commit.files):
                out.append(self._dir_json(p))
        self._json(out)

    def _tree(self, repo_id, revision, path, rec, query):
        repo = self._repo(repo_id, rec)
        commit = self._commit_at(repo, revision)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(f.startswith(prefix) for f in commit.files):
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        out, dirs = [], set()
        for f, e in sorted(commit.files.items()):
            if not f.startswith(prefix):
                continue
            rest = f[len(prefix) :]
            parts = rest.split("/")
            for i in range(1, len(parts)):
                d = prefix + "/".join(parts[:i])
                if (recursive or i == 1) and d not in dirs:
                    dirs.add(d)
                    out.append(self._dir_json(d))
            if recursive or len(parts) == 1:
                out.append(self._file_json(f, e))
        self._json(out)

    def _commits(self, repo_id, revision, rec):
        repo = self._repo(repo_id, rec)
        commit = self._commit_at(repo, revision)
        out = []
        c = commit
        while c is not None:
            out.append(
                {
                    "id": c.oid,
                    "authors": [{"user": c.author}],
                    "date": _iso(c.date),
                    "title": c.title,
                    "message": c.description,
                }
            )
            c = repo.commits.get(c.parent) if c.parent else None
        self._json(out)

    def _resolve(self, repo_id, revision, path, rec):
        repo = self._repo(repo_id, rec)
        commit = self._commit_at(repo, revision)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {
            "ETag": f'"{entry.git_oid}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        data = entry.data
        status = 200
        rng = rec.headers.get("range", "")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
        if m and self.command == "GET":
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data = data[start : end + 1]
            status = 206
        self._send(status, data, headers, content_type="application/octet-stream")


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
