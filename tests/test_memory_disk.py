"""Sharded on-disk memory: same scores as the in-RAM memory, memory-mapped, checked for missing / mixed shards."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from conftest import make_base, make_pixel_dataset

from resmem import MemoryFileError, ResMemWrapper
from resmem.memory_disk import MANIFEST_FILE, MemoryWriter, OnDiskMemory

pytest.importorskip("faiss")


def _write(folder, n=1000, dim=8, classes=5, chunk=170, shard_size=300, seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, dim)).astype(np.float32)
    logits = rng.standard_normal((n, classes)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    with MemoryWriter(str(folder), fingerprint="synthetic", layer="none", shard_size=shard_size) as writer:
        for start in range(0, n, chunk):  # chunks that do not line up with the shards
            writer.add(keys[start : start + chunk], logits[start : start + chunk], labels[start : start + chunk])
    return keys, logits, labels


def test_sharded_memory_searches_like_the_in_ram_one(tmp_path):
    keys, logits, labels = _write(tmp_path / "mem")
    assert sorted(os.listdir(tmp_path / "mem"))[:4] == [f"resmem_memory-0000{i}.safetensors" for i in range(4)]
    disk = OnDiskMemory.open(str(tmp_path / "mem"))
    assert len(disk) == 1000 and disk.dim == 8
    assert torch.equal(disk.all_example_ids(), torch.arange(1000))
    from resmem import ResidualMemory

    ram = ResidualMemory()
    ram.set_entries(torch.from_numpy(keys), torch.from_numpy(logits), torch.from_numpy(labels), torch.arange(1000), "s", "none")
    queries = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    for spec in ("exact", "IVF8,Flat"):
        params = {"nprobe": 8} if spec != "exact" else None
        expected = ram.residual_for(queries, 7, 1.0, 1.3, "exact")
        torch.testing.assert_close(disk.residual_for(queries, 7, 1.0, 1.3, spec, params), expected)
    # The trained IVF index is cached (never written into the memory's folder) and searched memory-mapped;
    # reopening the folder reuses it from the cache without training again.
    assert disk._index.mmapped and "resmem_index.faiss" not in os.listdir(tmp_path / "mem")
    again = OnDiskMemory.open(str(tmp_path / "mem"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("resmem.memory_disk._faiss_index_from_shards", lambda *a: pytest.fail("trained again instead of reusing the cache"))
        index = again.index("IVF8,Flat", {"nprobe": 8})
    assert index.mmapped and len(index) == 1000 and again._index_path == disk._index_path


def test_missing_shard_is_a_clear_error(tmp_path):
    _write(tmp_path / "mem")
    os.remove(tmp_path / "mem" / "resmem_memory-00002.safetensors")
    with pytest.raises(MemoryFileError, match=r"shard resmem_memory-00002.safetensors \(3 of 4\) is missing"):
        OnDiskMemory.open(str(tmp_path / "mem"))


def test_shards_from_two_builds_are_refused(tmp_path):
    _write(tmp_path / "a", seed=0)
    _write(tmp_path / "b", seed=1)
    shutil.copy(tmp_path / "b" / "resmem_memory-00001.safetensors", tmp_path / "a" / "resmem_memory-00001.safetensors")
    with pytest.raises(MemoryFileError, match="mixes files of two different builds"):
        OnDiskMemory.open(str(tmp_path / "a"))


def test_unfinished_build_has_no_manifest(tmp_path):
    writer = MemoryWriter(str(tmp_path / "m"), shard_size=10)
    writer.add(np.zeros((25, 4)), np.zeros((25, 3)), np.zeros(25, dtype=np.int64))  # float labels are refused
    with pytest.raises(MemoryFileError, match="did not finish"):
        OnDiskMemory.open(str(tmp_path / "m"))


def test_model_builds_saves_and_loads_an_on_disk_memory(tmp_path, query_pixels):
    dataset = make_pixel_dataset(50, seed=0)
    ram = ResMemWrapper.from_base(make_base("resnet"), k=4, sigma=0.8, temperature=1.3)
    ram.build_memory(dataset, batch_size=16)
    disk = ResMemWrapper.from_base(make_base("resnet"), k=4, sigma=0.8, temperature=1.3)
    disk.build_memory_on_disk(dataset, str(tmp_path / "mem"), chunk_rows=20, shard_size=15, batch_size=16)
    assert isinstance(disk.memory, OnDiskMemory) and len(disk.memory) == 50
    with torch.no_grad():
        expected = ram(pixel_values=query_pixels).scores
        torch.testing.assert_close(disk(pixel_values=query_pixels).scores, expected)
    disk.save_pretrained(tmp_path / "saved")
    assert MANIFEST_FILE in os.listdir(tmp_path / "saved")
    loaded = ResMemWrapper.from_pretrained(tmp_path / "saved")
    assert isinstance(loaded.memory, OnDiskMemory)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=query_pixels).scores, expected)
    with pytest.raises(ValueError, match="read-only"):
        loaded.memory.remove([1])
