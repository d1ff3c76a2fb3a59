"""Key variants: `config.sigma_mode` ("absolute" / "relative") and `config.key_normalization`
("none" / "l2" / "standardize") for classifiers.

Every number is checked against an independent numpy (float64) computation: keys and logits from a plain torch hook
(`reference.hooked_forward`), normalisation, brute-force plain L2 k-NN, relative or absolute kernel, residuals and
paper eq. 3, all written here or in `reference.py` without resmem.
"""

from __future__ import annotations

import json
import os

import datasets
import numpy as np
import pytest
import torch
from conftest import dataset_arrays, make_base, make_pixel_dataset, random_pixels
from reference import hooked_forward, np_knn, np_residuals, np_softmax
from safetensors import safe_open

from resmem import ResMemConfig, ResMemWrapper
from resmem.memory import MemoryFileError
from resmem.model_card import render_card
from resmem.records import current_settings, measured_at_current_settings
from resmem.residuals import neighbour_weights

K, SIGMA, T = 5, 0.6, 1.3
NORMALIZATIONS = ("none", "l2", "standardize", "whiten")
MODES = ("absolute", "relative")


# ---------------------------------------------------------------------------------------------------- numpy reference
def np_whitening(raw_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and `W = V / sqrt(lambda)` over the covariance's eigenpairs with lambda > 1e-6 * lambda_max."""
    mean = raw_keys.mean(axis=0)
    lam, vec = np.linalg.eigh(np.cov(raw_keys.T, bias=True))
    keep = lam > 1e-6 * lam.max()
    return mean, vec[:, keep] / np.sqrt(lam[keep])


def np_normalize(z: np.ndarray, mode: str, mean=None, std=None) -> np.ndarray:
    z = np.asarray(z, np.float64)
    if mode == "whiten":  # `std` holds (mean, W) of np_whitening here
        return (z - std[0]) @ std[1]
    if mode == "l2":
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    if mode == "standardize":
        return (z - mean) / std
    return z


def np_statistics(raw_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Population mean and std per dimension; a constant dimension (std < 1e-8) keeps std 1 (only centred)."""
    mean, std = raw_keys.mean(axis=0), raw_keys.std(axis=0)
    return mean, np.where(std < 1e-8, 1.0, std)


def np_weights(d: np.ndarray, sigma: float, mode: str) -> np.ndarray:
    """Soft-kNN weights over `(B, k)` distances; relative: width `sigma * d_k` (the k-th, largest, distance)."""
    width = sigma * np.maximum(d[:, -1:], 1e-12) if mode == "relative" else sigma
    return np_softmax(-d / width)


def np_space(model, train, query_pixels, norm) -> tuple:
    """Memory keys, logits, labels and queries, query logits in the variant's key space, from plain torch hooks."""
    layer = model.config.layer
    pixels, labels = dataset_arrays(train)
    raw, logits = hooked_forward(model.base, layer, torch.from_numpy(pixels))  # (N, D), (N, C)
    q_raw, q_logits = hooked_forward(model.base, layer, query_pixels)  # (B, D), (B, C)
    mean, std = np_statistics(raw) if norm != "whiten" else (None, np_whitening(raw))
    return np_normalize(raw, norm, mean, std), logits, labels, np_normalize(q_raw, norm, mean, std), q_logits


def np_reference(model, train, query_pixels, k, sigma, temperature, mode, norm, space=None):
    """`(scores (B, C), residual (B, C), distances (B, k), weights (B, k))` of paper eq. 3 in the variant's space
    (`space`: a precomputed `np_space(...)`)."""
    keys, logits, labels, queries, q_logits = space or np_space(model, train, query_pixels, norm)
    d, ids = np_knn(queries, keys, k)  # (B, k)
    w = np_weights(d, sigma, mode)  # (B, k)
    residual = (w[:, :, None] * np_residuals(logits, labels, temperature)[ids]).sum(axis=1)  # (B, C)
    return np_softmax(q_logits / temperature) + residual, residual, d, w


def built(norm="none", mode="absolute", n=60, seed=0, k=K, sigma=SIGMA):
    data = make_pixel_dataset(n, seed=seed)
    model = ResMemWrapper.from_base(make_base("resnet", seed=1), k=k, sigma=sigma, temperature=T)
    model.config.key_normalization, model.config.sigma_mode = norm, mode
    model.build_memory(data, batch_size=16, progress=False)
    return model, data


@pytest.fixture(scope="module")
def queries():
    return torch.from_numpy(random_pixels(9, seed=4321))


# ---------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("norm", NORMALIZATIONS)
@pytest.mark.parametrize("mode", MODES)
def test_forward_and_explain_match_numpy(norm, mode, queries):
    """Scores, residual and the explain path's distances / weights equal the numpy reference in every variant."""
    model, data = built(norm, mode)
    want_scores, want_residual, want_d, want_w = np_reference(model, data, queries, K, SIGMA, T, mode, norm)
    with torch.no_grad():
        out = model(pixel_values=queries)
        explained = model(pixel_values=queries, output_neighbors=True)
    np.testing.assert_allclose(out.residual.numpy(), want_residual, atol=1e-5)
    np.testing.assert_allclose(out.scores.numpy(), want_scores, atol=1e-5)
    assert torch.equal(explained.residual, out.residual)  # one search, the same weights
    np.testing.assert_allclose(explained.neighbor_distances.numpy(), want_d, atol=1e-4)
    np.testing.assert_allclose(explained.neighbor_weights.numpy(), want_w, atol=1e-5)
    if norm == "l2":
        np.testing.assert_allclose(model.memory.keys.norm(dim=1).numpy(), 1.0, atol=1e-6)


def test_variants_change_the_prediction_inputs(queries):
    """The variants are not silently the default: each changes the residual (so the numpy match above is not vacuous)."""
    residuals = {}
    for norm, mode in [("none", "absolute"), ("none", "relative"), ("l2", "absolute"), ("standardize", "absolute")]:
        model, _ = built(norm, mode)
        with torch.no_grad():
            residuals[norm, mode] = model(pixel_values=queries).residual
    base = residuals["none", "absolute"]
    for key, r in residuals.items():
        if key != ("none", "absolute"):
            assert (r - base).abs().max() > 1e-3, key


def test_relative_weights_edge_cases():
    """d_k = 0 gives uniform weights (no 0/0); unfilled slots (inf) get weight 0 and do not set d_k."""
    zeros = torch.zeros(2, 4)
    np.testing.assert_allclose(neighbour_weights(zeros, 0.5, "relative").numpy(), 0.25)
    d = torch.tensor([[1.0, 2.0, float("inf")]])
    w = neighbour_weights(d, 0.5, "relative")
    np.testing.assert_allclose(w.numpy(), np.concatenate([np_weights(np.array([[1.0, 2.0]]), 0.5, "relative"), [[0.0]]], 1), atol=1e-7)


def test_default_path_is_bit_identical(pixel_dataset, queries, tmp_path):
    """Defaults: stored keys are the raw hooked keys bitwise, queries reach the search uncopied, weights are the paper's
    `softmax(-d / sigma)` bitwise, and nothing new is written (tune rows, memory file metadata, config.json)."""
    model = ResMemWrapper.from_base(make_base("resnet", seed=1), k=K, sigma=SIGMA, temperature=T)
    model.build_memory(pixel_dataset, batch_size=16, progress=False)
    raw = model.embed_dataset(pixel_dataset, batch_size=16, progress=False)[0]
    assert torch.equal(model.memory.keys, raw)
    assert model.memory_queries(raw) is raw
    d = torch.rand(7, K) * 3
    assert torch.equal(neighbour_weights(d, SIGMA), torch.softmax(-d / SIGMA, dim=-1))
    assert torch.equal(neighbour_weights(d, SIGMA, "absolute"), torch.softmax(-d / SIGMA, dim=-1))
    # The forward's residual equals the paper's formula computed here from the raw keys, bitwise.
    with torch.no_grad():
        out = model(pixel_values=queries)
    as_data = datasets.Dataset.from_dict({"pixel_values": queries.numpy(), "label": [0] * len(queries)})
    z = model.embed_dataset(as_data, batch_size=16, progress=False)[0]  # (B, D) raw, the same single batch
    dist, ids = model.memory.search(z, K)
    w = torch.softmax(-dist.float() / SIGMA, dim=-1)
    want = torch.einsum("bk,bkc->bc", w, model.memory.neighbour_residuals(ids, T))
    assert torch.equal(out.residual, want)
    result = model.tune(pixel_dataset, k=[2, 4], sigma=[0.5, 1.0], progress=False, set_best=False)
    assert "sigma_mode" not in result.grid and all("sigma_mode" not in row for row in result.table)
    model.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "resmem_memory.safetensors"), framework="pt") as f:
        assert "key_space" not in f.metadata()
    saved = json.load(open(tmp_path / "config.json"))
    assert (saved["sigma_mode"], saved["key_normalization"], saved["key_statistics"]) == ("absolute", "none", None)
    for name in ("sigma_mode", "key_normalization", "key_statistics"):  # a save from before these options loads as before
        saved.pop(name)
    json.dump(saved, open(tmp_path / "config.json", "w"))
    with torch.no_grad():
        assert torch.equal(ResMemWrapper.from_pretrained(tmp_path)(pixel_values=queries).scores, out.scores)


