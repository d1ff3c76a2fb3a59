"""A saved faiss index is bound to the memory it was built from: faiss only ever reads the exact bytes written at save.

faiss trusts its input: an index over other (e.g. permuted) keys of the same shape loads and silently
changes the neighbours, corrupted bytes can change predictions or make faiss try a huge allocation.
The memory's metadata records the index file's SHA-256 (plus size, factory, dimension, count); a file
that does not match is not read (warning naming it; the index is rebuilt from the keys).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import struct
import time
import warnings

import numpy as np
import pytest
import torch
from conftest import make_base, make_pixel_dataset
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from resmem import MemoryFileError, ResidualMemory, ResMemWrapper
from resmem.hub import INDEX_FILE, MEMORY_FILE
from resmem.index import FaissIndex
from resmem.memory_disk import MANIFEST_FILE, MemoryWriter, OnDiskMemory

faiss = pytest.importorskip("faiss")

SPEC, PARAMS, K = "IVF16,Flat", {"nprobe": 4}, 5
IGNORED = r"Ignoring the saved search index .*{name}: .*{reason}.*rebuilt from the memory's keys"


def _clustered(n=2000, dim=8, classes=5, queries=300, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim)).astype(np.float32) * 3
    c = rng.integers(0, 40, n + queries)
    x = centres[c] + rng.standard_normal((n + queries, dim)).astype(np.float32)
    y = c % classes
    logits = rng.standard_normal((n + queries, classes)).astype(np.float32)
    return torch.from_numpy(x[:n]), torch.from_numpy(logits[:n]), torch.from_numpy(y[:n]), torch.from_numpy(x[n:])


def _residual(memory, queries):
    return memory.residual_for(queries, K, 1.0, 1.0, SPEC, PARAMS)  # (B, C)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A memory saved with its trained IVF index; the residuals it gives with that index."""
    keys, logits, labels, queries = _clustered(n=1000)
    memory = ResidualMemory()
    memory.set_entries(keys, logits, labels, torch.arange(len(keys)), fingerprint="synthetic", layer="none")
    reference = _residual(memory, queries)
    folder = tmp_path_factory.mktemp("saved")
    memory.save(str(folder / MEMORY_FILE), index_path=str(folder / INDEX_FILE))
    assert os.path.isfile(folder / INDEX_FILE)
    return folder, queries, reference


def _load(folder, index_path):
    memory = ResidualMemory()
    memory.load(str(folder / MEMORY_FILE), index_path=str(index_path))
    return memory


def _edit_metadata(path, edit):
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    edit(metadata)
    save_file(load_file(str(path)), str(path), metadata=metadata)


def test_saved_index_records_its_checksum_and_loads_memory_mapped_without_warning(saved):
    folder, queries, reference = saved
    with safe_open(str(folder / MEMORY_FILE), framework="pt") as f:
        metadata = f.metadata()
    data = (folder / INDEX_FILE).read_bytes()
    assert metadata["index_sha256"] == hashlib.sha256(data).hexdigest()  # independent whole-file hash
    assert (metadata["index_factory"], metadata["index_bytes"], metadata["index_dim"], metadata["index_count"]) == (
        SPEC, str(len(data)), "8", "1000"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        memory = _load(folder, folder / INDEX_FILE)
    assert isinstance(memory._index, FaissIndex) and memory._index.mmapped
    assert torch.equal(_residual(memory, queries), reference)


def test_chunked_file_hash_equals_the_whole_file_hash(tmp_path):
    from resmem.index import file_sha256

    data = np.random.default_rng(0).bytes(100_003)
    (tmp_path / "f").write_bytes(data)
    for chunk in (7, 4096, 1 << 20):
        assert file_sha256(str(tmp_path / "f"), chunk_bytes=chunk) == hashlib.sha256(data).hexdigest()


def test_valid_index_over_permuted_keys_is_not_used(tmp_path, query_pixels):
    """The index file of another memory with the same dimension and size: faiss would read it happily."""
    model = ResMemWrapper.from_base(make_base("resnet"), k=3, index="IVF4,Flat", index_params={"nprobe": 2})
    model.build_memory(make_pixel_dataset(200, seed=0), batch_size=100)
    with torch.no_grad():
        scores = model(pixel_values=query_pixels).scores
    model.save_pretrained(tmp_path / "saved")
    keys = model.memory.keys.numpy()
    permuted = keys[np.random.default_rng(0).permutation(len(keys))]
    FaissIndex(torch.from_numpy(permuted), "IVF4,Flat").save(str(tmp_path / "saved" / INDEX_FILE))
    # Precondition: used, that index changes the scores (ids point at other entries' residuals).
    check = copy.deepcopy(model)
    check.memory.attach_index(FaissIndex.load(str(tmp_path / "saved" / INDEX_FILE), "IVF4,Flat"))
    with torch.no_grad():
        assert not torch.allclose(check(pixel_values=query_pixels).scores, scores)

    with pytest.warns(UserWarning, match=IGNORED.format(name=INDEX_FILE, reason="SHA-256 differs")):
        loaded = ResMemWrapper.from_pretrained(tmp_path / "saved")
    assert loaded.memory._index is None
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=query_pixels).scores, scores)


