"""`index="auto"` by measured cost and quality (resmem.index_choice wired into tune, build, forward, save/load, card).

Quality numbers are checked against an independent numpy computation: exact neighbours by brute force,
the candidate's neighbours from a separate raw faiss search, ResMem predictions (paper eq. 3) in numpy.
The speed test is switched off (`MIN_SPEEDUP = 0`) where a test needs a choice, so no assertion depends on timing.
"""

from __future__ import annotations

import datasets
import faiss
import numpy as np
import pytest
import torch

import resmem.index_choice as ic
from resmem import ResMemWrapper
from resmem.index import build_index
from resmem.records import current_settings, measured_at_current_settings

from conftest import make_base

K_GRID, SIGMAS, T = [4, 8], [0.05, 0.2], 1.0
CANDIDATES = [("IVF32,Flat", {"nprobe": 1}), ("IVF32,Flat", {"nprobe": 4}), ("IVF32,Flat", {"nprobe": 32})]


def _clustered(n: int, seed: int, centres: np.ndarray) -> datasets.Dataset:
    """Images = one of the cluster patterns + noise; label = cluster % 5 (a random base gets many wrong)."""
    rng = np.random.default_rng(seed)
    c = rng.integers(0, len(centres), n)
    pixels = centres[c] + 0.3 * rng.standard_normal((n, 3, 16, 16)).astype(np.float32)
    return datasets.Dataset.from_dict({"pixel_values": pixels, "label": (c % 5).astype(np.int64)})


@pytest.fixture
def setup(monkeypatch):
    monkeypatch.setattr(ic, "AUTO_MEASURE_MIN_ENTRIES", 0)  # measure this small memory
    monkeypatch.setattr(ic, "MIN_SPEEDUP", 0.0)  # choose on quality alone: no assertion depends on timing
    monkeypatch.setattr(ic, "default_candidates", lambda n, d: list(CANDIDATES))
    centres = np.random.default_rng(0).standard_normal((30, 3, 16, 16)).astype(np.float32)
    train, val = _clustered(1500, 1, centres), _clustered(300, 2, centres)
    model = ResMemWrapper.from_base(make_base("handwritten", seed=0), k=8, sigma=0.1, temperature=T)
    model.build_memory(train, batch_size=500, progress=False)
    return model, train, val


def _numpy_predictions(keys, logits, labels, ids, queries, base_logits, k, sigma, temperature):
    """ResMem argmax from neighbour ids `(V, k)`: distances recomputed, sorted, softmax(-d/sigma) weights."""
    d = np.sqrt(((keys[ids] - queries[:, None, :]) ** 2).sum(-1))  # (V, k)
    order = np.argsort(d, axis=1, kind="stable")
    d, ids = np.take_along_axis(d, order, 1), np.take_along_axis(ids, order, 1)
    w = np.exp(-(d - d[:, :1]) / sigma)
    w /= w.sum(1, keepdims=True)
    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    res = np.eye(logits.shape[1])[labels[ids]] - softmax(logits[ids] / temperature)  # (V, k, C)
    scores = softmax(base_logits / temperature) + (w[:, :, None] * res).sum(1)
    return scores.argmax(-1), ids


