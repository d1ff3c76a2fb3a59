"""Out-of-sample residuals (`build_memory(residual_model=...)`) and flip augmentation (`augment="hflip"`,
`config.query_augmentation`), checked against the independent numpy reference of tests/reference.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import PRE_LOGIT_LAYER, dataset_arrays, make_base, make_pixel_dataset
from reference import hooked_forward, np_resmem
from safetensors import safe_open

from resmem import ResMemConfig, ResMemWrapper
from resmem.hub import base_fingerprint
from resmem.model_card import render_card
from resmem.records import current_settings, measured_at_current_settings

LAYER = PRE_LOGIT_LAYER["cifar_resnet"]
N_TRAIN, N_QUERY = 24, 10


@pytest.fixture
def train():
    return make_pixel_dataset(N_TRAIN, seed=3)


@pytest.fixture
def val():
    return make_pixel_dataset(N_QUERY, seed=4)


def wrapped(seed: int = 0, **kwargs):
    return ResMemWrapper.from_base(make_base("cifar_resnet", seed=seed), **{"k": 4, "sigma": 0.5, "temperature": 1.3, **kwargs})


def flipped(pixels: np.ndarray) -> np.ndarray:
    """Numpy's own horizontal flip of `(N, C, H, W)` (the width axis), independent of `torch.flip`."""
    return np.ascontiguousarray(pixels[..., ::-1])


def numpy_memory(model, residual_model, pixels, labels, augment: bool):
    """Reference memory: keys from the base (hooked), logits from `residual_model`; flipped copies appended."""
    views = [pixels, flipped(pixels)] if augment else [pixels]
    keys = np.concatenate([hooked_forward(model.base, LAYER, v)[0] for v in views])
    logits = np.concatenate([hooked_forward(residual_model, LAYER, v)[1] for v in views])
    return keys, logits, np.concatenate([labels] * len(views))


# ------------------------------------------------------------------ out-of-sample residuals
def test_residual_model_logits_are_stored_and_keys_stay_the_base(train):
    pixels, labels = dataset_arrays(train)
    model, other = wrapped(), make_base("cifar_resnet", seed=1)
    model.build_memory(train, batch_size=N_TRAIN, residual_model=other)
    keys, logits, _ = numpy_memory(model, other, pixels, labels, augment=False)
    base_logits = hooked_forward(model.base, LAYER, pixels)[1]
    assert not np.allclose(logits, base_logits, atol=1e-3)  # the two models really differ
    np.testing.assert_allclose(model.memory.base_logits.numpy(), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.memory.keys.numpy(), keys, rtol=1e-5, atol=1e-5)
    assert model.memory.labels.tolist() == labels.tolist()
    record = model.config.memory_dataset["residual_model"]
    assert record["fingerprint"] == base_fingerprint(other)
    assert record["class"] == "CifarResNetForImageClassification"
    # the residual model is left in the mode it was in (and was run in eval mode)
    assert not other.training


def test_residual_model_forward_and_tune_match_numpy(train, val):
    pixels, labels = dataset_arrays(train)
    queries, query_labels = dataset_arrays(val)
    model, other = wrapped(), make_base("cifar_resnet", seed=1)
    model.build_memory(train, batch_size=8, residual_model=other)
    keys, logits, mem_labels = numpy_memory(model, other, pixels, labels, augment=False)
    q_keys, q_logits = hooked_forward(model.base, LAYER, queries)  # the query side is always the base's
    out = model(pixel_values=torch.from_numpy(queries))
    scores, residual = np_resmem(q_keys, q_logits, keys, logits, mem_labels, 4, 0.5, 1.3)
    np.testing.assert_allclose(out.residual.detach().double().numpy(), residual, atol=1e-5)
    np.testing.assert_allclose(out.scores.detach().double().numpy(), scores, atol=1e-5)

    result = model.tune(val, k=[1, 3, 6], sigma=[0.2, 2.0], temperature=[0.7, 1.3], batch_size=4, set_best=False)
    for row in result:
        ref = np_resmem(q_keys, q_logits, keys, logits, mem_labels, row["k"], row["sigma"], row["temperature"])[0]
        assert row["accuracy"] == pytest.approx(float((ref.argmax(1) == query_labels).mean()))


