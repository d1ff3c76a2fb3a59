"""Logit-space residuals (`config.residual_space = "logit"`) and the calibration metrics (ECE, NLL).

Checked against an independent numpy computation (tests/reference.py: float64 kNN, softmax, hooks); the
probability-space path must stay exactly what it was.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import NUM_LABELS, dataset_arrays, make_base, make_pixel_dataset
from reference import hooked_forward, np_knn, np_softmax

import resmem
from resmem import ResMemConfig, ResMemWrapper
from resmem.residuals import resmem_scores, scores_to_logits
from resmem.scoring import calibration

LAYER = "classifier.1:input"  # tiny ResNet's pre-logit features (the default layer)
MEMORY_SIZE = 40


# ------------------------------------------------------------------ independent numpy reference
def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_logit_resmem(q_keys, q_logits, m_keys, m_logits, m_labels, k, sigma, temperature, eps):
    """Logit-space ResMem in float64: `(residual, probabilities)`, each `(B, C)`."""
    c = m_logits.shape[1]
    target = np.log((1 - eps) * np.eye(c)[m_labels] + eps / c)  # (N, C)
    r = target - np_log_softmax(m_logits / temperature)  # (N, C)
    d, ids = np_knn(q_keys, m_keys, k)
    w = np_softmax(-d / sigma)  # (B, k)
    r_knn = (w[:, :, None] * r[ids]).sum(axis=1)  # (B, C)
    return r_knn, np_softmax(np_log_softmax(q_logits / temperature) + r_knn)


def np_ece_nll(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> tuple[float, float]:
    """Guo et al.'s ECE with `bins` equal-width bins (lo, hi] on the top-label confidence, and the mean NLL."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    acc = (pred == labels).astype(np.float64)
    ece = 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if lo == 0.0:
            in_bin |= conf == 0.0
        if in_bin.any():
            ece += in_bin.mean() * abs(acc[in_bin].mean() - conf[in_bin].mean())
    return ece, float(-np.log(probs[np.arange(len(labels)), labels]).mean())


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def setup():
    memory = make_pixel_dataset(MEMORY_SIZE, seed=5)
    model = ResMemWrapper.from_base(make_base("resnet", seed=2), k=5, residual_space="logit")
    model.build_memory(memory, batch_size=16)
    pixels, labels = dataset_arrays(memory)
    queries = torch.from_numpy(np.random.default_rng(11).standard_normal((12, 3, 16, 16)).astype(np.float32))
    m_keys, m_logits = hooked_forward(model.base, LAYER, pixels)
    q_keys, q_logits = hooked_forward(model.base, LAYER, queries)
    scale = float(np.median(np.sqrt(((q_keys[:, None] - m_keys[None]) ** 2).sum(-1))))
    return model, queries, (q_keys, q_logits, m_keys, m_logits, labels), scale, memory


def _forward(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels)


# ------------------------------------------------------------------ the forward
@pytest.mark.parametrize(
    "k, sigma_scale, temperature, eps", [(1, 1.0, 1.0, 0.1), (5, 0.3, 1.4, 0.05), (17, 1.0, 0.7, 0.3), (MEMORY_SIZE, 2.0, 2.0, 0.01)]
)
def test_logit_forward_matches_numpy(setup, k, sigma_scale, temperature, eps):
    model, queries, ref, scale, _ = setup
    c = model.config
    c.k, c.sigma, c.residual_temperature, c.label_smoothing = k, sigma_scale * scale, temperature, eps
    out = _forward(model, queries)
    ref_residual, ref_probs = np_logit_resmem(*ref, k, sigma_scale * scale, temperature, eps)
    assert np.abs(ref_residual).max() > 0.1  # the memory really changes the prediction
    np.testing.assert_allclose(out.residual.double().numpy(), ref_residual, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.logits.double().numpy(), np.log(ref_probs), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.scores.double().numpy(), ref_probs, atol=1e-5)
    # A proper distribution without any clamp: non-negative, sums to 1, argmax of the logits.
    assert (out.scores >= 0).all() and torch.allclose(out.scores.sum(-1), torch.ones(len(queries)), atol=1e-5)
    assert torch.equal(out.scores.argmax(-1), out.logits.argmax(-1))
    np.testing.assert_allclose(out.base_logits.double().numpy(), ref[1], atol=1e-5)


def test_k1_tiny_sigma_reproduces_the_smoothed_training_label(setup):
    """Remark 3.2 in logit space: at a memory point the prediction is exactly its smoothed one-hot label."""
    model, _, _, _, memory = setup
    pixels, labels = dataset_arrays(memory)
    c = model.config
    c.k, c.sigma, c.residual_temperature, c.label_smoothing = 1, 1e-3, 1.3, 0.2
    out = _forward(model, torch.from_numpy(pixels))
    expected = 0.8 * np.eye(NUM_LABELS)[labels] + 0.2 / NUM_LABELS
    np.testing.assert_allclose(out.scores.double().numpy(), expected, atol=1e-5)
    assert (out.logits.argmax(-1).numpy() == labels).all()


