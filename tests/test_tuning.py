"""model.tune(): one neighbour search, every (k, sigma, T) scored from the cache, checked by brute force."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from conftest import NUM_LABELS, dataset_arrays, make_base, make_pixel_dataset

from resmem import ResMemWrapper, ResidualMemory
from resmem.evaluation import decompose, predict
from resmem.tuning import TuneResult

MEMORY_SIZE = 60
GRID = dict(k=[1, 4, 15], sigma=[0.05, 0.5, 3.0], temperature=[0.5, 1.0, 2.5])


def near_memory_dataset(memory: datasets.Dataset, n_near: int, n_far: int, seed: int) -> datasets.Dataset:
    """Noisy copies of memory examples (same label: ResMem should fix them) plus unrelated random points."""
    rng = np.random.default_rng(seed)
    pixels, labels = dataset_arrays(memory)
    pick = rng.choice(len(labels), n_near, replace=False)
    near = pixels[pick] + 0.3 * rng.standard_normal(pixels[pick].shape).astype(np.float32)
    far = rng.standard_normal((n_far,) + pixels.shape[1:]).astype(np.float32)
    far_labels = rng.integers(0, NUM_LABELS, n_far)
    return datasets.Dataset.from_dict(
        {"pixel_values": np.concatenate([near, far]), "label": np.concatenate([labels[pick], far_labels]).astype(np.int64)}
    )


@pytest.fixture(scope="module")
def problem():
    memory = make_pixel_dataset(MEMORY_SIZE, seed=2)
    model = ResMemWrapper.from_base(make_base("resnet", seed=4), k=3, sigma=1.0, temperature=1.0)
    model.build_memory(memory, batch_size=64)
    return model, near_memory_dataset(memory, 24, 16, seed=7)


def brute_force(model, val, grid) -> list[dict]:
    """Every combination through the plain forward pass, config set each time (the independent check)."""
    saved = (model.config.k, model.config.sigma, model.config.residual_temperature)
    rows = []
    try:
        for k in grid["k"]:
            for sigma in grid["sigma"]:
                for temperature in grid["temperature"]:
                    model.config.k, model.config.sigma, model.config.residual_temperature = k, sigma, temperature
                    preds = predict(model, val, batch_size=64)
                    rows.append(dict(k=k, sigma=sigma, temperature=temperature, **decompose(preds.base, preds.resmem, preds.labels)))
    finally:
        model.config.k, model.config.sigma, model.config.residual_temperature = saved
    return rows


@pytest.fixture(scope="module")
def brute(problem):
    model, val = problem
    return brute_force(model, val, GRID)


def test_table_equals_brute_force(problem, brute):
    model, val = problem
    result = model.tune(val, **GRID, set_best=False, batch_size=64)
    assert isinstance(result, TuneResult) and len(result) == 27
    for row, ref in zip(result, brute):
        assert (row["k"], row["sigma"], row["temperature"]) == (ref["k"], ref["sigma"], ref["temperature"])
        for key_tuned, key_ref in (("accuracy", "resmem_accuracy"), ("tpr", "tpr"), ("fpr", "fpr"), ("base_accuracy", "base_accuracy")):
            assert row[key_tuned] == ref[key_ref], (row, ref)
        assert row["gain"] == pytest.approx(ref["gain"], abs=1e-12)
    # The grid is not degenerate: the combinations really differ.
    assert len({r["accuracy"] for r in result}) > 3
    assert max(r["accuracy"] for r in result) > result.base_accuracy


@pytest.mark.parametrize("objective", ["accuracy", "conservative"])
def test_best_matches_brute_force_and_is_set_on_config(problem, brute, objective):
    model, val = problem
    saved = (model.config.k, model.config.sigma, model.config.residual_temperature)
    try:
        result = model.tune(val, **GRID, objective=objective, max_fpr=0.05, batch_size=64)
        best = result.best
        assert (model.config.k, model.config.sigma, model.config.residual_temperature) == (best["k"], best["sigma"], best["temperature"])
        if objective == "accuracy":
            top = max(r["resmem_accuracy"] for r in brute)
            winners = [r for r in brute if r["resmem_accuracy"] == top]
        else:
            feasible = [r for r in brute if r["fpr"] < 0.05]
            assert feasible, "the test grid must contain a combination with FPR < 0.05"
            top = max(r["tpr"] for r in feasible)
            winners = [r for r in feasible if r["tpr"] == top]
        assert (best["k"], best["sigma"], best["temperature"]) in {(r["k"], r["sigma"], r["temperature"]) for r in winners}
        # The chosen setting gives the tabulated numbers through the plain forward pass.
        preds = predict(model, val, batch_size=64)
        assert decompose(preds.base, preds.resmem, preds.labels)["resmem_accuracy"] == best["accuracy"]
        assert model.config.last_evaluation["resmem_accuracy"] == best["accuracy"]
        assert model.config.last_evaluation["k"] == best["k"]
        assert model.config.last_evaluation["source"] == f"tune ({objective})"
    finally:
        model.config.k, model.config.sigma, model.config.residual_temperature = saved


def test_one_search_at_the_largest_k(problem, monkeypatch):
    model, val = problem
    calls = []
    original = ResidualMemory.search

    def counting(self, queries, k, *args, **kwargs):
        calls.append((queries.shape[0], k))
        return original(self, queries, k, *args, **kwargs)

    monkeypatch.setattr(ResidualMemory, "search", counting)
    model.tune(val, **GRID, set_best=False, batch_size=len(val))
    assert calls == [(len(val), max(GRID["k"]))]


def test_result_is_json_serialisable_and_predictions_are_kept(problem):
    model, val = problem
    result = model.tune(val, k=[2, 2, 5], sigma=0.5, temperature=None, set_best=False)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["grid"] == {"k": [2, 5], "sigma": [0.5], "temperature": [model.config.residual_temperature]}
    assert len(data["table"]) == 2
    assert result.predictions.shape == (1, 1, 2, len(val))
    assert result.predictions_for(5, 0.5, model.config.residual_temperature).shape == (len(val),)


def test_conservative_without_feasible_combination_warns(problem):
    model, val = problem
    with pytest.warns(UserWarning, match="No combination of the grid keeps FPR"):
        result = model.tune(val, k=[MEMORY_SIZE], sigma=[100.0], temperature=[5.0], objective="conservative",
                            max_fpr=1e-9, set_best=False)
    assert result.best["fpr"] == min(r["fpr"] for r in result)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=[]), r"The k grid is empty"),
        (dict(sigma=[]), r"The sigma grid is empty"),
        (dict(temperature=[]), r"The temperature grid is empty"),
        (dict(k=[0, 3]), r"k of the grid must be an integer >= 1"),  # k > memory size is clamped (test_tune_behaviour)
        (dict(k=[2.5]), r"k of the grid must be an integer"),
        (dict(sigma=[0.0]), r"sigma of the grid must be a finite number > 0"),
        (dict(sigma=[-1.0, 1.0]), r"sigma of the grid must be a finite number > 0"),
        (dict(temperature=[float("nan")]), r"temperature of the grid must be a finite number > 0"),
        (dict(temperature=[0]), r"temperature of the grid must be a finite number > 0"),
        (dict(max_fpr=0.0), r"max_fpr must lie in \(0, 1\)"),
        (dict(max_fpr=1.0), r"max_fpr must lie in \(0, 1\)"),
        (dict(max_fpr=-0.1), r"max_fpr must lie in \(0, 1\)"),
        (dict(objective="f1"), r"objective must be one of"),
    ],
)
def test_bad_grid_or_objective(problem, kwargs, match):
    model, val = problem
    before = (model.config.k, model.config.sigma, model.config.residual_temperature)
    with pytest.raises(ValueError, match=match):
        model.tune(val, **kwargs)
    assert (model.config.k, model.config.sigma, model.config.residual_temperature) == before


@pytest.mark.parametrize("bad_label", [NUM_LABELS, -1])
def test_validation_labels_outside_the_model_range(problem, bad_label):
    model, val = problem
    labels = val["label"][:]
    labels[3] = bad_label
    bad = val.remove_columns("label").add_column("label", labels)
    with pytest.raises(ValueError, match=rf"Validation labels must lie in \[0, {NUM_LABELS}\).*\[{bad_label}\]"):
        model.tune(bad, k=[1, 2])


def test_tune_on_empty_memory_names_the_fix():
    model = ResMemWrapper.from_base(make_base("resnet"), k=3)
    with pytest.raises(ValueError, match="build_memory"):
        model.tune(make_pixel_dataset(8, seed=1), k=[1])


def test_dense_and_callable_residual_paths_agree(problem):
    from resmem.tuning import collect_neighbours, grid_predictions

    model, val = problem
    cache = collect_neighbours(model, val, k_max=15)
    grid = (GRID["k"], GRID["sigma"], GRID["temperature"])
    dense = grid_predictions(cache, *grid, memory_logits=model.memory.base_logits, memory_labels=model.memory.labels)
    generic = grid_predictions(cache, *grid, neighbour_residuals=model.memory.neighbour_residuals, chunk_elements=5000)
    assert dense.shape == (3, 3, 3, len(val))
    assert torch.equal(dense, generic)
    with pytest.raises(ValueError, match="either memory_logits and memory_labels, or neighbour_residuals"):
        grid_predictions(cache, *grid)
