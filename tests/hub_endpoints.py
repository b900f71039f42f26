"""The Hub API endpoints of the in-memory test Hub (tests/hub_server.py routes requests here)."""

from __future__ import annotations

import base64
import hashlib
import re

from hub_model import FileEntry, HubError, Repo, _iso, git_blob_oid, lfs_pointer


class Endpoints:
    """Mixin of the request handler: one method per Hub endpoint (``self.hub`` is the FakeHub)."""

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