def test_probability_space_is_unchanged_and_the_default(setup):
    """The default is the paper's method, bit for bit; switching back from "logit" restores it exactly."""
    model, queries, _, scale, _ = setup
    assert ResMemConfig().residual_space == "probability"
    c = model.config
    c.k, c.sigma, c.residual_temperature = 7, scale, 1.4
    c.residual_space = "probability"
    out = _forward(model, queries)
    residual = model.memory.residual_for(_keys(model, queries), 7, scale, 1.4)  # the paper's residual, as before
    scores = resmem_scores(out.base_logits, residual, 1.4)
    assert torch.equal(out.residual, residual)
    assert torch.equal(out.scores, scores)
    assert torch.equal(out.logits, scores_to_logits(scores, c.score_floor))
    c.residual_space = "logit"
    logit = _forward(model, queries)
    assert not torch.allclose(logit.scores, out.scores, atol=1e-3)  # the option really switches the method
    c.residual_space = "probability"
    again = _forward(model, queries)
    assert torch.equal(again.scores, out.scores) and torch.equal(again.logits, out.logits)
    c.residual_space = "logit"


def _keys(model, pixels):
    z, _ = hooked_forward(model.base, LAYER, pixels)
    return torch.from_numpy(z).float()


# ------------------------------------------------------------------ calibration metrics
def test_ece_and_nll_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((500, 7)) * rng.uniform(0.2, 4.0, (500, 1))
    labels = rng.integers(0, 7, 500)
    labels[:300] = logits[:300].argmax(1)  # a mix of right and wrong, confident and not
    log_probs = torch.log_softmax(torch.tensor(logits), dim=-1)
    got = calibration(log_probs, torch.tensor(labels))
    ece, nll = np_ece_nll(np_softmax(logits), labels)
    assert ece > 0.01
    assert got["ece"] == pytest.approx(ece, abs=1e-9)
    assert got["nll"] == pytest.approx(nll, abs=1e-9)
    # One-hot predictions that are all right are perfectly calibrated.
    sure = torch.full((4, 3), -1e4).scatter_(1, torch.tensor([[0], [2], [1], [1]]), 0.0)
    assert calibration(torch.log_softmax(sure, -1), torch.tensor([0, 2, 1, 1]))["ece"] == pytest.approx(0.0, abs=1e-9)


def test_calibration_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(N, C\) log-probabilities and \(N,\) labels"):
        calibration(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))


def test_evaluate_reports_calibration_of_resmem_and_base(setup):
    model, queries, ref, scale, _ = setup
    c = model.config
    c.k, c.sigma, c.residual_temperature, c.label_smoothing = 5, scale, 1.0, 0.1
    test = make_pixel_dataset(30, seed=77)
    pixels, labels = dataset_arrays(test)
    result = resmem.evaluate(model, test, split="test", progress=False, record=False)
    _, q_logits = hooked_forward(model.base, LAYER, pixels)
    q_keys = _keys(model, pixels).double().numpy()
    _, probs = np_logit_resmem(q_keys, q_logits, ref[2], ref[3], ref[4], 5, scale, 1.0, 0.1)
    ece, nll = np_ece_nll(probs, labels)
    base_ece, base_nll = np_ece_nll(np_softmax(q_logits), labels)
    assert result["ece"] == pytest.approx(ece, abs=1e-5) and result["nll"] == pytest.approx(nll, abs=1e-5)
    assert result["base_ece"] == pytest.approx(base_ece, abs=1e-5) and result["base_nll"] == pytest.approx(base_nll, abs=1e-5)
    assert result["residual_space"] == "logit" and result["label_smoothing"] == 0.1
    assert result["resmem_accuracy"] == pytest.approx(float((probs.argmax(1) == labels).mean()))


def test_recorded_calibration_goes_stale_with_the_residual_space_or_smoothing(setup):
    """The record keeps ECE / NLL and the space it was measured in; another eps or space leaves it out of the card."""
    from resmem.records import current_settings, measured_at_current_settings

    model, _, _, scale, _ = setup
    c = model.config
    c.k, c.sigma, c.residual_temperature, c.label_smoothing = 5, scale, 1.0, 0.1
    result = resmem.evaluate(model, make_pixel_dataset(12, seed=78), split="test", progress=False)
    record = c.evaluations["test"]
    assert record["ece"] == result["ece"] and record["base_nll"] == result["base_nll"]
    assert record["residual_space"] == "logit" and measured_at_current_settings(record, current_settings(model))
    c.label_smoothing = 0.2
    assert not measured_at_current_settings(record, current_settings(model))
    c.label_smoothing = 0.1
    c.residual_space = "probability"
    try:
        assert not measured_at_current_settings(record, current_settings(model))
    finally:
        c.residual_space = "logit"


