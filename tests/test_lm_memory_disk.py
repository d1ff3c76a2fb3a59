"""On-disk causal-LM memories: the same entries and scores as the in-RAM memory, from a map-style or a
streaming dataset; memory-mapped, saved and loaded with the model; exact search never loads every key."""

from __future__ import annotations

import json
import os

import datasets
import numpy as np
import pytest
import torch
from lm_helpers import VOCAB, tiny_base, word_tokenizer
from safetensors.numpy import save_file

from resmem import MemoryFileError, ResMemWrapper
from resmem.memory_disk import MANIFEST_FILE, OnDiskMemory, OnDiskTokenMemory, ShardedExactIndex

pytest.importorskip("faiss")

WINDOW, STRIDE = 16, 12
WORDS = VOCAB - 2  # word_tokenizer: words + [UNK] + [PAD] fill the vocabulary


def _texts(n=10, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{t}" for t in rng.integers(0, WORDS, rng.integers(3, 40))) for _ in range(n)]


def _model(**kw):
    return ResMemWrapper.from_base(tiny_base("gpt2"), k=5, sigma=0.5, temperature=1.3, window=WINDOW, stride=STRIDE, **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = word_tokenizer(WORDS)
    texts = _texts()
    ram = _model()
    ram.build_memory(datasets.Dataset.from_dict({"text": texts}), tokenizer=tok, residual_top_m=8, batch_size=3)
    queries = tok(_texts(3, seed=9), return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = ram(**queries).scores
    return tok, texts, ram, queries, expected, tmp_path_factory.mktemp("lmdisk")


def _scores(model, queries):
    with torch.no_grad():
        return model(**queries).scores


def _same_entries(disk, ram):
    in_ram = disk.to_memory()
    for name in ("keys", "values", "indices", "labels", "example_ids", "positions"):
        torch.testing.assert_close(getattr(in_ram, name), getattr(ram, name))
    assert disk.token_metadata() == ram.token_metadata()


@pytest.mark.parametrize("streaming", [False, True])
def test_on_disk_lm_memory_equals_the_in_ram_one(setup, streaming):
    tok, texts, ram, queries, expected, folder = setup
    if streaming:  # a datasets.IterableDataset read once, in order, from a text file
        path = folder / "train.txt"
        path.write_text("\n".join(texts) + "\n")
        data = datasets.load_dataset("text", data_files=str(path), split="train", streaming=True)
        assert isinstance(data, datasets.IterableDataset)
    else:
        data = datasets.Dataset.from_dict({"text": texts})
    disk = _model()
    memory = disk.build_memory_on_disk(
        data, str(folder / f"mem{streaming}"), tokenizer=tok, residual_top_m=8, batch_size=3, shard_size=37
    )
    assert isinstance(memory, OnDiskTokenMemory) and disk.memory is memory
    assert len(memory) == len(ram.memory) and len(memory.shards) == -(-len(memory) // 37)
    _same_entries(memory, ram.memory)
    disk.config.index = "exact"
    torch.testing.assert_close(_scores(disk, queries), expected)
    assert isinstance(memory._index, ShardedExactIndex)  # scans the shards; no faiss flat copy of the keys
    disk.config.index, disk.config.index_params = "IVF4,Flat", {"nprobe": 4}  # every list probed: exact again
    torch.testing.assert_close(_scores(disk, queries), expected)
    assert memory._index.mmapped


def test_saved_on_disk_lm_memory_loads_memory_mapped(setup):
    tok, texts, ram, queries, expected, folder = setup
    disk = _model()
    disk.build_memory_on_disk(texts, str(folder / "to-save"), tokenizer=tok, residual_top_m=8, shard_size=50)
    disk.config.index = "exact"
    disk.save_pretrained(folder / "saved")
    assert MANIFEST_FILE in os.listdir(folder / "saved")
    loaded = ResMemWrapper.from_pretrained(folder / "saved", tokenizer=tok)
    assert isinstance(loaded.memory, OnDiskTokenMemory) and loaded.memory.top_m == 8 and loaded.memory.temperature == 1.3
    assert loaded.memory.tokenizer_hash == ram.memory.tokenizer_hash and loaded.memory.window == WINDOW
    torch.testing.assert_close(_scores(loaded, queries), expected)
    loaded.config.residual_temperature = 1.0
    with pytest.raises(ValueError, match="residuals were computed at temperature T=1.3"):
        _scores(loaded, queries)


def test_dense_lm_memory_on_disk(setup):
    tok, texts, _, queries, _, folder = setup
    ram = _model()
    ram.build_memory(texts[:4], tokenizer=tok, residual_top_m=None)
    disk = _model()
    disk.build_memory_on_disk(texts[:4], str(folder / "dense"), tokenizer=tok, residual_top_m=None, shard_size=20)
    assert disk.memory.dense and "indices" not in disk.memory.shards[0].offsets
    assert disk.memory.bytes_per_entry() == ram.memory.bytes_per_entry()
    for model in (ram, disk):
        model.config.index = "exact"
    torch.testing.assert_close(_scores(disk, queries), _scores(ram, queries))


def test_kind_mismatch_and_existing_folder_are_refused(setup, tmp_path):
    tok, texts, _, _, _, folder = setup
    disk = _model()
    disk.build_memory_on_disk(texts[:2], str(tmp_path / "m"), tokenizer=tok)
    with pytest.raises(ValueError, match="already holds a memory"):
        disk.build_memory_on_disk(texts[:2], str(tmp_path / "m"), tokenizer=tok)
    from resmem.memory_disk import OnDiskClassifierMemory

    with pytest.raises(MemoryFileError, match="holds a token memory"):
        OnDiskClassifierMemory.open(str(tmp_path / "m"))


def test_folder_written_by_the_previous_writer_still_loads(tmp_path):
    """A classifier memory folder in the layout of the first release (safetensors' own writer, no `fields`)."""
    rng = np.random.default_rng(0)
    keys, logits = rng.standard_normal((30, 4)).astype(np.float32), rng.standard_normal((30, 3)).astype(np.float32)
    labels, ids = rng.integers(0, 3, 30), np.arange(30)
    shards = []
    for s, start in enumerate(range(0, 30, 16)):
        name = f"resmem_memory-{s:05d}.safetensors"
        sl = slice(start, start + 16)
        meta = {"format": "resmem-memory", "format_version": "1", "build_id": "b" * 32, "shard": str(s)}
        save_file({"keys": keys[sl], "base_logits": logits[sl], "labels": labels[sl], "example_ids": ids[sl]},
                  str(tmp_path / name), metadata=meta)
        shards.append({"file": name, "num_entries": len(keys[sl])})
    manifest = {"format": "resmem-memory", "format_version": "1", "build_id": "b" * 32, "num_entries": 30, "dim": 4,
                "num_classes": 3, "fingerprint": "x", "layer": "l", "shards": shards}
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    memory = OnDiskMemory.open(str(tmp_path))
    assert len(memory) == 30 and torch.equal(memory.example_ids, torch.arange(30))
    ram = memory.to_memory()
    q = torch.from_numpy(keys[:5])
    torch.testing.assert_close(memory.residual_for(q, 3, 1.0, 1.2, "exact"), ram.residual_for(q, 3, 1.0, 1.2, "exact"))


def test_sharded_exact_index_and_strided_reads_across_blocks_and_shards(tmp_path):
    from resmem.memory_disk import MemoryWriter

    rng = np.random.default_rng(4)
    keys = rng.standard_normal((500, 6)).astype(np.float32)
    with MemoryWriter(str(tmp_path / "m"), shard_size=70) as writer:
        writer.add(keys, rng.standard_normal((500, 3)), rng.integers(0, 3, 500))
    memory = OnDiskMemory.open(str(tmp_path / "m"))
    rows = memory.rows("keys")
    np.testing.assert_array_equal(rows[::7], keys[::7])  # >= 64 rows: the block-wise strided path
    np.testing.assert_array_equal(rows._strided(np.arange(3, 500, 11), block_rows=16), keys[3::11])
    index = ShardedExactIndex(rows, block_rows=45)  # blocks that straddle shard boundaries
    queries = torch.from_numpy(rng.standard_normal((9, 6)).astype(np.float32))
    distances, ids = index.search(queries, 12)
    d = np.sqrt(((queries.numpy()[:, None] - keys[None]) ** 2).sum(-1))  # (9, 500) numpy brute force
    np.testing.assert_array_equal(ids.numpy(), np.argsort(d, axis=1, kind="stable")[:, :12])
    np.testing.assert_allclose(distances.numpy(), np.sort(d, axis=1)[:, :12], rtol=1e-4, atol=1e-4)


def _rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    pytest.skip("no /proc/self/status RssAnon on this system")


def test_exact_search_of_an_on_disk_memory_does_not_keep_the_keys_in_ram(tmp_path):
    """faiss's flat index would copy all 48 MiB of keys into private memory; the shard scan keeps none."""
    from resmem.memory_disk import MemoryWriter

    n, dim = 48 * 1024, 256
    rng = np.random.default_rng(0)
    with MemoryWriter(str(tmp_path / "m"), shard_size=16 * 1024) as writer:
        for _ in range(3):
            writer.add(rng.standard_normal((n // 3, dim), dtype=np.float32), np.zeros((n // 3, 2), np.float32), np.zeros(n // 3, np.int64))
    memory = OnDiskMemory.open(str(tmp_path / "m"))
    queries = torch.from_numpy(rng.standard_normal((4, dim), dtype=np.float32))
    before = _rss_anon_bytes()
    distances, ids = memory.search(queries, 5, "exact")
    grown = _rss_anon_bytes() - before
    assert ids.shape == (4, 5) and isinstance(memory._index, ShardedExactIndex)
    assert grown < n * dim * 4 // 4, f"exact search kept {grown / 2**20:.1f} MiB of private memory"