def test_add_to_memory_needs_the_same_residual_model(train):
    model, other = wrapped(), make_base("cifar_resnet", seed=1)
    model.build_memory(train.select(range(16)), residual_model=other)
    extra = train.select(range(16, N_TRAIN))
    with pytest.raises(ValueError, match=r"residual_model=that_model"):
        model.add_to_memory(extra)
    with pytest.raises(ValueError, match=r"weights differ .* pass that same model"):
        model.add_to_memory(extra, residual_model=make_base("cifar_resnet", seed=2))
    assert len(model.memory) == 16  # nothing was added by the refused calls
    model.add_to_memory(extra, residual_model=other)
    pixels, labels = dataset_arrays(extra)
    np.testing.assert_allclose(model.memory.base_logits[16:].numpy(), hooked_forward(other, LAYER, pixels)[1], atol=1e-5)

    plain = wrapped()
    plain.build_memory(train.select(range(16)))
    with pytest.raises(ValueError, match=r"come from the base model itself.*Drop residual_model="):
        plain.add_to_memory(extra, residual_model=other)


def test_residual_model_errors(train):
    model = wrapped()
    with pytest.raises(ValueError, match=r"has 3 labels but the base model has 5"):
        model.build_memory(train, residual_model=make_base("cifar_resnet", seed=1, num_labels=3))
    with pytest.raises(ValueError, match=r"residual_model must be a classifier"):
        model.build_memory(train, residual_model="checkpoint_epoch3")
    with pytest.raises(ValueError, match=r"residual_model is a ResMem model.*\.base"):
        model.build_memory(train, residual_model=wrapped(seed=1))
    assert len(model.memory) == 0  # a refused build leaves the memory as it was
    with pytest.raises(ValueError, match=r"build_memory_on_disk does not yet.*use `model.build_memory"):
        model.build_memory_on_disk(train, folder="unused", residual_model=make_base("cifar_resnet", seed=1))


