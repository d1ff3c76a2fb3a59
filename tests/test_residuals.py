"""The pure ResMem math (`resmem.residuals`, `ResidualMemory` search) against numpy and hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import np_knn, np_resmem, np_residuals, np_softmax

from resmem import index as index_module
from resmem.memory import ResidualMemory
from resmem.residuals import neighbour_weights, residuals, resmem_scores, scores_to_logits, weighted_residual


def _rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_residuals_match_numpy(temperature):
    rng = _rng(1)
    logits = rng.standard_normal((17, 6)) * 3
    labels = rng.integers(0, 6, 17)
    got = residuals(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels), temperature)
    assert got.shape == (17, 6) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), np_residuals(logits, labels, temperature), atol=1e-6)
    # Each residual row sums to 0 and is positive only at the label.
    np.testing.assert_allclose(got.sum(-1).numpy(), 0, atol=1e-6)
    assert (got.argmax(-1).numpy() == labels).all()


def test_residuals_do_not_modify_inputs():
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    residuals(logits, torch.tensor([0, 1, 2, 0]), 1.0)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("sigma", [1e-3, 0.5, 4.0])
def test_neighbour_weights_match_numpy(sigma):
    d = np.sort(_rng(2).uniform(0, 3, (5, 7)), axis=1)
    got = neighbour_weights(torch.tensor(d, dtype=torch.float32), sigma).numpy()
    e = np.exp(-(d - d.min(axis=1, keepdims=True)) / sigma)
    np.testing.assert_allclose(got, e / e.sum(axis=1, keepdims=True), atol=1e-6)
    assert np.isfinite(got).all()


def test_neighbour_weights_do_not_underflow():
    # exp(-1000 / 1e-3) is 0 in any float format; a softmax still gives weight 1 to the nearest.
    got = neighbour_weights(torch.tensor([[1000.0, 1001.0, 1005.0]]), 1e-3)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), [[1.0, 0.0, 0.0]], atol=1e-12)


def test_weighted_residual_and_scores_match_numpy():
    rng = _rng(3)
    w = np_softmax(rng.standard_normal((4, 5)))
    r = rng.standard_normal((4, 5, 3))
    base = rng.standard_normal((4, 3))
    expected = np.stack([sum(w[b, i] * r[b, i] for i in range(5)) for b in range(4)])  # explicit loop
    got = weighted_residual(torch.tensor(w, dtype=torch.float32), torch.tensor(r, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    scores = resmem_scores(torch.tensor(base, dtype=torch.float32), got, 1.7)
    np.testing.assert_allclose(scores.numpy(), np_softmax(base / 1.7) + expected, atol=1e-6)


# ------------------------------------------------------------------ hand-computed 3-point example
# Keys z1 = (1, 0), z2 = (-4, 0), z3 = (3, 4); query at the origin -> distances 1, 4, 5.
# sigma = 1 / ln 2, so exp(-d / sigma) = 2^-d = 16/32, 2/32, 1/32 -> weights 16/19, 2/19, 1/19.
# Memory logits (0, 0), (ln 3, 0), (0, 0) with labels 0, 1, 0 and T = 1:
#   r1 = (1, 0) - (1/2, 1/2)  = ( 1/2, -1/2)
#   r2 = (0, 1) - (3/4, 1/4)  = (-3/4,  3/4)
#   r3 = ( 1/2, -1/2)
#   k=3: r = 16/19 r1 + 2/19 r2 + 1/19 r3 = (8 - 3/2 + 1/2)/19 (1, -1) = (7/19, -7/19)
#   k=2: weights 8/9, 1/9 -> r = (4 - 3/4)/9 (1, -1) = (13/36, -13/36)
# Query logits (0, ln 3): softmax = (1/4, 3/4), so the base predicts class 1;
#   k=3 scores = (1/4 + 7/19, 3/4 - 7/19) = (47/76, 29/76)  -> ResMem predicts class 0
#   k=2 scores = (1/4 + 13/36, 3/4 - 13/36) = (11/18, 7/18)
HAND_KEYS = [[1.0, 0.0], [-4.0, 0.0], [3.0, 4.0]]
HAND_LOGITS = [[0.0, 0.0], [math.log(3), 0.0], [0.0, 0.0]]
HAND_LABELS = [0, 1, 0]
HAND_QUERY_LOGITS = [[0.0, math.log(3)]]


def _hand_memory():
    memory = ResidualMemory()
    memory.set_entries(
        torch.tensor(HAND_KEYS),
        torch.tensor(HAND_LOGITS),
        torch.tensor(HAND_LABELS),
        torch.arange(3),
        fingerprint="hand",
        layer="x",
    )
    return memory


@pytest.mark.parametrize("use_faiss", [True, False], ids=["faiss", "torch"])
@pytest.mark.parametrize(
    "k, expected_distances, expected_residual, expected_scores",
    [
        (3, [1.0, 4.0, 5.0], [7 / 19, -7 / 19], [47 / 76, 29 / 76]),
        (2, [1.0, 4.0], [13 / 36, -13 / 36], [11 / 18, 7 / 18]),
    ],
)
def test_hand_computed_three_points(monkeypatch, use_faiss, k, expected_distances, expected_residual, expected_scores):
    if not use_faiss:
        monkeypatch.setattr(index_module, "is_faiss_available", lambda: False)
    elif not index_module.is_faiss_available():
        pytest.skip("faiss not installed")
    memory = _hand_memory()
    query = torch.zeros(1, 2)
    distances, ids = memory.search(query, k)
    np.testing.assert_allclose(distances.numpy(), [expected_distances], atol=1e-6)  # plain, not squared
    assert ids.tolist() == [list(range(k))]
    residual = memory.residual_for(query, k=k, sigma=1 / math.log(2), temperature=1.0)
    np.testing.assert_allclose(residual.numpy(), [expected_residual], atol=1e-6)
    scores = resmem_scores(torch.tensor(HAND_QUERY_LOGITS), residual, 1.0)
    np.testing.assert_allclose(scores.numpy(), [expected_scores], atol=1e-6)
    assert scores.argmax().item() == 0  # the base alone predicts class 1


@pytest.mark.parametrize("use_faiss", [True, False], ids=["faiss", "torch"])
def test_memory_search_matches_numpy_brute_force(monkeypatch, use_faiss):
    if not use_faiss:
        monkeypatch.setattr(index_module, "is_faiss_available", lambda: False)
    rng = _rng(4)
    keys, logits, labels = rng.standard_normal((50, 8)), rng.standard_normal((50, 4)), rng.integers(0, 4, 50)
    queries = rng.standard_normal((6, 8))
    memory = ResidualMemory()
    memory.set_entries(
        torch.tensor(keys, dtype=torch.float32),
        torch.tensor(logits, dtype=torch.float32),
        torch.tensor(labels),
        torch.arange(50),
        fingerprint="x",
        layer="x",
    )
    q = torch.tensor(queries, dtype=torch.float32)
    for k in (1, 7, 50):
        distances, ids = memory.search(q, k)
        ref_d, ref_ids = np_knn(queries, keys, k)
        assert (ids.numpy() == ref_ids).all()
        np.testing.assert_allclose(distances.numpy(), ref_d, atol=1e-5)
        for sigma, t in ((0.5, 1.0), (2.0, 0.7)):
            got = memory.residual_for(q, k, sigma, t)
            _, ref_r = np_resmem(queries, np.zeros((6, 4)), keys, logits, labels, k, sigma, t)
            np.testing.assert_allclose(got.numpy(), ref_r, atol=1e-5)


# ------------------------------------------------------------------ scores -> logits
def test_scores_to_logits_is_a_log_distribution_with_the_same_argmax():
    rng = _rng(5)
    # Scores as ResMem produces them: they sum to 1 but may be negative.
    scores = np_softmax(rng.standard_normal((200, 7))) + 0.6 * (np.eye(7)[rng.integers(0, 7, 200)] - 1 / 7)
    assert (scores < 0).any()
    floor = 1e-8
    logits = scores_to_logits(torch.tensor(scores, dtype=torch.float32), floor)
    p = logits.double().exp().numpy()
    assert np.isfinite(logits.numpy()).all()
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    assert (p > 0).all()
    assert (logits.argmax(-1).numpy() == scores.argmax(-1)).all()
    clamped = np.maximum(scores, floor)
    np.testing.assert_allclose(logits.numpy(), np.log(clamped / clamped.sum(-1, keepdims=True)), atol=1e-4)


def test_scores_to_logits_is_log_of_a_proper_distribution():
    p = np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    logits = scores_to_logits(torch.tensor(p, dtype=torch.float32), 1e-8)
    np.testing.assert_allclose(logits.numpy(), np.log(p), atol=1e-6)