def test_tune_measures_on_validation_with_numpy_reference_and_forward_uses_the_choice(setup):
    model, _, val = setup
    assert model.config.index_choice["measured_on"] == "memory (held out)"  # build_memory measured (no validation yet)
    model.tune(val, k=K_GRID, sigma=SIGMAS, temperature=[T], progress=False)
    choice = model.config.index_choice
    assert choice["measured_on"] == "validation" and choice["queries"] == len(val)
    assert (choice["k"], choice["sigma"], choice["temperature"]) == (model.config.k, model.config.sigma, T)
    assert model.config.index == "auto"

    # Independent numpy reference of every quality number.
    mem = model.memory
    keys, logits, labels = mem.keys.numpy(), mem.base_logits.numpy().astype(np.float64), mem.labels.numpy()
    q, q_logits, q_labels, _ = (t.numpy() for t in model.embed_dataset(val, progress=False))
    k, sigma = model.config.k, model.config.sigma
    brute = np.argsort(((q[:, None, :] - keys[None]) ** 2).sum(-1), axis=1, kind="stable")[:, :k]
    exact_pred, exact_ids = _numpy_predictions(keys, logits, labels, brute, q, q_logits, k, sigma, T)
    base_acc = (q_logits.argmax(-1) == q_labels).mean()
    exact_gain = (exact_pred == q_labels).mean() - base_acc
    assert choice["exact_gain"] == pytest.approx(exact_gain, abs=1e-6) and exact_gain > 0.05
    assert choice["base_accuracy"] == pytest.approx(base_acc, abs=1e-6)
    tol = 1.0 / len(val) + 1e-6  # one query may flip on float32 rounding of a tied distance
    for m, (spec, params) in zip(choice["measured"], CANDIDATES):
        index = faiss.index_factory(keys.shape[1], spec)
        index.train(keys)
        index.add(keys)
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", params["nprobe"])
        _, ids = index.search(q, k)
        pred, ids = _numpy_predictions(keys, logits, labels, np.where(ids < 0, 0, ids), q, q_logits, k, sigma, T)
        gain = (pred == q_labels).mean() - base_acc
        assert m["agreement"] == pytest.approx((pred == exact_pred).mean(), abs=tol), m
        assert m["gain"] == pytest.approx(gain, abs=tol) and m["gain_kept"] == pytest.approx(gain / exact_gain, abs=tol / exact_gain)
        assert m["recall"] == pytest.approx((ids[:, :, None] == exact_ids[:, None, :]).any(-1).mean(), abs=tol)
    # The choice: the first candidate keeping >= 99% of exact's predictions and gain.
    first = next(m for m in choice["measured"] if m["agreement"] >= 0.99 and m["gain_kept"] >= 0.99)
    assert (choice["choice"], choice["params"]) == (first["spec"], first["params"]) != ("exact", {})
    assert choice["measured"][0]["agreement"] < 0.99, "nprobe=1 must fail for this test to show a selection"

    # The forward searches once, on the chosen index, and matches a search forced to that index.
    x = torch.from_numpy(np.asarray(val[:64]["pixel_values"], dtype=np.float32))
    with torch.inference_mode():
        model(pixel_values=x[:2])
        index = model.memory._index
        assert index.factory == choice["choice"] and model.memory._index_params == choice["params"]
        calls = []
        search = index.search
        index.search = lambda *a: calls.append(1) or search(*a)
        out = model(pixel_values=x)
        assert len(calls) == 1 and model.memory._index is index
        queries = model.embed_dataset(val.select(range(64)), progress=False)[0]
        forced = model.memory.residual_for(queries, k, sigma, T, choice["choice"], choice["params"])
    torch.testing.assert_close(out.residual, forced)
    # The validation record is the chosen index's own numbers, and says which index.
    record = model.config.evaluations["validation"]
    assert record["search_index"] == f"{choice['choice']}|nprobe={choice['params']['nprobe']}"
    chosen_pred = _numpy_predictions(keys, logits, labels, np.where(ids < 0, 0, ids), q, q_logits, k, sigma, T)[0]
    first_index = faiss.index_factory(keys.shape[1], choice["choice"])
    first_index.train(keys)
    first_index.add(keys)
    faiss.ParameterSpace().set_index_parameter(first_index, "nprobe", choice["params"]["nprobe"])
    chosen_ids = first_index.search(q, k)[1]
    chosen_pred = _numpy_predictions(keys, logits, labels, np.where(chosen_ids < 0, 0, chosen_ids), q, q_logits, k, sigma, T)[0]
    assert record["resmem_accuracy"] == pytest.approx((chosen_pred == q_labels).mean(), abs=tol)
    # Another index than the one measured: the record is not current any more.
    model.config.index = "exact"
    assert not measured_at_current_settings(record, current_settings(model))
    model.config.index = "auto"
    assert measured_at_current_settings(record, current_settings(model))