# ---------------------------------------------------------------------------------------------------- tune
@pytest.mark.parametrize("norm", ["l2", "standardize", "whiten"])
def test_tune_grid_over_sigma_mode_matches_numpy(norm):
    """One search scores both kernels: every row's accuracy equals the numpy count, the best mode is set on the config."""
    model, train = built(norm, "absolute", n=50, seed=0)
    val = make_pixel_dataset(30, seed=7)
    ks, sigmas = [2, 6], [0.3, 1.5]
    calls = []
    search = model.memory.search
    model.memory.search = lambda *a, **kw: calls.append(1) or search(*a, **kw)
    result = model.tune(val, k=ks, sigma=sigmas, temperature=[T], sigma_mode=["relative", "absolute"], progress=False)
    model.memory.search = search
    assert result.grid["sigma_mode"] == ["absolute", "relative"]
    assert len(calls) == 1  # one batch of 30 <= 256: one search for the whole grid
    val_pixels, val_labels = dataset_arrays(val)
    space = np_space(model, train, torch.from_numpy(val_pixels), norm)
    rows = {(r["sigma_mode"], r["k"], r["sigma"]): r for r in result.table}
    assert len(rows) == 8
    for mode in MODES:
        for k in ks:
            for sigma in sigmas:
                scores = np_reference(model, train, None, k, sigma, T, mode, norm, space)[0]
                want = float((scores.argmax(axis=1) == val_labels).mean())
                assert rows[mode, k, sigma]["accuracy"] == pytest.approx(want, abs=1e-12), (mode, k, sigma)
    for mode in MODES:  # each mode's whole (T, S, K, V) block of predictions, not only the accuracies
        block = model.tune(val, k=ks, sigma=sigmas, temperature=[T], sigma_mode=mode, progress=False, set_best=False).predictions
        for j, k in enumerate(ks):
            for s, sigma in enumerate(sigmas):
                scores = np_reference(model, train, None, k, sigma, T, mode, norm, space)[0]
                np.testing.assert_array_equal(block[0, s, j].numpy(), scores.argmax(axis=1))
    best = result.best
    assert (model.config.sigma_mode, model.config.k, model.config.sigma) == (best["sigma_mode"], best["k"], best["sigma"])
    block = result.predictions_for(best["k"], best["sigma"], T)
    with torch.no_grad():
        forward = model(pixel_values=torch.from_numpy(val_pixels)).scores.argmax(-1)
    assert torch.equal(block, forward)  # the held block is the chosen mode's, as the forward now predicts


