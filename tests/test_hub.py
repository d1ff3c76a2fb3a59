"""Hub: loading from an offline HF cache laid out as the Hub client lays it out; one-commit upload."""

from __future__ import annotations

import hashlib
import os
import shutil

import huggingface_hub
import pytest
import torch
from conftest import make_base, make_pixel_dataset
from huggingface_hub import CommitInfo, HfApi, RepoUrl

from resmem import MemoryFileError, ResMemWrapper
from resmem.hub import MEMORY_FILE

REPO_ID = "resmem-test-org/tiny-resnet-resmem"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin")


def hub_cache_from_folder(folder, cache_dir, repo_id=REPO_ID, commit=COMMIT, refs=("main",), skip=()):
    """Lay out `folder` as `huggingface_hub` caches a downloaded repo:

    models--org--name/blobs/<etag>, snapshots/<commit>/<file> -> ../../blobs/<etag> (relative symlink),
    refs/<branch> holding the commit hash. LFS files' etag is their sha256, other files' the git blob sha1.
    """
    repo_dir = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    blobs, snapshot = os.path.join(repo_dir, "blobs"), os.path.join(repo_dir, "snapshots", commit)
    os.makedirs(blobs, exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for name in sorted(os.listdir(folder)):
        if name in skip:
            continue
        data = open(os.path.join(folder, name), "rb").read()
        if name.endswith(LFS_SUFFIXES):
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        with open(os.path.join(blobs, etag), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", etag), os.path.join(snapshot, name))
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(repo_dir, "refs", ref), "w") as f:
            f.write(commit)
    return repo_dir


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this test, plus a socket that refuses to connect (proof that nothing is fetched)."""
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", no_network)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    model = ResMemWrapper.from_base(make_base("resnet", seed=3), k=4, sigma=0.6, temperature=1.2)
    model.build_memory(make_pixel_dataset(40, seed=3), batch_size=20)
    model.save_pretrained(root / "folder")
    return model, root / "folder"


def _scores(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels)


@pytest.mark.parametrize("revision", [None, "main", COMMIT, "v1.0"])
def test_offline_cache_load_gives_identical_scores(saved, tmp_path, offline, query_pixels, revision):
    _, folder = saved
    cache = tmp_path / "cache"
    hub_cache_from_folder(folder, cache, refs=("main", "v1.0"))
    from_folder = ResMemWrapper.from_pretrained(folder)
    from_cache = ResMemWrapper.from_pretrained(REPO_ID, cache_dir=str(cache), revision=revision, token="hf_unused")
    assert len(from_cache.memory) == 40
    expected, actual = _scores(from_folder, query_pixels), _scores(from_cache, query_pixels)
    for field in ("scores", "logits", "base_logits", "residual"):
        assert torch.equal(getattr(actual, field), getattr(expected, field)), field


def test_offline_cache_auto_class(saved, tmp_path, offline, query_pixels):
    from transformers import AutoModelForImageClassification

    model, folder = saved
    hub_cache_from_folder(folder, tmp_path / "cache")
    loaded = AutoModelForImageClassification.from_pretrained(REPO_ID, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(_scores(loaded, query_pixels).scores, _scores(model, query_pixels).scores)


def test_repo_without_memory_file_names_it(saved, tmp_path, offline):
    _, folder = saved
    hub_cache_from_folder(folder, tmp_path / "cache", skip=(MEMORY_FILE,))
    with pytest.raises(MemoryFileError, match=rf"{REPO_ID} has a config for a 40-entry memory but no {MEMORY_FILE}"):
        ResMemWrapper.from_pretrained(REPO_ID, cache_dir=str(tmp_path / "cache"))


# ------------------------------------------------------------------ upload: only the HTTP calls are intercepted
class Recorder:
    def __init__(self):
        self.commits, self.repos = [], []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def download(self, repo_id, filename):
        """The repo's files: `self.remote[filename]` (a local path), else not found (a new repo)."""
        from huggingface_hub.errors import EntryNotFoundError

        if filename not in getattr(self, "remote", {}):
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return self.remote[filename]

    def create_commit(self, api, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = open(source, "rb").read() if isinstance(source, (str, os.PathLike)) else bytes(source)
            assert op.upload_info.size == len(files[op.path_in_repo])  # the real CommitOperationAdd hashed the file
        self.commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{COMMIT}",
            commit_message=kwargs.get("commit_message") or "",
            commit_description="",
            oid=COMMIT,
        )


@pytest.fixture
def hub_calls(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: recorder.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "create_commit", lambda api, repo_id, operations, **kw: recorder.create_commit(api, repo_id, operations, **kw))
    monkeypatch.setattr(HfApi, "hf_hub_download", lambda api, repo_id, filename, **kw: recorder.download(repo_id, filename))
    return recorder


EXPECTED_FILES = {"config.json", "model.safetensors", MEMORY_FILE, "README.md"}


def test_push_to_hub_uploads_everything_in_one_commit(saved, hub_calls, tmp_path):
    model, folder = saved
    model.tune(make_pixel_dataset(12, seed=8), k=[2, 4], set_best=True)
    model.push_to_hub(REPO_ID, commit_message="first upload", tags=["cifar"])
    assert hub_calls.repos == [REPO_ID]
    assert len(hub_calls.commits) == 1
    commit = hub_calls.commits[0]
    assert set(commit["files"]) == EXPECTED_FILES
    assert commit["commit_message"] == "first upload"
    card = commit["files"]["README.md"].decode()
    assert f'from_pretrained("{REPO_ID}")' in card and "- cifar" in card
    evaluation = model.config.last_evaluation
    assert f"{100 * evaluation['resmem_accuracy']:.2f}%" in card
    # The uploaded files are the model: load them back from a folder.
    pushed = tmp_path / "pushed"
    pushed.mkdir()
    for name, data in commit["files"].items():
        (pushed / name).write_bytes(data)
    loaded = ResMemWrapper.from_pretrained(pushed)
    assert torch.equal(loaded.memory.keys, model.memory.keys)
    assert loaded.config.last_evaluation == evaluation


def test_save_pretrained_push_to_hub_uploads_after_the_extra_files_exist(saved, hub_calls, tmp_path):
    model, _ = saved
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id=REPO_ID, token="hf_unused")
    assert len(hub_calls.commits) == 1
    assert set(hub_calls.commits[0]["files"]) == EXPECTED_FILES
    assert hub_calls.commits[0]["files"][MEMORY_FILE] == (tmp_path / "out" / MEMORY_FILE).read_bytes()
    assert sorted(os.listdir(tmp_path / "out")) == sorted(EXPECTED_FILES)
    shutil.rmtree(tmp_path / "out")
