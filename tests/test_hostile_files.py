"""Hostile or damaged save files and mistaken paths: clear errors naming the fix, never a file read outside a folder.

Manifest path traversal, missing local folders, memory files without a fingerprint, truncated
manifests, and the command line's user errors.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_base, make_pixel_dataset
from safetensors.torch import save_file

from resmem import MemoryFileError, ResMemWrapper, cli
from resmem.hub import MEMORY_FILE
from resmem.memory_disk import MANIFEST_FILE, MemoryWriter, OnDiskMemory

pytest.importorskip("faiss")


def _write_memory(folder, n=60, dim=8, shard_size=25):
    rng = np.random.default_rng(0)
    with MemoryWriter(str(folder), fingerprint="synthetic", layer="none", shard_size=shard_size) as writer:
        writer.add(rng.standard_normal((n, dim)), rng.standard_normal((n, 5)), rng.integers(0, 5, n))


def _edit_manifest(folder, edit):
    path = os.path.join(folder, MANIFEST_FILE)
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


@pytest.fixture
def disk_save(tmp_path):
    """A saved model with an on-disk memory (3 shards) and, outside its folder, a valid shard of the same build."""
    model = ResMemWrapper.from_base(make_base("resnet", seed=1), k=3)
    model.build_memory_on_disk(make_pixel_dataset(30, seed=1), str(tmp_path / "built"), chunk_rows=10, shard_size=10, batch_size=10)
    model.save_pretrained(tmp_path / "saved")
    outside = tmp_path / "outside.safetensors"  # a file the manifest must never reach
    shutil.copyfile(tmp_path / "saved" / "resmem_memory-00000.safetensors", outside)
    return tmp_path / "saved", outside


@pytest.mark.parametrize("hostile", ["../outside.safetensors", "ABSOLUTE", "sub/resmem_memory-00000.safetensors", "config.json", ""])
def test_manifest_names_outside_the_folder_are_refused(disk_save, hostile):
    folder, outside = disk_save
    name = str(outside) if hostile == "ABSOLUTE" else hostile
    _edit_manifest(folder, lambda m: m["shards"][0].__setitem__("file", name))
    with pytest.raises(MemoryFileError, match=r"not a plain shard name.*inside the memory's folder"):
        OnDiskMemory.open(str(folder))
    with pytest.raises(MemoryFileError, match=r"not a plain shard name"):
        ResMemWrapper.from_pretrained(folder)


def test_save_refuses_a_memory_whose_manifest_was_altered(tmp_path):
    _write_memory(tmp_path / "mem")
    memory = OnDiskMemory.open(str(tmp_path / "mem"))
    memory.manifest["shards"][1]["file"] = "../../etc/passwd"  # edited in RAM after opening
    (tmp_path / "out").mkdir()
    with pytest.raises(MemoryFileError, match="not a plain shard name"):
        memory.save_folder(str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []


def test_duplicate_shard_names_are_refused(tmp_path):
    _write_memory(tmp_path / "mem")
    _edit_manifest(tmp_path / "mem", lambda m: m["shards"][1].__setitem__("file", m["shards"][0]["file"]))
    with pytest.raises(MemoryFileError, match="lists a shard file twice"):
        OnDiskMemory.open(str(tmp_path / "mem"))


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_manifest_is_a_memory_file_error(disk_save, keep):
    folder, _ = disk_save
    path = folder / MANIFEST_FILE
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    for load in (lambda: OnDiskMemory.open(str(folder)), lambda: ResMemWrapper.from_pretrained(folder)):
        with pytest.raises(MemoryFileError, match=r"manifest .* is truncated or not JSON.*save the model again"):
            load()


@pytest.mark.parametrize("edit", [lambda m: m.pop("shards"), lambda m: m.pop("build_id"), lambda m: m["shards"][0].pop("num_entries")])
def test_malformed_manifest_is_a_memory_file_error(tmp_path, edit):
    _write_memory(tmp_path / "mem")
    _edit_manifest(tmp_path / "mem", edit)
    with pytest.raises(MemoryFileError, match="manifest .* is malformed"):
        OnDiskMemory.open(str(tmp_path / "mem"))


def test_memory_file_without_fingerprint_names_the_fix(tmp_path):
    model = ResMemWrapper.from_base(make_base("resnet", seed=1), k=3)
    model.build_memory(make_pixel_dataset(20, seed=1), batch_size=10)
    model.save_pretrained(tmp_path / "saved")
    path = tmp_path / "saved" / MEMORY_FILE
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        metadata = {k: v for k, v in f.metadata().items() if k != "fingerprint"}
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(MemoryFileError, match=r"lacks \['fingerprint'\].*build_memory\(dataset\)"):
        ResMemWrapper.from_pretrained(tmp_path / "saved")


@pytest.mark.parametrize("kind", ["path", "absolute", "dot", "nested"])
def test_missing_local_folder_says_it_does_not_exist(tmp_path, kind, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = {
        "path": pathlib.Path("no-such-model"),
        "absolute": str(tmp_path / "no-such-model"),
        "dot": "./no-such-model",
        "nested": "runs/2024/no-such-model",  # three parts: cannot be a Hub repo id
    }[kind]
    with pytest.raises(FileNotFoundError, match=r"model folder .*no-such-model does not exist.*save_pretrained"):
        ResMemWrapper.from_pretrained(path)


def test_a_file_instead_of_a_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NotADirectoryError, match="is a file, not a model folder"):
        ResMemWrapper.from_pretrained(tmp_path / "config.json")


def test_save_creates_missing_parent_folders(tmp_path):
    model = ResMemWrapper.from_base(make_base("resnet", seed=1), k=3)
    model.save_pretrained(tmp_path / "a" / "b" / "model")
    assert ResMemWrapper.from_pretrained(tmp_path / "a" / "b" / "model").config.k == 3


# ------------------------------------------------------------------ command line user errors
@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("cli")
    model = ResMemWrapper.from_base(make_base("resnet", seed=1), k=3)
    model.build_memory(make_pixel_dataset(20, seed=1), batch_size=10)
    model.save_pretrained(root / "model")
    datasets.DatasetDict({"validation": make_pixel_dataset(8, seed=2)}).save_to_disk(str(root / "data"))
    return root


@pytest.mark.parametrize(
    "argv, match",
    [
        (["eval", "{root}/missing", "--dataset", "{root}/data"], r"missing does not exist"),
        (["eval", "{root}/model", "--dataset", "{root}/nothing"], r"--dataset .*nothing is not a folder; pass a folder"),
        (["eval", "{root}/model", "--dataset", "{root}/data", "--split", "test"], r"split 'test' not found.*pass --split"),
        (["tune", "{root}/model", "--dataset", "{root}/data", "--split", "test"], r"must not see the test split; pass --split"),
        (["tune", "{root}/model", "--dataset", "{root}/data", "--k", "0", "--no-plots", "--output-dir", "{root}/r"], r"Every k of the grid must be an integer >= 1; got 0"),
    ],
)
def test_cli_user_errors_are_one_line_with_status_2(cli_setup, capsys, argv, match):
    argv = [a.format(root=cli_setup) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("resmem: error: ") and "Traceback" not in err, err
    assert re.search(match, err), err


def test_cli_bare_missing_name_is_a_folder_error_not_a_hub_retry(cli_setup, tmp_path, capsys, monkeypatch):
    """`resmem eval my-model ...` with no folder `my-model` here fails at once, naming the folder and the Hub form
    (not transformers' Hub retries: a resmem model on the Hub is always 'org/name')."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert cli.main(["eval", "my-resmem", "--dataset", str(cli_setup / "data")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(r"MODEL my-resmem is not a folder \(relative paths start at .*\).*'org/name'", err), err


def test_cli_damaged_save_is_a_user_error(cli_setup, tmp_path, capsys):
    shutil.copytree(cli_setup / "model", tmp_path / "model")
    (tmp_path / "model" / MEMORY_FILE).write_bytes(b"\x00" * 16)
    assert cli.main(["eval", str(tmp_path / "model"), "--dataset", str(cli_setup / "data")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_console_entry_point_exit_status_and_stderr(tmp_path):
    """The real `python -m resmem` process: status 2, one line on stderr, no traceback."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.path.abspath("src"), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen(
        [sys.executable, "-m", "resmem", "eval", str(tmp_path / "missing"), "--dataset", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [lines[-1]] and "missing does not exist" in lines[-1] and "Traceback" not in err, err
