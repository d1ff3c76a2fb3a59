"""Index backends: plain L2 everywhere, approximate vs exact agreement, parameters, re-ranking, saved indexes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import make_base, make_pixel_dataset

from resmem import MemoryFileError, ResidualMemory, ResMemWrapper
from resmem.hub import INDEX_FILE
from resmem.index import FaissIndex, TorchExactIndex, build_index, faiss_gpu_count, resolve_spec
from resmem.residuals import resmem_scores

faiss = pytest.importorskip("faiss")


def clustered_task(n=20_000, dim=16, clusters=200, classes=10, queries=1_000, seed=0):
    """Keys in Gaussian clusters, each cluster one class; the 'base model' is wrong on a third of the clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32) * 4
    cluster_label = rng.integers(0, classes, clusters)
    wrong = rng.random(clusters) < 1 / 3

    def sample(m):
        c = rng.integers(0, clusters, m)
        x = centres[c] + rng.standard_normal((m, dim)).astype(np.float32)
        y = cluster_label[c]
        base_pred = np.where(wrong[c], (y + 1) % classes, y)
        logits = np.eye(classes, dtype=np.float32)[base_pred] * 3 + rng.standard_normal((m, classes)).astype(np.float32) * 0.3
        return torch.from_numpy(x), torch.from_numpy(logits), torch.from_numpy(y)

    memory = ResidualMemory()
    keys, logits, labels = sample(n)
    memory.set_entries(keys, logits, labels, torch.arange(n), fingerprint="synthetic", layer="none")
    return memory, sample(queries)


def predictions(memory, queries, spec, params=None, k=20):
    keys, logits, _ = queries
    residual = memory.residual_for(keys, k, 1.0, 1.0, spec, params)
    return resmem_scores(logits, residual, 1.0).argmax(-1)


@pytest.fixture(scope="module")
def task():
    return clustered_task()


@pytest.mark.parametrize("spec,params", [("HNSW32", {"efSearch": 64}), ("IVF64,Flat", {"nprobe": 8})])
def test_approximate_index_agrees_with_exact_on_20k_clustered_keys(task, spec, params):
    memory, queries = task
    exact = predictions(memory, queries, "exact")
    approx = predictions(memory, queries, spec, params)
    assert (approx == exact).float().mean().item() >= 0.99
    # The memory helps on this task (the base model is wrong on a third of the clusters).
    y = queries[2]
    assert (exact == y).float().mean() > (queries[1].argmax(-1) == y).float().mean() + 0.2


def test_every_backend_returns_plain_l2_distances():
    g = torch.Generator().manual_seed(0)
    keys, queries = torch.randn(500, 8, generator=g), torch.randn(7, 8, generator=g)
    true = torch.cdist(queries, keys)  # (7, 500) plain L2
    ref_d, ref_i = true.topk(5, largest=False)
    for index in (build_index(keys, "exact"), TorchExactIndex(keys), FaissIndex(keys, "HNSW16")):
        d, i = index.search(queries, 5)
        assert torch.equal(i, ref_i), type(index)
        torch.testing.assert_close(d, ref_d, atol=1e-4, rtol=1e-4)


def test_auto_is_exact_for_small_memories_and_ivf_for_large():
    assert resolve_spec("auto", 1_000) == "exact"
    assert resolve_spec("auto", 199_999) == "exact"
    assert resolve_spec("auto", 1_000_000) == "IVF4096,Flat"
    assert resolve_spec("HNSW32", 10) == "HNSW32"
    assert build_index(torch.randn(50, 4), "auto").exact


def test_rejected_factory_string_has_faiss_message_and_ours():
    with pytest.raises(ValueError, match=r"faiss rejected the index factory string 'IVFbogus'.*valid faiss factory"):
        build_index(torch.randn(100, 4), "IVFbogus")


def test_bad_search_parameter_names_the_fix():
    with pytest.raises(ValueError, match="does not accept the search parameter efSearch"):
        build_index(torch.randn(200, 4), "IVF4,Flat", {"efSearch": 3})
    build_index(torch.randn(200, 4), "exact", {"nprobe": 3})  # exact search ignores them (index="auto" may pick it)


