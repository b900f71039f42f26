"""The state of the in-memory test Hub (tests/hub_server.py): tokens, repos, commits, files."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

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


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))
