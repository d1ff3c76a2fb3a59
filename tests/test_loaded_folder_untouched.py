"""Loading a model and running it never writes into the folder, or the Hub cache snapshot, it was loaded from.

With an on-disk memory and an approximate index, the first forward trained the index
and wrote `resmem_index.faiss` plus a rewritten manifest (`open("w")`, in place) into the loaded
folder; since saves hard-link the manifest and shards, that also changed an earlier save, and in a
Hub cache it overwrote a blob. The trained index now lives in `RESMEM_CACHE` (set per test session
in conftest.py), keyed by the memory's build id.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import make_base, make_pixel_dataset
from test_hub import hub_cache_from_folder, offline  # noqa: F401  (offline is a fixture)

from resmem import ResMemWrapper
from resmem.hub import INDEX_FILE
from resmem.memory_disk import OnDiskMemory

pytest.importorskip("faiss")

REPO_ID = "resmem-test-org/on-disk-resmem"


def tree_state(root) -> dict[str, tuple]:
    """Every entry under `root` (links not followed): folders, symlink targets, file bytes and modes."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            key = os.path.relpath(path, root)
            if os.path.islink(path):
                state[key] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                state[key] = ("dir",)
            else:
                with open(path, "rb") as f:
                    state[key] = ("file", f.read(), os.stat(path).st_mode)
    return state


def _scores(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels).scores


def _use_ivf(model):
    model.config.index, model.config.index_params = "IVF4,Flat", {"nprobe": 4}
    return model


@pytest.fixture
def disk_model(tmp_path):
    model = ResMemWrapper.from_base(make_base("resnet", seed=5), k=4, sigma=0.8, temperature=1.3)
    model.build_memory_on_disk(make_pixel_dataset(60, seed=5), str(tmp_path / "built"), chunk_rows=25, shard_size=20, batch_size=30)
    return model


def test_forward_after_loading_from_a_folder_writes_nothing_there(disk_model, tmp_path, query_pixels):
    disk_model.save_pretrained(tmp_path / "saved")
    before = tree_state(tmp_path / "saved")
    loaded = _use_ivf(ResMemWrapper.from_pretrained(tmp_path / "saved"))
    assert isinstance(loaded.memory, OnDiskMemory)
    first = _scores(loaded, query_pixels)
    torch.testing.assert_close(_scores(loaded, query_pixels), first)
    assert loaded.memory._index.mmapped and loaded.memory._index.factory == "IVF4,Flat"
    assert tree_state(tmp_path / "saved") == before  # byte-identical, no file added
    # A second process-like load reuses the cached index, still without touching the folder.
    again = _use_ivf(ResMemWrapper.from_pretrained(tmp_path / "saved"))
    torch.testing.assert_close(_scores(again, query_pixels), first)
    assert again.memory._index_path == loaded.memory._index_path
    assert tree_state(tmp_path / "saved") == before


def test_forward_does_not_change_an_earlier_save_that_shares_its_files(disk_model, tmp_path, query_pixels):
    """The earlier save hard-links the model's shards: a forward on the model must not alter it."""
    disk_model.save_pretrained(tmp_path / "earlier")
    expected = _scores(ResMemWrapper.from_pretrained(tmp_path / "earlier"), query_pixels)
    before, built_before = tree_state(tmp_path / "earlier"), tree_state(tmp_path / "built")
    _scores(_use_ivf(disk_model), query_pixels)
    assert tree_state(tmp_path / "earlier") == before
    assert tree_state(tmp_path / "built") == built_before  # nor the folder the memory was built in
    assert torch.equal(_scores(ResMemWrapper.from_pretrained(tmp_path / "earlier"), query_pixels), expected)
    # Saving the model now stores the trained index with it (a fresh manifest names it).
    disk_model.save_pretrained(tmp_path / "with_index")
    assert INDEX_FILE in os.listdir(tmp_path / "with_index")
    reloaded = _use_ivf(ResMemWrapper.from_pretrained(tmp_path / "with_index"))
    assert reloaded.memory._index_path == os.path.join(os.path.realpath(tmp_path / "with_index"), INDEX_FILE)
    torch.testing.assert_close(_scores(reloaded, query_pixels), _scores(disk_model, query_pixels))
    assert tree_state(tmp_path / "earlier") == before


@pytest.mark.parametrize("memory", ["on-disk", "in-ram"])
def test_forward_after_loading_from_an_offline_hub_cache_writes_nothing_there(disk_model, tmp_path, offline, query_pixels, memory):
    if memory == "on-disk":
        model = disk_model
    else:
        model = _use_ivf(ResMemWrapper.from_base(make_base("resnet", seed=5), k=4, sigma=0.8, temperature=1.3))
        model.build_memory(make_pixel_dataset(60, seed=5), batch_size=30)
        _scores(model, query_pixels)  # trains the IVF index, saved as resmem_index.faiss
    model.save_pretrained(tmp_path / "saved")
    repo_dir = hub_cache_from_folder(tmp_path / "saved", tmp_path / "cache", repo_id=REPO_ID)
    before = tree_state(repo_dir)
    loaded = _use_ivf(ResMemWrapper.from_pretrained(REPO_ID, cache_dir=str(tmp_path / "cache")))
    expected = _scores(_use_ivf(ResMemWrapper.from_pretrained(tmp_path / "saved")), query_pixels)
    assert torch.equal(_scores(loaded, query_pixels), expected)
    assert tree_state(repo_dir) == before  # blobs, snapshot links and refs unchanged, no file added
    assert sorted(os.listdir(tmp_path / "cache")) == [os.path.basename(repo_dir)]
    # Saving the model loaded from the cache stores real files (not the snapshot's relative symlinks).
    loaded.save_pretrained(tmp_path / "resaved")
    assert not [n for n in os.listdir(tmp_path / "resaved") if os.path.islink(tmp_path / "resaved" / n)]
    assert torch.equal(_scores(_use_ivf(ResMemWrapper.from_pretrained(tmp_path / "resaved")), query_pixels), expected)
    assert tree_state(repo_dir) == before


def test_without_a_writable_cache_the_index_stays_in_ram(disk_model, tmp_path, monkeypatch, query_pixels):
    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setenv("RESMEM_CACHE", str(tmp_path / "not_a_folder" / "cache"))  # makedirs fails
    disk_model.save_pretrained(tmp_path / "saved")
    before = tree_state(tmp_path / "saved")
    loaded = _use_ivf(ResMemWrapper.from_pretrained(tmp_path / "saved"))
    expected = _scores(loaded, query_pixels)
    assert not loaded.memory._index.mmapped and loaded.memory._index_path is None
    assert tree_state(tmp_path / "saved") == before
    loaded.save_pretrained(tmp_path / "resaved")  # the in-RAM index is written with the save
    assert INDEX_FILE in os.listdir(tmp_path / "resaved")
    assert torch.equal(_scores(_use_ivf(ResMemWrapper.from_pretrained(tmp_path / "resaved")), query_pixels), expected)
