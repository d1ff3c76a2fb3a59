"""The fast causal-LM paths against independent numpy references and the plain expressions.

`resmem_scores_and_logits` (chunked, scatter straight into the softmax), `sparse_weighted_residual(out=, rows=)`,
the in-place `scores_to_logits` / `mixture_log_probs`, `output_residual=False`, and the sparse tuning statistics.
"""

import numpy as np
import pytest
import torch
from lm_helpers import VOCAB, distinct_sequences, tiny_base
from reference import np_softmax

from resmem import ResMemWrapper
from resmem.residuals import (
    mixture_log_probs,
    resmem_scores,
    resmem_scores_and_logits,
    scores_to_logits,
    sparse_weighted_residual,
)

N, K, M, V = 9, 5, 8, 40  # m * k = 40 = V: many duplicate columns per row


def _rng(seed):
    return np.random.default_rng(seed)


def _sparse_inputs(seed=0, zero_rows=(2,)):
    rng = _rng(seed)
    logits = rng.standard_normal((N, V)) * 2.0
    weights = np_softmax(rng.standard_normal((N, K)))
    weights[list(zero_rows)] = 0.0  # positions without a search
    values = (rng.standard_normal((N, K, M)) * 0.3).astype(np.float16).astype(np.float64)  # exact in float16
    indices = rng.integers(0, V, (N, K, M))
    return logits, weights, values, indices


def _np_dense_residual(weights, values, indices):
    """`sum_i w_i r_i` with the sparse rows expanded by `np.add.at` (duplicates summed), float64."""
    r = np.zeros((weights.shape[0], V))
    rows = np.repeat(np.arange(weights.shape[0]), K * M)
    np.add.at(r, (rows, indices.reshape(-1)), (weights[:, :, None] * values).reshape(-1))
    return r


def _t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


@pytest.mark.parametrize("temperature", [1.0, 1.3])
@pytest.mark.parametrize("distribution, lam", [("clamp", 0.0), ("mixture", 0.3)])
@pytest.mark.parametrize("chunk_rows", [1, 4, None])
def test_scores_and_logits_match_numpy(temperature, distribution, lam, chunk_rows):
    logits, weights, values, indices = _sparse_inputs()
    floor = 1e-8
    scores, out = resmem_scores_and_logits(
        _t(logits), _t(weights), _t(values, torch.float16), _t(indices, torch.int32), temperature, distribution,
        floor, lam, chunk_rows=chunk_rows,
    )
    ref_scores = np_softmax(logits / temperature) + _np_dense_residual(weights, values, indices)
    assert (ref_scores < 0).any()  # the clamp matters
    np.testing.assert_allclose(scores.numpy(), ref_scores, atol=1e-6)
    if distribution == "clamp":
        c = np.maximum(ref_scores, floor)
        ref = np.log(c / c.sum(-1, keepdims=True))
    else:
        pos = np.maximum(ref_scores, 0)
        ref = np.log(np.maximum((1 - lam) * pos / pos.sum(-1, keepdims=True) + lam * np_softmax(logits), 1e-30))
    # Probabilities agree to float32 precision; log-probabilities wherever the probability is not tiny.
    np.testing.assert_allclose(np.exp(out.double().numpy()), np.exp(ref), atol=1e-6)
    big = np.exp(ref) > 1e-4
    np.testing.assert_allclose(out.numpy()[big], ref[big], atol=1e-5)
    # The dense residual, when asked, is bitwise the plain scatter-add into zeros; the outputs do not change.
    residual = torch.full((N, V), float("nan"))
    again = resmem_scores_and_logits(
        _t(logits), _t(weights), _t(values, torch.float16), _t(indices, torch.int32), temperature, distribution,
        floor, lam, chunk_rows=chunk_rows, residual=residual,
    )
    plain = sparse_weighted_residual(_t(weights), _t(values, torch.float16), _t(indices, torch.int32), V)
    assert torch.equal(residual, plain)
    assert torch.equal(again[0], scores) and torch.equal(again[1], out)
    # A position without neighbours keeps the base distribution exactly.
    assert torch.equal(scores[2], torch.softmax(_t(logits[2]) / temperature, -1))