# ------------------------------------------------------------------ horizontally flipped memory
def test_hflip_memory_holds_each_image_and_its_flipped_copy(train):
    pixels, labels = dataset_arrays(train)
    plain, augmented = wrapped(), wrapped()
    plain.build_memory(train, batch_size=8)
    augmented.build_memory(train, batch_size=8, augment="hflip")
    n = N_TRAIN
    assert len(augmented.memory) == 2 * n
    # the first N entries are exactly the paper's memory; the copies follow, with the same labels and ids
    for name in ("keys", "base_logits", "labels", "example_ids"):
        assert torch.equal(getattr(augmented.memory, name)[:n], getattr(plain.memory, name))
    assert augmented.memory.example_ids[n:].tolist() == list(range(n))
    assert augmented.memory.labels[n:].tolist() == labels.tolist()
    keys, logits = hooked_forward(augmented.base, LAYER, flipped(pixels))
    np.testing.assert_allclose(augmented.memory.keys[n:].numpy(), keys, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(augmented.memory.base_logits[n:].numpy(), logits, rtol=1e-5, atol=1e-5)
    assert not np.allclose(keys, plain.memory.keys.numpy(), atol=1e-3)  # a flip really moves the keys
    assert augmented.config.memory_augmentation == "hflip"
    assert augmented.config.memory_dataset["augmentation"] == "hflip"
    assert plain.config.memory_augmentation == "none" and "augmentation" not in plain.config.memory_dataset


def test_hflip_with_residual_model_forward_matches_numpy(train, val):
    pixels, labels = dataset_arrays(train)
    queries, _ = dataset_arrays(val)
    model, other = wrapped(k=5), make_base("cifar_resnet", seed=1)
    model.build_memory(train, batch_size=8, residual_model=other, augment="hflip")
    keys, logits, mem_labels = numpy_memory(model, other, pixels, labels, augment=True)
    np.testing.assert_allclose(model.memory.base_logits.numpy(), logits, rtol=1e-5, atol=1e-5)
    q_keys, q_logits = hooked_forward(model.base, LAYER, queries)
    scores, _ = np_resmem(q_keys, q_logits, keys, logits, mem_labels, 5, 0.5, 1.3)
    np.testing.assert_allclose(model(pixel_values=torch.from_numpy(queries)).scores.detach().double().numpy(), scores, atol=1e-5)


def test_hflip_ids_remove_both_views_and_add_appends_both(train):
    model = wrapped()
    model.build_memory(train.select(range(16)), augment="hflip")
    assert model.remove_from_memory([3, 7]) == 4  # each source example's two entries
    assert 3 not in model.memory.example_ids.tolist() and len(model.memory) == 28
    model.add_to_memory(train.select(range(16, 20)))
    assert len(model.memory) == 36
    assert model.memory.example_ids[28:].tolist() == [16, 17, 18, 19] * 2  # new ids after the largest, both views
    pixels, _ = dataset_arrays(train.select(range(16, 20)))
    np.testing.assert_allclose(model.memory.keys[32:].numpy(), hooked_forward(model.base, LAYER, flipped(pixels))[0], atol=1e-5)
    # at most two entries per id in an augmented memory; a plain memory still wants unique ids
    entry = {name: getattr(model.memory, name)[:1] for name in ("keys", "base_logits", "labels")}
    with pytest.raises(ValueError, match=r"already exist"):
        model.memory.add({**entry, "example_ids": torch.tensor([0])})
    with pytest.raises(ValueError, match=r"at most 2 entries per example"):
        model.memory.add({name: t.repeat(3, *[1] * (t.dim() - 1)) for name, t in entry.items()}, example_ids=[99, 99, 99])
    plain = wrapped()
    plain.build_memory(train.select(range(4)))
    with pytest.raises(ValueError, match=r"must be unique"):
        plain.memory.add({name: t.repeat(2, *[1] * (t.dim() - 1)) for name, t in entry.items()}, example_ids=[50, 50])


def test_memory_augmentation_mismatch_and_errors(train):
    model = wrapped()
    model.build_memory(train, augment="hflip")
    x = torch.from_numpy(dataset_arrays(train)[0][:2])
    model.config.memory_augmentation = "none"
    with pytest.raises(ValueError, match=r"built with augment='hflip'.*build_memory"):
        model(pixel_values=x)
    with pytest.raises(ValueError, match=r"built with augment='hflip'"):
        model.add_to_memory(train.select(range(2)))
    model.config.memory_augmentation = "hflip"
    model(pixel_values=x)
    with pytest.raises(ValueError, match=r"memory_augmentation must be one of \('none', 'hflip'\)"):
        model.config.memory_augmentation = "vflip"
    with pytest.raises(ValueError, match=r"augment must be one of"):
        model.build_memory(train, augment="crop")
    assert len(model.memory) == 2 * N_TRAIN  # untouched by the refused build
    with pytest.raises(ValueError, match=r"image classifiers only.*\"none\""):
        ResMemConfig(task="causal-lm", query_augmentation="hflip")
    with pytest.raises(ValueError, match=r"build_memory_on_disk does not yet"):
        model.build_memory_on_disk(train, folder="unused")


# ------------------------------------------------------------------ query-time flips
def test_query_augmentation_is_the_mean_of_both_views(train, val):
    pixels, labels = dataset_arrays(train)
    queries, _ = dataset_arrays(val)
    model = wrapped()
    model.build_memory(train, batch_size=8)
    plain_out = model(pixel_values=torch.from_numpy(queries))
    model.config.query_augmentation = "hflip"
    out = model(pixel_values=torch.from_numpy(queries))
    keys, logits, mem_labels = numpy_memory(model, model.base, pixels, labels, augment=False)
    q_keys, q_logits = hooked_forward(model.base, LAYER, queries)
    f_keys, _ = hooked_forward(model.base, LAYER, flipped(queries))
    _, r_x = np_resmem(q_keys, q_logits, keys, logits, mem_labels, 4, 0.5, 1.3)
    _, r_flip = np_resmem(f_keys, q_logits, keys, logits, mem_labels, 4, 0.5, 1.3)
    np.testing.assert_allclose(out.residual.detach().double().numpy(), (r_x + r_flip) / 2, atol=1e-5)
    base = np.exp(q_logits / 1.3) / np.exp(q_logits / 1.3).sum(1, keepdims=True)  # the base term is the unflipped x's
    np.testing.assert_allclose(out.scores.detach().double().numpy(), base + (r_x + r_flip) / 2, atol=1e-5)
    assert torch.equal(out.base_logits, plain_out.base_logits)
    assert not torch.allclose(out.residual, plain_out.residual, atol=1e-4)
    with pytest.raises(ValueError, match=r"without output_neighbors"):
        model(pixel_values=torch.from_numpy(queries), output_neighbors=True)
    model.config.residual_space = "logit"
    with pytest.raises(ValueError, match=r"query_augmentation = 'none'"):
        model(pixel_values=torch.from_numpy(queries))


def test_tune_with_query_augmentation_matches_numpy_and_the_forward(train, val):
    pixels, labels = dataset_arrays(train)
    queries, query_labels = dataset_arrays(val)
    model, other = wrapped(), make_base("cifar_resnet", seed=1)
    model.build_memory(train, batch_size=8, residual_model=other, augment="hflip")
    model.config.query_augmentation = "hflip"
    keys, logits, mem_labels = numpy_memory(model, other, pixels, labels, augment=True)
    q_keys, q_logits = hooked_forward(model.base, LAYER, queries)
    f_keys, _ = hooked_forward(model.base, LAYER, flipped(queries))
    result = model.tune(val, k=[1, 3, 8], sigma=[0.2, 2.0], temperature=[0.7, 1.3], batch_size=4)
    plain = {}
    for row in result:
        args = (keys, logits, mem_labels, row["k"], row["sigma"], row["temperature"])
        scores_x, r_x = np_resmem(q_keys, q_logits, *args)  # ResMem without query flips
        r_flip = np_resmem(f_keys, q_logits, *args)[1]
        ref = scores_x - r_x + (r_x + r_flip) / 2  # base probability of x plus the mean residual of both views
        assert row["accuracy"] == pytest.approx(float((ref.argmax(1) == query_labels).mean()))
        plain[(row["k"], row["sigma"], row["temperature"])] = float((scores_x.argmax(1) == query_labels).mean())
    assert any(row["accuracy"] != plain[(row["k"], row["sigma"], row["temperature"])] for row in result)  # flips matter
    # the chosen setting's predictions are the forward's (same two-view residual)
    best = result.best
    with torch.no_grad():
        forward = model(pixel_values=torch.from_numpy(queries)).scores.argmax(-1)
    assert torch.equal(result.predictions_for(best["k"], best["sigma"], best["temperature"]), forward)
    assert model.config.evaluations["validation"]["query_augmentation"] == "hflip"


def test_query_augmentation_makes_other_evaluations_stale(train, val):
    model = wrapped()
    model.build_memory(train)
    model.tune(val, k=[2, 4], sigma=[0.5], temperature=[1.3])
    record = model.config.evaluations["validation"]
    assert measured_at_current_settings(record, current_settings(model))
    model.config.query_augmentation = "hflip"
    assert current_settings(model)["query_augmentation"] == "hflip"
    assert not measured_at_current_settings(record, current_settings(model))
    model.tune(val, k=[2, 4], sigma=[0.5], temperature=[1.3])  # measured with flipped queries: the card says so
    assert "query_augmentation=hflip" in render_card(model)


# ------------------------------------------------------------------ persistence
def test_save_load_round_trip_keeps_every_variant(tmp_path, train, val):
    queries, _ = dataset_arrays(val)
    other = make_base("cifar_resnet", seed=1)
    model = wrapped()
    model.build_memory(train, residual_model=other, augment="hflip")
    model.config.query_augmentation = "hflip"
    model.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "resmem_memory.safetensors"), framework="pt") as f:
        assert f.metadata()["augmentation"] == "hflip"
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["memory_augmentation"] == "hflip" and saved["query_augmentation"] == "hflip"
    readme = (tmp_path / "README.md").read_text()
    assert "Residuals from another model" in readme and "Augmented memory: `hflip`" in readme

    loaded = ResMemWrapper.from_pretrained(tmp_path)
    assert loaded.memory.augmentation == "hflip" and loaded.config.memory_dataset["residual_model"]["fingerprint"] == base_fingerprint(other)
    x = torch.from_numpy(queries)
    assert torch.equal(loaded(pixel_values=x).scores, model(pixel_values=x).scores)
    with pytest.raises(ValueError, match=r"residual_model=that_model"):
        loaded.add_to_memory(train.select(range(2)))
    loaded.add_to_memory(train.select(range(2)), residual_model=other)
    assert len(loaded.memory) == 2 * N_TRAIN + 4