def test_tune_relative_auto_sigma_uses_multiples_of_dk():
    model, _ = built("none", "relative", n=40)
    val = make_pixel_dataset(20, seed=8)
    result = model.tune(val, k=[3], sigma="auto", progress=False, set_best=False)
    assert result.grid["sigma"] == [0.05, 0.1, 0.2, 0.5, 1.0, 2.0] and result.grid["sigma_mode"] == ["relative"]
    mixed = model.tune(val, k=[3], sigma="auto", sigma_mode=["absolute", "relative"], progress=False, set_best=False)
    assert mixed.grid["relative_sigma"] == [0.05, 0.1, 0.2, 0.5, 1.0, 2.0] and "sigma_scale" in mixed.grid
    assert mixed.grid["sigma"] == [mixed.grid["sigma_scale"] * m for m in (0.25, 0.5, 1.0, 2.0, 4.0)]  # absolute: unchanged
    relative = [r for r in mixed.table if r["sigma_mode"] == "relative"]
    assert [r["sigma"] for r in relative] == [0.05, 0.1, 0.2, 0.5, 1.0, 2.0] and all("sigma_scale" not in r for r in relative)


def test_evaluation_at_another_mode_is_not_current():
    model, train = built("none", "absolute", n=40)
    model.tune(train, k=[3], sigma=[0.5], sigma_mode="relative", progress=False)
    record = model.config.evaluations["validation"]
    assert record["sigma_mode"] == "relative"
    assert measured_at_current_settings(record, current_settings(model))
    assert "sigma_mode=relative" in render_card(model)  # the card names the kernel the numbers were measured with
    model.config.sigma_mode = "absolute"
    assert not measured_at_current_settings(record, current_settings(model))
    card = render_card(model)  # the stale record is left out of the card's numbers, and named as such
    assert "No evaluation at these settings" in card and "other settings (k=3, sigma=0.5, T=1.3, sigma_mode=relative" in card