def test_scores_and_logits_match_the_plain_composition_within_1e_6():
    """Same values (within float32 summation order) as the unfused path the forward used before."""
    logits, weights, values, indices = _sparse_inputs(1)
    x, w, vals, idx = _t(logits), _t(weights), _t(values, torch.float16), _t(indices, torch.int32)
    for t in (1.0, 0.7):
        residual = sparse_weighted_residual(w, vals, idx, V)
        plain = resmem_scores(x, residual, t)
        scores, out = resmem_scores_and_logits(x, w, vals, idx, t, "clamp", 1e-8)
        assert (scores - plain).abs().max() <= 1e-6
        assert (out.exp() - scores_to_logits(plain, 1e-8).exp()).abs().max() <= 1e-6
        _, mix = resmem_scores_and_logits(x, w, vals, idx, t, "mixture", 1e-8, 0.4)
        assert (mix.exp() - mixture_log_probs(plain, x, 0.4).exp()).abs().max() <= 1e-6


def test_scores_and_logits_dense_residual_rows():
    logits, weights, _, _ = _sparse_inputs(2)
    dense = _rng(3).standard_normal((N, K, V)) * 0.1
    residual = torch.empty(N, V)
    scores, _ = resmem_scores_and_logits(_t(logits), _t(weights), _t(dense), None, 1.0, residual=residual)
    ref = np_softmax(logits) + np.einsum("nk,nkv->nv", weights, dense)
    np.testing.assert_allclose(scores.numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(residual.numpy(), ref - np_softmax(logits), atol=1e-6)
    with pytest.raises(ValueError, match="'clamp' or 'mixture'"):
        resmem_scores_and_logits(_t(logits), _t(weights), _t(dense), None, 1.0, "softmax")


def test_sparse_weighted_residual_into_rows_of_out():
    _, weights, values, indices = _sparse_inputs(4, zero_rows=())
    w, vals, idx = _t(weights[:3]), _t(values[:3], torch.float16), _t(indices[:3], torch.int32)
    rows = torch.tensor([5, 0, 7])
    out = torch.zeros(N, V)
    got = sparse_weighted_residual(w, vals, idx, V, out=out, rows=rows)
    assert got is out
    ref = np.zeros((N, V))
    ref[[5, 0, 7]] = _np_dense_residual(weights[:3], values[:3], indices[:3])
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-6)
    # Bitwise the residual of the allocating path (same summation order).
    assert torch.equal(out[[5, 0, 7]], sparse_weighted_residual(w, vals, idx, V))
    full = torch.zeros(3, V)
    assert torch.equal(sparse_weighted_residual(w, vals, idx, V, out=full), out[[5, 0, 7]])
    with pytest.raises(ValueError, match="pass `rows`"):
        sparse_weighted_residual(w, vals, idx, V, out=torch.zeros(N, V))


def test_in_place_logits_equal_the_plain_expressions_bitwise():
    rng = _rng(5)
    scores = _t(np_softmax(rng.standard_normal((6, V))) + 0.3 * (np.eye(V)[rng.integers(0, V, 6)] - 1 / V))
    base = _t(rng.standard_normal((6, V)))
    clamped = scores.clamp_min(1e-8)
    assert torch.equal(scores_to_logits(scores, 1e-8), clamped.log() - clamped.sum(-1, keepdim=True).log())
    buf = torch.empty_like(scores)
    assert scores_to_logits(scores, 1e-8, out=buf) is buf and torch.equal(buf, scores_to_logits(scores, 1e-8))
    pos = scores.clamp_min(0)
    plain = ((0.7 * (pos / pos.sum(-1, keepdim=True).clamp_min(1e-30))) + 0.3 * torch.softmax(base, -1)).clamp_min(1e-30).log()
    assert torch.equal(mixture_log_probs(scores, base, 0.3), plain)
    weighted = torch.softmax(base, -1) * 0.3
    assert torch.equal(mixture_log_probs(scores, None, 0.3, weighted_base=weighted), plain)