def test_default_build_writes_no_new_metadata(tmp_path, train):
    model = wrapped()
    model.build_memory(train)
    model.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "resmem_memory.safetensors"), framework="pt") as f:
        assert "augmentation" not in f.metadata()  # files of the paper's memory are unchanged
    assert set(model.config.memory_dataset) == {"fingerprint", "num_rows"}
    loaded = ResMemWrapper.from_pretrained(tmp_path)
    assert loaded.memory.augmentation == "none" and loaded.config.memory_augmentation == "none"


def test_a_memory_file_with_repeated_ids_but_no_augmentation_record_is_refused(tmp_path, train):
    from safetensors.torch import load_file, save_file

    from resmem.memory import MemoryFileError

    model = wrapped()
    model.build_memory(train, augment="hflip")
    model.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "resmem_memory.safetensors")
    with safe_open(path, framework="pt") as f:
        metadata = {key: value for key, value in f.metadata().items() if key != "augmentation"}
    save_file(load_file(path), path, metadata=metadata)
    with pytest.raises(MemoryFileError, match=r"example_ids.*must be unique"):
        ResMemWrapper.from_pretrained(tmp_path)


# ------------------------------------------------------------------ cross-fitting
def test_cross_fitted_residuals_take_each_rows_fold_model(train):
    folds = np.array([0, 1, 1, 0] * (N_TRAIN // 4))
    data = train.add_column("fold", folds.tolist())
    pixels, labels = dataset_arrays(train)
    model_a, model_b = make_base("cifar_resnet", seed=1), make_base("cifar_resnet", seed=2)
    model = wrapped()
    model.build_memory(data, batch_size=8, residual_model=[model_a, model_b], residual_fold="fold", augment="hflip")
    logits = []
    for view in (pixels, flipped(pixels)):
        a, b = hooked_forward(model_a, LAYER, view)[1], hooked_forward(model_b, LAYER, view)[1]
        logits.append(np.where(folds[:, None] == 0, a, b))  # row r: the model of its fold
    np.testing.assert_allclose(model.memory.base_logits.numpy(), np.concatenate(logits), rtol=1e-5, atol=1e-5)
    record = model.config.memory_dataset["residual_model"]
    assert record["fold_column"] == "fold"
    assert [m["fingerprint"] for m in record["cross_fitted"]] == [base_fingerprint(model_a), base_fingerprint(model_b)]
    from resmem.model_card import _memory_data_text

    assert "Residuals cross-fitted by column `fold`" in _memory_data_text(model.config.memory_dataset)
    # adding rows needs the same models in the same order and the fold column
    extra = data.select(range(4))
    with pytest.raises(ValueError, match=r"cross-fitted over 2 models.*same order"):
        model.add_to_memory(extra, residual_model=[model_b, model_a], residual_fold="fold")
    with pytest.raises(ValueError, match=r"cross-fitted over 2 models"):
        model.add_to_memory(extra, residual_model=model_a)
    model.add_to_memory(extra, residual_model=[model_a, model_b], residual_fold="fold")
    np.testing.assert_allclose(model.memory.base_logits[2 * N_TRAIN : 2 * N_TRAIN + 4].numpy(), logits[0][:4], atol=1e-5)


def test_cross_fitting_errors(train):
    model, models = wrapped(), [make_base("cifar_resnet", seed=1), make_base("cifar_resnet", seed=2)]
    with pytest.raises(ValueError, match=r"residual_fold=\"fold\""):
        model.build_memory(train, residual_model=models)
    with pytest.raises(ValueError, match=r"'fold' is not a column of the data.*add_column"):
        model.build_memory(train, residual_model=models, residual_fold="fold")
    with pytest.raises(ValueError, match=r"folds \[2\] outside \[0, 2\)"):
        model.build_memory(train.add_column("fold", [2] + [0] * (N_TRAIN - 1)), residual_model=models, residual_fold="fold")
    with pytest.raises(ValueError, match=r"with one residual_model drop residual_fold"):
        model.build_memory(train, residual_model=models[0], residual_fold="fold")
    with pytest.raises(ValueError, match=r"pass the models too"):
        model.build_memory(train, residual_fold="fold")
    assert len(model.memory) == 0


# ------------------------------------------------------------------ every variant at once (the ablation's combinations)
def test_all_variants_together_match_numpy_in_forward_and_tune(train, val):
    """Standardised keys + relative sigma + residual model + flipped memory + flipped queries, checked against numpy.

    Catches a variant that one path forgets (e.g. flipped queries that skip the key normalisation).
    """
    pixels, labels = dataset_arrays(train)
    queries, query_labels = dataset_arrays(val)
    model, other = wrapped(), make_base("cifar_resnet", seed=1)
    model.config.key_normalization = "standardize"
    model.config.sigma_mode = "relative"
    model.build_memory(train, batch_size=8, residual_model=other, augment="hflip")
    model.config.query_augmentation = "hflip"
    raw_keys, logits, mem_labels = numpy_memory(model, other, pixels, labels, augment=True)
    mean, std = raw_keys.mean(0), raw_keys.std(0)  # population statistics of ALL stored keys (both views)
    keys = (raw_keys - mean) / std
    q_keys, q_logits = hooked_forward(model.base, LAYER, queries)
    f_keys, _ = hooked_forward(model.base, LAYER, flipped(queries))

    def np_relative_residual(qk, k, sigma, temperature):
        d = np.sqrt(((qk[:, None, :] - keys[None]) ** 2).sum(-1))  # (B, N)
        ids = np.argsort(d, axis=1, kind="stable")[:, :k]
        dk = np.take_along_axis(d, ids, 1)  # (B, k) ascending
        z = -dk / (sigma * dk[:, -1:])
        w = np.exp(z - z.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        p = np.exp(logits / temperature - (logits / temperature).max(1, keepdims=True))
        r = np.eye(logits.shape[1])[mem_labels] - p / p.sum(1, keepdims=True)  # (N, C)
        return (w[:, :, None] * r[ids]).sum(1)

    def np_scores(k, sigma, temperature):
        base = np.exp(q_logits / temperature - (q_logits / temperature).max(1, keepdims=True))
        base /= base.sum(1, keepdims=True)
        r = (np_relative_residual((q_keys - mean) / std, k, sigma, temperature)
             + np_relative_residual((f_keys - mean) / std, k, sigma, temperature)) / 2
        return base + r

    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(queries))
    np.testing.assert_allclose(out.scores.double().numpy(), np_scores(4, 0.5, 1.3), atol=2e-5)
    result = model.tune(val, k=[2, 5], sigma=[0.3, 1.0], temperature=[0.7, 1.3], batch_size=4,
                        sigma_mode=["absolute", "relative"])
    for row in result:
        if row["sigma_mode"] == "relative":
            ref = np_scores(row["k"], row["sigma"], row["temperature"]).argmax(1)
            assert row["accuracy"] == pytest.approx(float((ref == query_labels).mean()))
    best = result.best
    with torch.no_grad():
        forward = model(pixel_values=torch.from_numpy(queries)).scores.argmax(-1)
    assert torch.equal(result.predictions_for(best["k"], best["sigma"], best["temperature"]), forward)