# ---------------------------------------------------------------------------------------------------- persistence
def test_save_load_round_trip_and_add_uses_the_same_statistics(tmp_path, queries):
    model, train = built("standardize", "relative")
    pixels, _ = dataset_arrays(train)
    raw = hooked_forward(model.base, model.config.layer, torch.from_numpy(pixels))[0]
    mean, std = np_statistics(raw)
    np.testing.assert_allclose(model.config.key_statistics["mean"], mean, atol=1e-5)
    np.testing.assert_allclose(model.config.key_statistics["std"], std, rtol=1e-5, atol=1e-7)
    model.save_pretrained(tmp_path)
    loaded = ResMemWrapper.from_pretrained(tmp_path)
    assert (loaded.config.sigma_mode, loaded.config.key_normalization) == ("relative", "standardize")
    assert loaded.config.key_statistics == model.config.key_statistics
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=queries).scores, model(pixel_values=queries).scores)
    extra = make_pixel_dataset(6, seed=99)
    loaded.add_to_memory(extra, batch_size=8, progress=False)
    extra_raw = hooked_forward(loaded.base, loaded.config.layer, torch.from_numpy(dataset_arrays(extra)[0]))[0]
    np.testing.assert_allclose(loaded.memory.keys[-6:].numpy(), np_normalize(extra_raw, "standardize", mean, std), atol=1e-4)
    assert loaded.config.key_statistics == model.config.key_statistics  # add never refits


def test_load_refuses_a_memory_without_its_statistics(tmp_path):
    model, _ = built("standardize")
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.load(open(path))
    saved.pop("key_statistics")
    json.dump(saved, open(path, "w"))
    with pytest.raises(MemoryFileError, match="build_memory"):
        ResMemWrapper.from_pretrained(tmp_path)
    saved["key_statistics"] = {"mean": model.config.key_statistics["mean"], "std": [1.0] * len(model.config.key_statistics["std"])}
    json.dump(saved, open(path, "w"))
    with pytest.raises(MemoryFileError, match="statistics"):  # other statistics: another space
        ResMemWrapper.from_pretrained(tmp_path)


def test_on_disk_memory_matches_ram_and_round_trips(tmp_path, queries):
    ram, train = built("standardize", "relative")
    disk = ResMemWrapper.from_base(make_base("resnet", seed=1), k=K, sigma=SIGMA, temperature=T)
    disk.config.key_normalization, disk.config.sigma_mode = "standardize", "relative"
    disk.build_memory_on_disk(train, str(tmp_path / "memory"), progress=False)
    assert disk.memory.key_space == ram.memory.key_space and disk.config.key_statistics == ram.config.key_statistics
    with torch.no_grad():
        np.testing.assert_allclose(disk(pixel_values=queries).scores.numpy(), ram(pixel_values=queries).scores.numpy(), atol=1e-6)
    disk.save_pretrained(tmp_path / "saved")
    loaded = ResMemWrapper.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=queries).scores, disk(pixel_values=queries).scores)
    # Chunks: the first chunk's statistics serve every chunk (documented).
    chunked = ResMemWrapper.from_base(make_base("resnet", seed=1), k=K, sigma=SIGMA, temperature=T)
    chunked.config.key_normalization = "standardize"
    chunked.build_memory_on_disk(train, str(tmp_path / "chunked"), chunk_rows=25, progress=False)
    pixels = dataset_arrays(train)[0]
    raw = hooked_forward(chunked.base, chunked.config.layer, torch.from_numpy(pixels))[0]
    mean, std = np_statistics(raw[:25])
    np.testing.assert_allclose(chunked.config.key_statistics["mean"], mean, atol=1e-5)
    np.testing.assert_allclose(chunked.memory.keys[:][40:], np_normalize(raw[40:], "standardize", mean, std), atol=1e-4)