# ------------------------------------------------------------------ save / load, tune
def test_save_load_keeps_the_option(setup, tmp_path):
    model, queries, _, scale, _ = setup
    c = model.config
    c.k, c.sigma, c.residual_temperature, c.label_smoothing = 4, scale, 1.2, 0.07
    model.save_pretrained(tmp_path / "m")
    loaded = ResMemWrapper.from_pretrained(tmp_path / "m")
    assert loaded.config.residual_space == "logit" and loaded.config.label_smoothing == 0.07
    a, b = _forward(model, queries), _forward(loaded, queries)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.logits, b.logits)


def test_tune_searches_k_sigma_t_and_smoothing_like_brute_force(setup):
    model, _, _, scale, memory = setup
    pixels, labels = dataset_arrays(memory)
    rng = np.random.default_rng(3)
    near = pixels[:20] + 0.5 * rng.standard_normal(pixels[:20].shape).astype(np.float32)  # noisy memory copies
    import datasets

    val = datasets.Dataset.from_dict({"pixel_values": near, "label": labels[:20]})
    grid = dict(k=[1, 4, 9], sigma=[0.3 * scale, 2 * scale], temperature=[0.7, 1.5], label_smoothing=[0.02, 0.3])
    result = model.tune(val, **grid, batch_size=64, progress=False)
    assert len(result) == 3 * 2 * 2 * 2 and result.grid["label_smoothing"] == [0.02, 0.3]
    c = model.config
    best = (c.k, c.sigma, c.residual_temperature, c.label_smoothing)
    assert best == (result.best["k"], result.best["sigma"], result.best["temperature"], result.best["label_smoothing"])
    x = torch.from_numpy(near)
    accs = set()
    for row in result:  # every row against the plain forward at that setting
        c.k, c.sigma, c.residual_temperature, c.label_smoothing = row["k"], row["sigma"], row["temperature"], row["label_smoothing"]
        out = _forward(model, x)
        acc = float((out.logits.argmax(-1).numpy() == labels[:20]).mean())
        cal = calibration(out.logits, torch.from_numpy(labels[:20]))
        assert row["accuracy"] == pytest.approx(acc)
        assert row["nll"] == pytest.approx(cal["nll"], abs=1e-4) and row["ece"] == pytest.approx(cal["ece"], abs=1e-4)
        accs.add(acc)
    assert len(accs) > 1  # the grid really changes predictions
    assert result.best["accuracy"] == max(r["accuracy"] for r in result)
    c.k, c.sigma, c.residual_temperature, c.label_smoothing = best


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(residual_space="logits"), r"residual_space must be one of \('probability', 'logit'\)"),
        (dict(label_smoothing=0.0), r"label_smoothing must lie strictly between 0 and 1"),
        (dict(label_smoothing=1.0), r"label_smoothing must lie strictly between 0 and 1"),
        (dict(task="causal-lm", residual_space="logit"), r"supported for classifiers only.*distribution = 'mixture'"),
    ],
)
def test_bad_settings_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResMemConfig(**kwargs)


def test_assignment_is_checked_and_lm_refuses_logit_space():
    config = ResMemConfig(task="causal-lm")
    with pytest.raises(ValueError, match="supported for classifiers only"):
        config.residual_space = "logit"
    with pytest.raises(ValueError, match="label_smoothing must lie strictly between 0 and 1"):
        ResMemConfig().label_smoothing = float("nan")


def test_label_smoothing_grid_needs_logit_space(setup):
    model, _, _, _, memory = setup
    model.config.residual_space = "probability"
    try:
        with pytest.raises(ValueError, match="set model.config.residual_space = 'logit' first"):
            model.tune(memory, label_smoothing=[0.1], progress=False)
    finally:
        model.config.residual_space = "logit"


def test_sensitivity_curves_hold_the_best_label_smoothing(setup):
    """Figure-5 curves of a logit-space table: one point per axis value (other axes, eps included, at the best)."""
    from resmem.scoring import sensitivity

    model, _, _, scale, memory = setup
    saved = (model.config.k, model.config.sigma, model.config.residual_temperature, model.config.label_smoothing)
    result = model.tune(memory, k=[1, 3], sigma=[scale], temperature=[1.0], label_smoothing=[0.05, 0.2, 0.4],
                        set_best=False, progress=False)
    curves = sensitivity(result)
    assert [p["k"] for p in curves["k"]] == [1, 3]
    assert len(curves["sigma"]) == 1 and len(curves["temperature"]) == 1
    model.config.k, model.config.sigma, model.config.residual_temperature, model.config.label_smoothing = saved