def test_choice_survives_save_load_and_shows_in_the_card(setup, tmp_path):
    model, _, val = setup
    model.tune(val, k=K_GRID, sigma=SIGMAS, temperature=[T], progress=False)
    x = torch.from_numpy(np.asarray(val[:32]["pixel_values"], dtype=np.float32))
    with torch.inference_mode():
        before = model(pixel_values=x).scores
    model.save_pretrained(tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text()
    assert f"chosen `{model.config.index_choice['choice']}`" in card and "| candidate | speed-up vs exact |" in card
    assert f"search index `{model.config.evaluations['validation']['search_index']}`" in card  # the record says which
    loaded = ResMemWrapper.from_pretrained(tmp_path / "m")
    assert loaded.config.index_choice == model.config.index_choice
    with torch.inference_mode():
        after = loaded(pixel_values=x).scores
    assert loaded.memory._index.factory == model.config.index_choice["choice"]
    torch.testing.assert_close(after, before)
    assert "validation" in loaded.config.evaluations  # still current after the reload


def test_exact_kept_when_nothing_qualifies_or_memory_small(setup, monkeypatch):
    model, train, val = setup
    monkeypatch.setattr(ic, "MIN_SPEEDUP", 1e9)  # no candidate is that much faster
    model.tune(val, k=K_GRID, sigma=SIGMAS, temperature=[T], progress=False)
    assert model.config.index_choice["choice"] == "exact" and model.config.index_choice["params"] == {}
    assert len(model.config.index_choice["measured"]) == len(CANDIDATES)
    with torch.inference_mode():
        model(pixel_values=torch.from_numpy(np.asarray(val[:4]["pixel_values"], dtype=np.float32)))
    assert model.memory._index.exact and "search_index" not in model.config.evaluations["validation"]
    # Below AUTO_MEASURE_MIN_ENTRIES nothing is measured: the size rule (exact) and no record.
    monkeypatch.setattr(ic, "AUTO_MEASURE_MIN_ENTRIES", 10_000)
    model.build_memory(train, batch_size=500, progress=False)
    assert model.config.index_choice is None
    model.tune(val, k=K_GRID, sigma=SIGMAS, temperature=[T], progress=False)
    assert model.config.index_choice is None


def test_rebuild_drops_and_size_change_deactivates_the_choice(setup, monkeypatch):
    model, train, val = setup
    model.tune(val, k=K_GRID, sigma=SIGMAS, temperature=[T], progress=False)
    chosen = model.config.index_choice["choice"]
    assert chosen != "exact"
    model.add_to_memory(train.select(range(300)), batch_size=300)  # +20%: measured on another memory
    x = torch.from_numpy(np.asarray(val[:4]["pixel_values"], dtype=np.float32))
    with torch.inference_mode():
        model(pixel_values=x)
    assert model.memory._index.exact  # the size rule again (exact below 200,000 entries)
    assert "search_index" not in current_settings(model)
    monkeypatch.setattr(ic, "AUTO_MEASURE_MIN_ENTRIES", 10_000)
    model.build_memory(train, batch_size=500, progress=False)
    assert model.config.index_choice is None  # a rebuilt memory drops the old measurement


def test_index_choice_validated_on_assignment():
    model = ResMemWrapper.from_base(make_base("handwritten", seed=0))
    with pytest.raises(ValueError, match="index_choice must be None or the record"):
        model.config.index_choice = {"spec": "IVF16,Flat"}
    with pytest.raises(ValueError, match="model.tune"):
        model.config.index_choice = "exact"
    model.config.index_choice = None


def test_held_out_measurement_matches_numpy_leave_one_out():
    """`measure_index_choice` (build time): each sampled entry's own entry left out, numbers as numpy computes them."""
    from resmem.memory import ResidualMemory

    rng = np.random.default_rng(3)
    n, dim, k, sigma = 2000, 8, 6, 0.5
    centres = rng.standard_normal((25, dim)).astype(np.float32) * 2
    c = rng.integers(0, 25, n)
    keys = centres[c] + rng.standard_normal((n, dim)).astype(np.float32)
    labels = c % 5
    logits = rng.standard_normal((n, 5)).astype(np.float32)
    memory = ResidualMemory()
    memory.set_entries(torch.from_numpy(keys), torch.from_numpy(logits), torch.from_numpy(labels), torch.arange(n), "s", "none")
    candidates = [("IVF16,Flat", {"nprobe": 1}), ("IVF16,Flat", {"nprobe": 16})]
    record = ic.measure_index_choice(memory, k, sigma, T, candidates=candidates, sample=300, seed=4, min_speedup=0)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(4))[:300].numpy()
    q, q_logits, q_labels = keys[pick], logits[pick].astype(np.float64), labels[pick]
    d = ((q[:, None, :] - keys[None]) ** 2).sum(-1)
    d[np.arange(300), pick] = np.inf  # leave the query's own entry out
    brute = np.argsort(d, axis=1, kind="stable")[:, :k]
    exact_pred, exact_ids = _numpy_predictions(keys, logits.astype(np.float64), labels, brute, q, q_logits, k, sigma, T)
    base_acc = (q_logits.argmax(-1) == q_labels).mean()
    assert record["measured_on"] == "memory (held out)" and record["queries"] == 300
    assert record["exact_gain"] == pytest.approx((exact_pred == q_labels).mean() - base_acc, abs=1e-6)
    full = record["measured"][1]  # nprobe = nlist: every list probed, so exact's neighbours
    assert full["recall"] == pytest.approx(1.0) and full["agreement"] == pytest.approx(1.0)
    assert (record["choice"], record["params"]) == (("IVF16,Flat", {"nprobe": 1}) if record["measured"][0]["agreement"] >= 0.99
                                                    and record["measured"][0]["gain_kept"] >= 0.99 else ("IVF16,Flat", {"nprobe": 16}))
    # Leaving the own entry out matters here: with it, every query finds itself first and the gain differs.
    with_self = np.argsort(((q[:, None, :] - keys[None]) ** 2).sum(-1), axis=1, kind="stable")[:, :k]
    self_pred = _numpy_predictions(keys, logits.astype(np.float64), labels, with_self, q, q_logits, k, sigma, T)[0]
    assert abs(((self_pred == q_labels).mean() - base_acc) - record["exact_gain"]) > 0.01