def test_forty_single_byte_flips_are_never_used(saved, tmp_path):
    folder, queries, reference = saved
    data = (folder / INDEX_FILE).read_bytes()
    rng = np.random.default_rng(1234)
    outcomes = {}
    for position in rng.choice(len(data), size=40, replace=False).tolist():
        flipped = bytearray(data)
        flipped[position] ^= int(rng.integers(1, 256))
        path = tmp_path / f"flip{position}.faiss"
        path.write_bytes(bytes(flipped))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                memory = _load(folder, path)
            except MemoryFileError:
                outcomes[position] = "refused"
                continue
        unused = memory._index is None  # before the search below builds one
        warned = any("Ignoring the saved search index" in str(w.message) and str(path) in str(w.message) for w in caught)
        same = torch.allclose(_residual(memory, queries), reference, atol=1e-6)
        outcomes[position] = ("rebuilt" if unused and warned else "used") + ("" if same else ", CHANGED predictions")
    assert all(o in ("refused", "rebuilt") for o in outcomes.values()), outcomes


def test_huge_nlist_edit_is_refused_before_faiss_allocates(saved, tmp_path):
    folder, queries, reference = saved
    data = bytearray((folder / INDEX_FILE).read_bytes())
    # IndexIVFFlat layout: fourcc(4) d(4) ntotal(8) dummy(8) dummy(8) is_trained(1) metric(4), then nlist (size_t).
    assert data[:4] == b"IwFl" and struct.unpack_from("<Q", data, 37)[0] == 16
    struct.pack_into("<Q", data, 37, 2**40)
    path = tmp_path / "huge.faiss"
    path.write_bytes(bytes(data))
    started = time.perf_counter()
    with pytest.warns(UserWarning, match=IGNORED.format(name="huge.faiss", reason="SHA-256 differs")):
        memory = _load(folder, path)
    assert time.perf_counter() - started < 5.0 and memory._index is None
    torch.testing.assert_close(_residual(memory, queries), reference)


def test_index_without_a_record_is_not_used(saved, tmp_path):
    """An index saved before the record existed (or with it stripped) is rebuilt, not trusted."""
    folder, queries, reference = saved
    shutil.copytree(folder, tmp_path / "old")
    _edit_metadata(tmp_path / "old" / MEMORY_FILE, lambda m: [m.pop(key) for key in ("index_sha256", "index_bytes")])
    with pytest.warns(UserWarning, match=IGNORED.format(name=INDEX_FILE, reason="no checksum record")):
        memory = _load(tmp_path / "old", tmp_path / "old" / INDEX_FILE)
    assert memory._index is None
    torch.testing.assert_close(_residual(memory, queries), reference)


def test_malformed_index_matching_its_record_raises_memory_file_error(saved, tmp_path):
    """A record rewritten to match a malformed file gets it to faiss; faiss's error becomes a MemoryFileError."""
    from resmem.index import file_sha256

    folder, _, _ = saved
    shutil.copytree(folder, tmp_path / "bad")
    index_path = tmp_path / "bad" / INDEX_FILE
    data = index_path.read_bytes()
    index_path.write_bytes(data[: len(data) // 2])

    def match_record(metadata):
        metadata["index_sha256"], metadata["index_bytes"] = file_sha256(str(index_path)), str(len(data) // 2)

    _edit_metadata(tmp_path / "bad" / MEMORY_FILE, match_record)
    with pytest.raises(MemoryFileError, match=rf"search index {index_path} cannot be read by faiss.*Delete the index file.*rebuilt from the memory's keys"):
        _load(tmp_path / "bad", index_path)


def test_faiss_load_of_garbage_raises_memory_file_error(tmp_path):
    (tmp_path / "garbage.faiss").write_bytes(b"IwFl" + bytes(50))
    for mmap in (True, False):
        with pytest.raises(MemoryFileError, match="Delete the index file"):
            FaissIndex.load(str(tmp_path / "garbage.faiss"), SPEC, mmap=mmap)


def test_on_disk_memory_ignores_an_index_over_other_keys_and_rebuilds_it(tmp_path):
    keys, logits, labels, queries = _clustered(n=1000)
    with MemoryWriter(str(tmp_path / "m"), fingerprint="synthetic", layer="none", shard_size=400) as writer:
        writer.add(keys, logits, labels)
    disk = OnDiskMemory.open(str(tmp_path / "m"))
    reference = disk.residual_for(queries, K, 1.0, 1.0, SPEC, PARAMS)  # trains the index (kept in the cache)
    os.makedirs(tmp_path / "saved")
    disk.save_folder(str(tmp_path / "saved"))  # the index goes beside the shards with its record
    manifest = json.loads((tmp_path / "saved" / MANIFEST_FILE).read_text())
    assert manifest["index_sha256"] == hashlib.sha256((tmp_path / "saved" / INDEX_FILE).read_bytes()).hexdigest()

    permuted = keys[torch.randperm(len(keys), generator=torch.Generator().manual_seed(0))]
    FaissIndex(permuted, SPEC).save(str(tmp_path / "saved" / INDEX_FILE))
    files = {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()}
    with pytest.warns(UserWarning, match=IGNORED.format(name=INDEX_FILE, reason="SHA-256 differs")):
        reopened = OnDiskMemory.open(str(tmp_path / "saved"))
    assert reopened._index is None
    torch.testing.assert_close(reopened.residual_for(queries, K, 1.0, 1.0, SPEC, PARAMS), reference)
    # The rebuilt index is never written into the opened folder: the bad file stays ignored.
    assert {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()} == files
    with pytest.warns(UserWarning, match="SHA-256 differs"):
        OnDiskMemory.open(str(tmp_path / "saved"))