# ------------------------------------------------------------------ the model's forward and generate
@pytest.fixture(scope="module")
def llama_model():
    model = ResMemWrapper.from_base(tiny_base("llama"), k=4, sigma=0.5, temperature=1.3)
    model.build_memory(distinct_sequences(3, 30), window=12, stride=8, residual_top_m=16, batch_size=4)
    return model


def test_forward_without_residual_gives_the_same_outputs(llama_model):
    ids = distinct_sequences(2, 20, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding: no search there
    with torch.no_grad():
        full = llama_model(ids, attention_mask=mask)
        lean = llama_model(ids, attention_mask=mask, output_residual=False)
    assert lean.residual is None
    assert torch.equal(full.scores, lean.scores) and torch.equal(full.logits, lean.logits)
    assert (full.residual[1, :6] == 0).all() and full.residual[0].abs().max() > 1e-3
    base_p = torch.softmax(full.base_logits / 1.3, -1)
    assert (full.scores - (base_p + full.residual)).abs().max() <= 1e-6
    assert torch.equal(full.scores[1, :6], base_p[1, :6])


@pytest.mark.parametrize("distribution", ["clamp", "mixture"])
def test_forward_with_autograd_gives_the_same_outputs_and_gradients(llama_model, distribution):
    # A plain `model(ids)` outside no_grad (or a loss on ResMem's logits) must work: the fused in-place path
    # cannot be followed by autograd, so the differentiable composition is used and must agree with it.
    llama_model.config.distribution, llama_model.config.mixture_lambda = distribution, 0.4
    ids = distinct_sequences(2, 12, seed=11)
    with torch.no_grad():
        fused = llama_model(ids)
    out = llama_model(ids, labels=ids)
    assert out.logits.requires_grad
    torch.testing.assert_close(out.scores, fused.scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.residual, fused.residual, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logits.exp(), fused.logits.exp(), atol=1e-6, rtol=0)
    llama_model.zero_grad()
    out.loss.backward()
    grads = [p.grad for p in llama_model.base.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)
    llama_model.zero_grad()
    llama_model.config.distribution = "clamp"


def test_generate_asks_for_no_residual(llama_model, monkeypatch):
    seen = []
    original = type(llama_model).resmem_outputs

    def spy(self, *args, **kwargs):
        seen.append(args[3] if len(args) > 3 else kwargs.get("output_residual", True))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(llama_model), "resmem_outputs", spy)
    llama_model.generate(distinct_sequences(1, 6, seed=9), max_new_tokens=3, do_sample=False)
    assert seen and not any(seen)
    with torch.no_grad():
        llama_model(distinct_sequences(1, 6, seed=9))
    assert seen[-1] is True  # a plain forward still returns the residual


# ------------------------------------------------------------------ tuning / evaluation statistics, sparse
def _token_memory(n_entries, v, m, seed):
    from resmem.memory_lm import TokenResidualMemory

    rng = _rng(seed)
    memory = TokenResidualMemory()
    memory.set_token_entries(
        torch.zeros(n_entries, 4),
        _t((rng.standard_normal((n_entries, m)) * 0.4).astype(np.float16), torch.float16),
        _t(rng.integers(0, v, (n_entries, m)), torch.int32),
        torch.zeros(n_entries, dtype=torch.long), torch.arange(n_entries), torch.zeros(n_entries, dtype=torch.long),
        fingerprint="x", layer="x", temperature=1.0, vocab_size=v, top_m=m,
    )
    return memory