# ---------------------------------------------------------------------------------------------------- errors
def test_stale_normalization_is_refused(pixel_dataset, queries):
    model, _ = built("none")
    model.config.key_normalization = "l2"  # allowed to set, but the memory lives in the raw space
    with pytest.raises(ValueError, match="build_memory"):
        model(pixel_values=queries)
    with pytest.raises(ValueError, match="build_memory"):
        model.tune(pixel_dataset, progress=False)
    with pytest.raises(ValueError, match="build_memory"):
        model.sigma_scale(pixel_dataset)
    with pytest.raises(ValueError, match="build_memory"):
        model.add_to_memory(make_pixel_dataset(3, seed=5), progress=False)
    model.config.key_normalization = "none"
    model(pixel_values=queries)  # back in its space: works
    model.config.key_normalization = "l2"
    model.build_memory(pixel_dataset, batch_size=16, progress=False)
    model(pixel_values=queries)


def test_bad_values_name_the_fix():
    with pytest.raises(ValueError, match="sigma_mode must be one of"):
        ResMemConfig(sigma_mode="local")
    config = ResMemConfig()
    with pytest.raises(ValueError, match="key_normalization must be one of.*build_memory"):
        config.key_normalization = "pca"
    with pytest.raises(ValueError, match="key_statistics must be None"):
        config.key_statistics = {"mean": [0.0], "std": [0.0]}
    with pytest.raises(ValueError, match="key_statistics must be None"):
        config.key_statistics = {"mean": [0.0, 1.0], "projection": [[1.0], [1.0, 2.0]]}
    with pytest.raises(ValueError, match="classifiers"):
        ResMemConfig(task="causal-lm", sigma_mode="relative")
    with pytest.raises(ValueError, match="classifiers"):
        ResMemConfig(task="causal-lm", key_normalization="l2")
    model, data = built("none", n=20)
    with pytest.raises(ValueError, match="sigma_mode must be one of"):
        model.tune(data, sigma_mode=["absolute", "adaptive"], progress=False)
    model.config.residual_space = "logit"
    with pytest.raises(ValueError, match="residual_space='probability'"):
        model.tune(data, sigma_mode=["absolute", "relative"], progress=False)
    model.config.sigma_mode = "relative"
    with pytest.raises(ValueError, match="sigma_mode = 'absolute'"):
        model(pixel_values=torch.from_numpy(random_pixels(2, seed=1)))


def test_text_classifier_uses_the_same_variants():
    """The text subclass reuses the image forward: standardised keys and the relative kernel match numpy there too."""
    from test_text_audio import hooked, text_base, text_dataset, word_tokenizer

    tokenizer = word_tokenizer(30)
    base = text_base("bert")
    model = ResMemWrapper.from_base(base, k=4, sigma=0.7, temperature=1.3)
    model.config.key_normalization, model.config.sigma_mode = "standardize", "relative"
    train, val = text_dataset(30, seed=0), text_dataset(7, seed=1)
    model.build_memory(train, tokenizer=tokenizer, batch_size=8, progress=False)
    layer = model.config.layer
    raw = np.concatenate([hooked(base, layer, dict(tokenizer([t], return_tensors="pt")))[0] for t in train["text"][:]])
    mean, std = np_statistics(raw)
    np.testing.assert_allclose(model.memory.keys.numpy(), np_normalize(raw, "standardize", mean, std), atol=1e-4)
    enc = dict(tokenizer(val["text"][:], padding=True, return_tensors="pt"))
    q_raw, q_logits = hooked(base, layer, enc)
    d, ids = np_knn(np_normalize(q_raw, "standardize", mean, std), model.memory.keys.double().numpy(), 4)
    w = np_weights(d, 0.7, "relative")
    r = np_residuals(model.memory.base_logits.double().numpy(), model.memory.labels.numpy(), 1.3)
    want = np_softmax(q_logits / 1.3) + (w[:, :, None] * r[ids]).sum(axis=1)
    with torch.no_grad():
        np.testing.assert_allclose(model(**enc).scores.numpy(), want, atol=1e-5)


