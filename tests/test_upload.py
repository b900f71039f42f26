"""Upload to a local fake Hub with the real huggingface_hub client; load back with from_pretrained."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import ORG, READ_TOKEN, USER, VALID_TOKEN, FakeHub
from rich.console import Console
from tokenizers import Tokenizer

import neoxconv
from fixtures.hf_export import LOADER, PROMPT_IDS, copy_dir, local_files
from neoxconv.errors import NeoxconvError
from neoxconv.hub import upload, upload_command
from neoxconv.modelcard import write_model_card

REPO_ID = f"{USER}/pythia-tiny"


# ----------------------------------------------------------------------------- upload


def test_upload_to_step_branch(export_dir, fake_hub):
    result = upload(
        export_dir, REPO_ID, revision="step100", private=True, commit_message="Pythia-tiny step 100", token=VALID_TOKEN,
        endpoint=fake_hub.url,
    )
    assert result.method == "upload_folder" and result.created_branch and not result.dry_run
    repo = fake_hub.repos[REPO_ID]
    assert repo.private is True

    # the branch holds exactly the local folder (plus the Hub's .gitattributes), in ONE commit
    head = fake_hub.head(REPO_ID, "step100")
    assert result.commit_oid == head.oid and result.commit_url.endswith(head.oid)
    assert fake_hub.files(REPO_ID, "step100") == {**local_files(export_dir), ".gitattributes": fake_hub.gitattributes()}
    assert [c.title for c in fake_hub.history(REPO_ID, "step100")] == ["Pythia-tiny step 100", "initial commit"]
    assert [c.title for c in fake_hub.history(REPO_ID, "main")] == ["initial commit"]  # main untouched
    assert head.files["model.safetensors"].lfs and not head.files["config.json"].lfs

    commits = fake_hub.requests_matching("POST", r"/commit/")
    assert len(commits) == 1 and commits[0].path == f"/api/models/{REPO_ID}/commit/step100"
    assert commits[0].body[0] == {"key": "header", "value": {"summary": "Pythia-tiny step 100", "description": ""}}
    kinds = {line["value"]["path"]: line["key"] for line in commits[0].body[1:]}
    assert kinds["model.safetensors"] == "lfsFile" and kinds["config.json"] == "file"
    (create,) = fake_hub.requests_matching("POST", r"^/api/repos/create$")
    assert create.body["visibility"] == "private" and create.body["name"] == "pythia-tiny"
    assert len(fake_hub.requests_matching("POST", r"/branch/step100$")) == 1
    assert len(fake_hub.requests_matching("PUT", r"^/_lfs/upload/")) == 1
    for r in fake_hub.requests:
        if not r.path.startswith("/_lfs/"):  # LFS content goes to a storage URL, without the token
            assert r.token == VALID_TOKEN, r.path
            assert f"neoxconv/{neoxconv.__version__}" in r.headers["user-agent"]

    # private: invisible without the token
    from huggingface_hub import HfApi
    from huggingface_hub.utils import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=fake_hub.url, token=False).model_info(REPO_ID)


def test_one_branch_per_step_and_reupload(export_dir, fake_hub, tmp_path):
    upload(export_dir, REPO_ID, revision="step100", token=VALID_TOKEN, endpoint=fake_hub.url)
    first = fake_hub.head(REPO_ID, "step100").oid
    # unchanged folder again: nothing to commit, the existing head is reported
    again = upload(export_dir, REPO_ID, revision="step100", token=VALID_TOKEN, endpoint=fake_hub.url)
    assert again.commit_oid == first and not again.created_branch
    assert len(fake_hub.history(REPO_ID, "step100")) == 2

    # next training step on its own branch, created from main
    d = copy_dir(export_dir, tmp_path)
    (d / "extra").mkdir()
    (d / "extra" / "train_args.yml").write_text("train_iters: 200\n")  # subdirectories are uploaded too
    result = upload(d, REPO_ID, revision="step200", token=VALID_TOKEN, endpoint=fake_hub.url)
    assert result.created_branch
    assert fake_hub.files(REPO_ID, "step200")["extra/train_args.yml"] == b"train_iters: 200\n"
    assert len(fake_hub.history(REPO_ID, "step200")) == 2
    assert fake_hub.head(REPO_ID, "step100").oid == first
    assert sorted(fake_hub.repos[REPO_ID].branches) == ["main", "step100", "step200"]


def test_upload_names_the_model_card(export_dir, fake_hub, tmp_path):
    """The card of an export is titled by its directory; published, it is titled by the repo id."""
    d = copy_dir(export_dir, tmp_path)
    write_model_card(d, {"iteration": 100, "family": "gpt-neox"}, force=True)
    before = (d / "README.md").read_text()
    assert "\n# pythia-tiny-step100\n" in before
    upload(d, REPO_ID, revision="step100", endpoint=fake_hub.url, dry_run=True)
    assert (d / "README.md").read_text() == before  # a dry run changes nothing

    result = upload(d, REPO_ID, revision="step100", token=VALID_TOKEN, endpoint=fake_hub.url)
    text = (d / "README.md").read_text()
    assert result.model_card == "named" and f"\n# {REPO_ID}\n" in text
    assert f'from_pretrained("{REPO_ID}", revision="step100")' in text
    assert fake_hub.files(REPO_ID, "step100")["README.md"] == text.encode()  # the directory matches the Hub
    assert dict(result.files)["README.md"] == len(text.encode())

    # a card edited by hand is published as it is
    (d / "README.md").write_text(text.replace("## Provenance", "## Provenance\n\nMy notes."))
    result = upload(d, f"{ORG}/other", token=VALID_TOKEN, endpoint=fake_hub.url)
    published = fake_hub.files(f"{ORG}/other")["README.md"]
    assert result.model_card == "edited" and b"My notes." in published and f"# {REPO_ID}\n".encode() in published


def test_upload_to_org_main_and_default_message(export_dir, fake_hub):
    result = upload(export_dir, f"{ORG}/tiny", token=VALID_TOKEN, endpoint=fake_hub.url)
    assert result.revision == "main" and not result.created_branch
    assert fake_hub.head(f"{ORG}/tiny").title == f"Upload {export_dir.name} with neoxconv {neoxconv.__version__}"
    assert fake_hub.repos[f"{ORG}/tiny"].private is False


def test_repo_name_without_namespace_uses_token_owner(export_dir, fake_hub):
    result = upload(export_dir, "bare-name", token=VALID_TOKEN, endpoint=fake_hub.url)
    assert result.repo_id == f"{USER}/bare-name" and f"{USER}/bare-name" in fake_hub.repos


def test_create_pr_with_changes(export_dir, fake_hub, tmp_path):
    upload(export_dir, REPO_ID, token=VALID_TOKEN, endpoint=fake_hub.url, commit_message="first")
    main_head = fake_hub.head(REPO_ID).oid
    d = copy_dir(export_dir, tmp_path)
    (d / "README.md").write_text("---\nlicense: mit\n---\n# changed\n")
    result = upload(d, REPO_ID, token=VALID_TOKEN, endpoint=fake_hub.url, create_pr=True, commit_message="as PR")
    assert result.pr_url and result.pr_url.endswith("/discussions/1")
    assert fake_hub.head(REPO_ID).oid == main_head
    assert fake_hub.files(REPO_ID, "refs/pr/1")["README.md"].startswith(b"---\nlicense: mit")


def test_create_pr_with_revision_is_refused_before_any_request(export_dir, fake_hub):
    with pytest.raises(NeoxconvError, match="cannot be combined with --revision step100"):
        upload(export_dir, REPO_ID, revision="step100", create_pr=True, token=VALID_TOKEN, endpoint=fake_hub.url)
    assert fake_hub.requests == []


def test_private_flag_on_existing_public_repo_is_refused(export_dir, fake_hub):
    upload(export_dir, REPO_ID, token=VALID_TOKEN, endpoint=fake_hub.url)
    n_commits = len(fake_hub.history(REPO_ID))
    with pytest.raises(NeoxconvError, match="already exists and is public"):
        upload(export_dir, REPO_ID, revision="step100", private=True, token=VALID_TOKEN, endpoint=fake_hub.url)
    assert len(fake_hub.history(REPO_ID)) == n_commits and "step100" not in fake_hub.repos[REPO_ID].branches


def test_dry_run_sends_nothing(export_dir, fake_hub):
    # no token anywhere, and still fine: a dry run makes no request at all (not even whoami)
    result = upload(export_dir, REPO_ID, revision="step100", private=True, endpoint=fake_hub.url, dry_run=True)
    assert fake_hub.requests == []
    assert result.dry_run and result.commit_oid is None and result.method == "upload_folder"
    assert dict(result.files) == {n: len(b) for n, b in local_files(export_dir).items()}
    assert result.total_bytes == sum(dict(result.files).values())


def test_dry_run_still_validates(export_dir, fake_hub, tmp_path):
    d = copy_dir(export_dir, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(NeoxconvError, match="no weights file"):
        upload(d, REPO_ID, endpoint=fake_hub.url, dry_run=True)
    with pytest.raises(NeoxconvError, match="no weights file"):
        upload(d, REPO_ID, token=VALID_TOKEN, endpoint=fake_hub.url)
    assert fake_hub.requests == []


# ----------------------------------------------------------------------------- tokens and errors


def test_bad_token_is_one_line_error(export_dir, fake_hub):
    with pytest.raises(NeoxconvError, match=r"token was rejected \(401 Unauthorized\)") as e:
        upload(export_dir, REPO_ID, token="hf_not_a_real_token", endpoint=fake_hub.url)
    assert "\n" not in str(e.value)
    assert fake_hub.repos == {}
    assert [r.path for r in fake_hub.requests] == ["/api/whoami-v2"]


def test_read_only_token_is_403(export_dir, fake_hub):
    with pytest.raises(NeoxconvError, match=r"no write permission with this token \(403 Forbidden: .*read-only"):
        upload(export_dir, REPO_ID, token=READ_TOKEN, endpoint=fake_hub.url)
    assert fake_hub.repos == {}


def test_foreign_namespace_is_403(export_dir, fake_hub):
    with pytest.raises(NeoxconvError, match=r"someone-else/model: cannot create the repository: no write permission .*403"):
        upload(export_dir, "someone-else/model", token=VALID_TOKEN, endpoint=fake_hub.url)


def test_token_from_env_and_argument_precedence(export_dir, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)
    upload(export_dir, REPO_ID, endpoint=fake_hub.url)
    assert REPO_ID in fake_hub.repos
    assert {r.token for r in fake_hub.requests if not r.path.startswith("/_lfs/")} == {VALID_TOKEN}
    with pytest.raises(NeoxconvError, match="401"):  # an explicit token wins over HF_TOKEN
        upload(export_dir, REPO_ID, token="hf_wrong", endpoint=fake_hub.url)


def test_stored_login_token_is_used(export_dir, fake_hub, hub_client_env, tmp_path):
    Path(hub_client_env.HF_TOKEN_PATH).write_text(VALID_TOKEN)
    upload(export_dir, REPO_ID, endpoint=fake_hub.url)
    assert fake_hub.requests[0].token == VALID_TOKEN


def test_no_token_at_all(export_dir, fake_hub):
    with pytest.raises(NeoxconvError, match="no Hugging Face token"):
        upload(export_dir, REPO_ID, endpoint=fake_hub.url)
    assert fake_hub.requests == []


def test_network_error(export_dir, hub_client_env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(NeoxconvError, match=rf"127.0.0.1:{port}: cannot check the token: network error"):
        upload(export_dir, REPO_ID, token=VALID_TOKEN, endpoint=f"http://127.0.0.1:{port}")


def test_offline_mode_is_reported(export_dir, fake_hub, monkeypatch, hub_client_env):
    monkeypatch.setattr(hub_client_env, "HF_HUB_OFFLINE", True)
    with pytest.raises(NeoxconvError, match="HF_HUB_OFFLINE is set"):
        upload(export_dir, REPO_ID, token=VALID_TOKEN, endpoint=fake_hub.url)


def test_invalid_repo_id(export_dir, fake_hub):
    with pytest.raises(NeoxconvError, match="invalid repository id"):
        upload(export_dir, "a/b/c", token=VALID_TOKEN, endpoint=fake_hub.url, dry_run=True)


# ----------------------------------------------------------------------------- large folders


def test_large_folder_uses_upload_large_folder_when_available(export_dir, fake_hub, monkeypatch):
    """huggingface_hub 0.25-1.x has HfApi.upload_large_folder; the installed 2.x does not (checked below).
    It commits without our message, so README.md goes last, in the commit that carries the message."""
    from huggingface_hub import HfApi

    calls = []

    def fake_upload_large_folder(self, repo_id, folder_path, *, repo_type=None, revision=None, private=None,
                                 ignore_patterns=None, **kw):
        # same signature as the real method; it commits (possibly several times) without a message
        calls.append({"repo_id": repo_id, "folder_path": folder_path, "revision": revision,
                      "ignore_patterns": list(ignore_patterns or []), **kw})
        self.upload_folder(repo_id=repo_id, folder_path=folder_path, revision=revision, commit_message="large folder part 1",
                           ignore_patterns=ignore_patterns)

    monkeypatch.setattr(HfApi, "upload_large_folder", fake_upload_large_folder, raising=False)
    result = upload(export_dir, REPO_ID, revision="step100", private=True, token=VALID_TOKEN, endpoint=fake_hub.url,
                    commit_message="step 100", large_folder_threshold=1024)
    assert result.method == "upload_large_folder"
    assert calls == [{"repo_id": REPO_ID, "folder_path": str(export_dir.resolve()), "revision": "step100",
                      "ignore_patterns": ["README.md"]}]
    history = fake_hub.history(REPO_ID, "step100")
    assert [c.title for c in history[:2]] == ["step 100", "large folder part 1"]
    assert set(history[0].files) - set(history[1].files) == {"README.md"}  # the card comes last: complete when there
    assert result.commit_oid == history[0].oid and fake_hub.repos[REPO_ID].private
    assert fake_hub.files(REPO_ID, "step100") == {**local_files(export_dir), ".gitattributes": fake_hub.gitattributes()}
    # below the threshold: plain upload_folder
    small = upload(export_dir, REPO_ID, revision="step100", token=VALID_TOKEN, endpoint=fake_hub.url)
    assert small.method == "upload_folder" and len(calls) == 1


def test_large_folder_on_installed_hub_is_resumable_pipeline(export_dir, hub_client_env, monkeypatch):
    """Installed huggingface_hub (2.x): no upload_large_folder; upload_folder with hf_xet is the
    resumable multi-commit pipeline. It is exercised here with every file sent as a regular git
    blob, because the fake hub has no Xet storage (see tests/hub_server.py)."""
    import hf_xet  # noqa: F401  (a dependency of huggingface_hub 2.x: the resumable transport)
    from huggingface_hub import HfApi

    # huggingface_hub 2.x has no upload_large_folder; remove it on older versions so the test
    # always exercises the fallback path it is about.
    monkeypatch.delattr(HfApi, "upload_large_folder", raising=False)
    monkeypatch.setattr(hub_client_env, "HF_HUB_DISABLE_XET", False)
    with FakeHub(regular_only=True) as hub:
        result = upload(export_dir, REPO_ID, revision="step100", token=VALID_TOKEN, endpoint=hub.url, large_folder_threshold=1)
        assert result.method == "upload_folder"
        assert hub.files(REPO_ID, "step100") == local_files(export_dir)
        assert len(hub.requests_matching("POST", "/commit/")) == 1
        # re-running (what one does after an interruption) resumes: nothing left to send
        hub.clear_requests()
        again = upload(export_dir, REPO_ID, revision="step100", token=VALID_TOKEN, endpoint=hub.url, large_folder_threshold=1)
        assert again.commit_oid == result.commit_oid
        assert hub.requests_matching("POST", "/commit/") == []


def test_xet_upload_against_fake_hub_fails_cleanly(export_dir, hub_client_env, monkeypatch):
    """With hf_xet enabled, LFS-mode files go to Xet storage, which the fake hub lacks: one-line error."""
    import hf_xet  # noqa: F401
    monkeypatch.setattr(hub_client_env, "HF_HUB_DISABLE_XET", False)
    with FakeHub() as hub:
        with pytest.raises(NeoxconvError, match="cannot upload the folder") as e:
            upload(export_dir, REPO_ID, token=VALID_TOKEN, endpoint=hub.url)
        assert "\n" not in str(e.value)
        assert hub.requests_matching("GET", "xet-write-token")


# ----------------------------------------------------------------------------- CLI glue


def test_upload_command_output(export_dir, fake_hub):
    console = Console(record=True, width=140)
    upload_command(export_dir, REPO_ID, revision="step100", endpoint=fake_hub.url, dry_run=True, console=console)
    text = console.export_text()
    assert "Would upload 6 files" in text and "to tester/pythia-tiny@step100" in text and "model.safetensors" in text
    assert "Dry run: nothing was sent" in text and fake_hub.requests == []

    console = Console(record=True, width=140)
    result = upload_command(export_dir, REPO_ID, revision="step100", private=True, commit_message="msg", token=VALID_TOKEN,
                            endpoint=fake_hub.url, console=console)
    text = console.export_text()
    assert "Created branch step100" in text and result.commit_oid in text


# ----------------------------------------------------------------------------- load back


def test_from_pretrained_through_fake_hub(export, fake_hub, tmp_path):
    export_dir, source_logits = export
    upload(export_dir, REPO_ID, revision="step100", private=True, token=VALID_TOKEN, endpoint=fake_hub.url)
    fake_hub.clear_requests()

    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    # HF_HUB_OFFLINE is deliberately not set in this child only; the cache (HF_HOME) starts empty
    env.update(HF_ENDPOINT=fake_hub.url, HF_HOME=str(hf_home), HF_TOKEN=VALID_TOKEN,
               HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    out = tmp_path / "loaded.pt"
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, REPO_ID, "step100", json.dumps(PROMPT_IDS), str(out)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = torch.load(out)
    assert loaded["cls"] == "GPTNeoXForCausalLM"
    assert torch.equal(loaded["logits"], source_logits)  # bit-exact through upload + download
    assert loaded["specials"] == [0, 0, 1] and loaded["gen"] == [0, 1]
    local = Tokenizer.from_file(str(export_dir / "tokenizer.json"))
    assert loaded["ids"] == local.encode("the quick brown fox").ids

    got = {r.path for r in fake_hub.requests if r.method == "GET" and "/resolve/" in r.path}
    head = fake_hub.head(REPO_ID, "step100").oid
    assert f"/{REPO_ID}/resolve/{head}/model.safetensors" in got
    assert f"/{REPO_ID}/resolve/{head}/tokenizer.json" in got
    assert fake_hub.requests_matching("GET", rf"/api/models/{REPO_ID}/revision/step100$")
    assert all(r.token == VALID_TOKEN for r in fake_hub.requests if "/resolve/" in r.path)


def test_fake_hub_serves_the_read_api(export_dir, fake_hub, tmp_path):
    """The endpoints from_pretrained does not happen to need, driven by the real client."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, RevisionNotFoundError

    d = copy_dir(export_dir, tmp_path / "src")
    (d / "extra").mkdir()
    (d / "extra" / "notes.txt").write_text("hello\n")
    upload(d, REPO_ID, revision="step100", token=VALID_TOKEN, endpoint=fake_hub.url)
    api = HfApi(endpoint=fake_hub.url, token=VALID_TOKEN)
    head = fake_hub.head(REPO_ID, "step100")

    tree = {e.path: e for e in api.list_repo_tree(REPO_ID, revision="step100")}
    assert "extra" in tree and "extra/notes.txt" not in tree and tree["model.safetensors"].lfs.size == (d / "model.safetensors").stat().st_size
    deep = {e.path for e in api.list_repo_tree(REPO_ID, revision="step100", recursive=True)}
    assert "extra/notes.txt" in deep
    info = api.get_paths_info(REPO_ID, ["config.json", "model.safetensors", "extra", "missing.bin"], revision="step100")
    by_path = {e.path: e for e in info}
    assert set(by_path) == {"config.json", "model.safetensors", "extra"}
    assert by_path["model.safetensors"].lfs.sha256 == head.files["model.safetensors"].sha256
    assert by_path["config.json"].blob_id == head.files["config.json"].git_oid
    refs = api.list_repo_refs(REPO_ID)
    assert {b.name: b.target_commit for b in refs.branches}["step100"] == head.oid
    commits = api.list_repo_commits(REPO_ID, revision="step100")
    assert [c.title for c in commits] == [head.title, "initial commit"]
    meta = api.model_info(REPO_ID, revision="step100", files_metadata=True)
    assert meta.sha == head.oid and {s.rfilename for s in meta.siblings} == set(head.files)

    path = hf_hub_download(REPO_ID, "extra/notes.txt", revision="step100", endpoint=fake_hub.url,
                           token=VALID_TOKEN, cache_dir=tmp_path / "cache")
    assert Path(path).read_text() == "hello\n"
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO_ID, "nope.txt", revision="step100", endpoint=fake_hub.url, token=VALID_TOKEN,
                        cache_dir=tmp_path / "cache")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO_ID, revision="step999")