@pytest.mark.parametrize("temperature", [1.0, 1.4])
def test_sparse_tuning_statistics_match_numpy(temperature):
    from resmem.evaluation_lm import _Accumulator, _chunk_metrics_sparse

    n, v, m, kmax, entries = 30, 40, 4, 5, 25
    rng = _rng(7)
    memory = _token_memory(entries, v, m, 8)
    logits = rng.standard_normal((n, v)) * 2
    labels = rng.integers(0, v, n)
    labels[::2] = logits[::2].argmax(1)  # half the positions: the base is right (often with an untouched token)
    ids = np.stack([rng.permutation(entries)[:kmax] for _ in range(n)])
    dist = np.sort(rng.uniform(0.5, 3.0, (n, kmax)), axis=1)
    grid, lambdas, floor = [(1, 0.5), (3, 1.0), (5, 0.3)], [0.25, 0.9], 1e-8
    accs = {g: _Accumulator(lambdas) for g in grid}
    _chunk_metrics_sparse(
        memory, _t(logits), torch.tensor(labels), _t(dist), torch.tensor(ids), grid, lambdas, accs, floor, temperature
    )
    vals = memory.values.double().numpy()
    idx = memory.indices.long().numpy()
    base_p1 = np_softmax(logits)
    base_ok = logits.argmax(1) == labels
    seen_untouched_argmax = False
    for k, sigma in grid:
        w = np_softmax(-dist[:, :k] / sigma)
        r = np.zeros((n, v))
        rows = np.repeat(np.arange(n), k * m)
        np.add.at(r, (rows, idx[ids[:, :k]].reshape(-1)), (w[:, :, None] * vals[ids[:, :k]]).reshape(-1))
        s = np_softmax(logits / temperature) + r
        pred = s.argmax(1)
        ok = pred == labels
        seen_untouched_argmax |= bool(((r[np.arange(n), pred] == 0) & ok).any())
        got = accs[k, sigma].result()
        assert got["accuracy"] == ok.mean() and got["base_accuracy"] == base_ok.mean()
        assert got["tpr"] == (~base_ok & ok).mean() and got["fpr"] == (base_ok & ~ok).mean()
        c = np.maximum(s, floor)
        ppl_clamp = np.exp(-np.mean(np.log(c[np.arange(n), labels] / c.sum(1))))
        np.testing.assert_allclose(got["ppl_clamp"], ppl_clamp, rtol=1e-5)
        pos = np.maximum(s, 0)
        for lam in lambdas:
            mix = (1 - lam) * pos[np.arange(n), labels] / pos.sum(1) + lam * base_p1[np.arange(n), labels]
            np.testing.assert_allclose(got["ppl_mixture"][str(lam)], np.exp(-np.mean(np.log(mix))), rtol=1e-5)
        np.testing.assert_allclose(got["base_ppl"], np.exp(-np.mean(np.log(base_p1[np.arange(n), labels]))), rtol=1e-5)
    assert seen_untouched_argmax  # a right prediction by an untouched token: that branch is exercised


def test_sparse_and_dense_evaluation_agree(llama_model):
    from resmem.evaluation_lm import evaluate_lm

    data = distinct_sequences(3, 25, seed=11)
    kw = dict(ks=[1, 2, 4], sigmas=[0.3, 2.0], lambdas=[0.5], window=12, stride=8)
    sparse = evaluate_lm(llama_model, data, **kw)
    dense = evaluate_lm(llama_model, data, sparse=False, **kw)
    assert len(sparse) == len(dense) == 6
    for a, b in zip(sparse, dense):
        for key in ("k", "sigma", "positions", "accuracy", "base_accuracy", "tpr", "fpr", "gain"):
            assert a[key] == b[key], key
        np.testing.assert_allclose(a["ppl_clamp"], b["ppl_clamp"], rtol=1e-5)
        np.testing.assert_allclose(a["ppl_mixture"]["0.5"], b["ppl_mixture"]["0.5"], rtol=1e-6)
        np.testing.assert_allclose(a["base_ppl"], b["base_ppl"], rtol=1e-7)