def test_tune_relative_kernel_uses_each_k_prefix_and_skips_unfilled_slots():
    """grid_predictions' relative width at (sigma, k) is sigma * the largest finite distance among the first k (a
    cumulative max), as `neighbour_weights` on the forward's k neighbours; `inf` slots (an IVF index that could not
    fill them) neither count as d_k nor get weight. Pure tensors, against numpy."""
    from resmem.tuning import NeighbourCache, grid_predictions

    rng = np.random.default_rng(0)
    v, n, c, k_max = 40, 30, 4, 6
    d = np.sort(rng.uniform(0.5, 3.0, (v, k_max)), axis=1)
    d[::5, 4:] = np.inf  # every 5th query: only 4 neighbours found
    ids = rng.integers(0, n, (v, k_max))
    logits, labels = rng.standard_normal((n, c)), rng.integers(0, c, n)
    q_logits = rng.standard_normal((v, c))
    cache = NeighbourCache(torch.tensor(q_logits, dtype=torch.float32), torch.zeros(v, dtype=torch.long),
                           torch.tensor(d, dtype=torch.float32), torch.tensor(ids))
    ks, sigmas = [2, 6], [0.05, 0.3]
    pred = grid_predictions(cache, ks, sigmas, [1.0], memory_logits=torch.tensor(logits, dtype=torch.float32),
                            memory_labels=torch.tensor(labels), sigma_mode="relative")  # (1, S, K, V)
    r = np_residuals(logits, labels, 1.0)
    for s, sigma in enumerate(sigmas):
        for j, k in enumerate(ks):
            dk = np.where(np.isfinite(d[:, :k]), d[:, :k], 0).max(axis=1, keepdims=True)
            w = np.nan_to_num(np_softmax(-d[:, :k] / (sigma * dk)))
            want = (np_softmax(q_logits) + (w[:, :, None] * r[ids[:, :k]]).sum(axis=1)).argmax(axis=1)
            np.testing.assert_array_equal(pred[0, s, j].numpy(), want)
            forward_w = neighbour_weights(torch.tensor(d[:, :k], dtype=torch.float32), sigma, "relative")
            np.testing.assert_allclose(forward_w.numpy(), w, atol=1e-6)


def test_whitening_drops_degenerate_directions_and_round_trips(tmp_path, queries):
    """PCA whitening: keys with a constant and a duplicated dimension keep r = D - 2 components, whitened keys have
    identity covariance, distances equal numpy's Mahalanobis ones on the kept subspace; a whitened model saves,
    reloads with the same scores, and `add_to_memory` projects with the stored statistics."""
    from resmem.key_variants import fit_key_statistics, normalize_keys

    rng = np.random.default_rng(3)
    raw = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6))
    raw = np.concatenate([raw, np.full((200, 1), 2.5), raw[:, :1] * 3.0], axis=1)  # (200, 8): rank 6 around the mean
    stats = fit_key_statistics(torch.tensor(raw, dtype=torch.float32), "whiten")
    projection = np.asarray(stats["projection"])
    assert projection.shape == (8, 6)
    white = normalize_keys(torch.tensor(raw, dtype=torch.float32), "whiten", stats).double().numpy()  # (200, 6)
    np.testing.assert_allclose(np.cov(white.T, bias=True), np.eye(6), atol=1e-3)
    mean, w = np_whitening(raw)
    q = rng.standard_normal((5, 8))
    d_lib = np.linalg.norm(normalize_keys(torch.tensor(q, dtype=torch.float32), "whiten", stats).double().numpy()[:, None]
                           - white[None, :10], axis=-1)
    d_np = np.linalg.norm(((q - mean) @ w)[:, None] - ((raw[:10] - mean) @ w)[None], axis=-1)  # basis-free distances
    np.testing.assert_allclose(d_lib, d_np, rtol=1e-3)

    model, train = built("whiten", "relative")
    model.save_pretrained(tmp_path)
    loaded = ResMemWrapper.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=queries).scores, model(pixel_values=queries).scores)
    extra = make_pixel_dataset(4, seed=98)
    loaded.add_to_memory(extra, batch_size=8, progress=False)
    pixels = dataset_arrays(train)[0]
    raw_train = hooked_forward(model.base, model.config.layer, torch.from_numpy(pixels))[0]
    extra_raw = hooked_forward(loaded.base, loaded.config.layer, torch.from_numpy(dataset_arrays(extra)[0]))[0]
    mean, w = np_whitening(raw_train)
    w_lib = np.asarray(loaded.config.key_statistics["projection"])
    np.testing.assert_allclose(w_lib @ w_lib.T, w @ w.T, rtol=1e-3, atol=1e-2)  # the same metric (eigenvector signs aside)
    np.testing.assert_allclose(loaded.config.key_statistics["mean"], mean, atol=1e-5)
    want = (extra_raw - np.asarray(model.config.key_statistics["mean"])) @ w_lib  # the build's statistics, not refitted
    np.testing.assert_allclose(loaded.memory.keys[-4:].numpy(), want, atol=1e-3)