def test_ivfpq_rerank_recovers_exact_neighbours():
    memory, queries = clustered_task(n=4_000, clusters=40, queries=100)
    keys = queries[0]
    exact_d, exact_i = memory.search(keys, 10, "exact")
    plain_d, plain_i = memory.search(keys, 10, "IVF8,PQ4x4", {"nprobe": 8})
    rerank_d, rerank_i = memory.search(keys, 10, "IVF8,PQ4x4", {"nprobe": 8, "rerank_factor": 20})

    def recall(ids):
        return np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(ids, exact_i)])

    assert recall(rerank_i) >= 0.95 > recall(plain_i)
    torch.testing.assert_close(rerank_d, (memory.keys[rerank_i] - keys[:, None]).norm(dim=-1))  # exact distances


def test_index_params_on_config_take_effect_at_next_forward(query_pixels):
    model = ResMemWrapper.from_base(make_base("resnet"), k=3, index="IVF4,Flat")
    model.build_memory(make_pixel_dataset(200, seed=0), batch_size=100)
    model.config.index_params = {"nprobe": 1}
    with torch.no_grad():
        model(pixel_values=query_pixels)
    assert model.memory._index.index.nprobe == 1
    model.config.index_params = {"nprobe": 4}
    with torch.no_grad():
        model(pixel_values=query_pixels)
    assert model.memory._index.index.nprobe == 4


def _ivf_model(query_pixels):
    model = ResMemWrapper.from_base(make_base("resnet"), k=3, index="IVF4,Flat", index_params={"nprobe": 2})
    model.build_memory(make_pixel_dataset(200, seed=0), batch_size=100)
    with torch.no_grad():
        scores = model(pixel_values=query_pixels).scores
    return model, scores


def test_trained_index_is_saved_and_memory_mapped_at_load(tmp_path, query_pixels):
    model, scores = _ivf_model(query_pixels)
    model.save_pretrained(tmp_path / "saved")
    assert os.path.isfile(tmp_path / "saved" / INDEX_FILE)
    loaded = ResMemWrapper.from_pretrained(tmp_path / "saved")
    assert isinstance(loaded.memory._index, FaissIndex) and loaded.memory._index.mmapped
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=query_pixels).scores, scores)
    # Editing a memory whose index is memory-mapped (read-only in faiss) rebuilds the index instead.
    loaded.add_to_memory(make_pixel_dataset(5, seed=9), batch_size=5)
    with torch.no_grad():
        loaded(pixel_values=query_pixels)
    assert len(loaded.memory._index) == 205


def test_exact_index_writes_no_index_file(tmp_path, query_pixels):
    model = ResMemWrapper.from_base(make_base("resnet"), k=3)
    model.build_memory(make_pixel_dataset(20, seed=0), batch_size=20)
    with torch.no_grad():
        model(pixel_values=query_pixels)
    model.save_pretrained(tmp_path / "saved")
    assert not os.path.exists(tmp_path / "saved" / INDEX_FILE)


@pytest.mark.parametrize("mismatch", ["dimension", "entries"])
def test_saved_index_disagreeing_with_keys_is_not_used(tmp_path, query_pixels, mismatch):
    """An index file from another save is never read: a warning names it and the index is rebuilt from the keys."""
    model, scores = _ivf_model(query_pixels)
    model.save_pretrained(tmp_path / "saved")
    keys = model.memory.keys.numpy()
    other = keys[:, :-1] if mismatch == "dimension" else keys[:150]
    FaissIndex(torch.from_numpy(np.ascontiguousarray(other)), "IVF4,Flat").save(str(tmp_path / "saved" / INDEX_FILE))
    with pytest.warns(UserWarning, match=f"Ignoring the saved search index .*{INDEX_FILE}.*rebuilt from the memory's keys"):
        loaded = ResMemWrapper.from_pretrained(tmp_path / "saved")
    assert loaded.memory._index is None
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=query_pixels).scores, scores)
    # attach_index itself still refuses an index that does not cover the keys.
    with pytest.raises(MemoryFileError, match="come from different saves"):
        loaded.memory.attach_index(FaissIndex.load(str(tmp_path / "saved" / INDEX_FILE), "IVF4,Flat"))


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["exact", "IVF64,Flat"])
def test_gpu_search_matches_cpu(task, spec):
    memory, queries = task
    cpu = predictions(memory, queries, spec, {"nprobe": 64} if spec != "exact" else None)
    memory.to("cuda")
    try:
        gpu = predictions(memory, tuple(q.cuda() for q in queries), spec, {"nprobe": 64} if spec != "exact" else None)
        if faiss_gpu_count():
            assert memory._index.on_gpu
        else:
            assert isinstance(memory._index, TorchExactIndex) or spec != "exact"
    finally:
        memory.to("cpu")
    assert (gpu.cpu() == cpu).float().mean().item() >= 0.999
