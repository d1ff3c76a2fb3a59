"""resmem.scoring (the one metrics module) and resmem.evaluate (both tasks, configured setting only).

Every number is checked against an independent numpy computation: from random predictions for the
metrics, and from the model's own forward outputs for `resmem.evaluate`.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import NUM_LABELS, dataset_arrays, make_base, make_pixel_dataset
from lm_helpers import distinct_sequences, tiny_base

import resmem
from resmem import ResMemWrapper
from resmem import evaluation_lm, scoring, tuning
from resmem.evaluation_lm import evaluate_lm
from resmem.scoring import (
    decompose,
    format_summary,
    format_table,
    per_class_gain,
    perplexity,
    prediction_counts,
    rates_from_counts,
    select_best,
)


# ------------------------------------------------------------------ numpy references
def np_rates(base, resmem_pred, labels) -> dict:
    base, resmem_pred, labels = (np.asarray(a) for a in (base, resmem_pred, labels))
    b, r = base == labels, resmem_pred == labels
    n = len(labels)
    return {
        "base_accuracy": b.mean(), "resmem_accuracy": r.mean(), "tpr": (~b & r).mean(), "fpr": (b & ~r).mean(),
        "gain": r.mean() - b.mean(), "num_examples": n,
    }


def assert_rates(got: dict, ref: dict) -> None:
    assert got["num_examples"] == ref["num_examples"]
    for key in ("base_accuracy", "resmem_accuracy", "tpr", "fpr", "gain"):
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key


# ------------------------------------------------------------------ metrics from predictions and counts
@pytest.mark.parametrize("seed", range(5))
def test_decompose_and_counts_match_numpy(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 40)), int(rng.integers(2, 6))
    labels, base, res = (rng.integers(0, c, n) for _ in range(3))
    ref = np_rates(base, res, labels)
    assert_rates(decompose(torch.tensor(base), torch.tensor(res), torch.tensor(labels)), ref)
    assert_rates(decompose(base.tolist(), res.tolist(), labels.tolist()), ref)  # lists work too
    b, r = base == labels, res == labels
    counts = (n, int(b.sum()), int(r.sum()), int((~b & r).sum()), int((b & ~r).sum()))
    assert prediction_counts(torch.tensor(base), torch.tensor(res), torch.tensor(labels)) == counts
    assert_rates(rates_from_counts(*counts), ref)


@pytest.mark.parametrize("seed", range(3))
def test_per_class_gain_matches_numpy(seed):
    rng = np.random.default_rng(10 + seed)
    c = 4
    labels = rng.integers(0, c - 1, 30)  # class c-1 has no example
    base, res = rng.integers(0, c, 30), rng.integers(0, c, 30)
    rows = per_class_gain(torch.tensor(base), torch.tensor(res), torch.tensor(labels), c, {"0": "zero"})
    assert [r["label"] for r in rows] == list(range(c)) and rows[0]["name"] == "zero" and rows[1]["name"] == "1"
    for row in rows[:-1]:
        mask = labels == row["label"]
        assert row["count"] == mask.sum()
        ref = np_rates(base[mask], res[mask], labels[mask])
        for key in ("base_accuracy", "resmem_accuracy", "tpr", "fpr", "gain"):
            assert row[key] == pytest.approx(ref[key], abs=1e-12)
    assert rows[-1]["count"] == 0 and rows[-1]["gain"] is None and rows[-1]["tpr"] is None


def test_perplexity_matches_numpy():
    logp = np.log(np.random.default_rng(3).uniform(0.01, 1.0, 17))
    assert perplexity(-logp.sum(), 17) == pytest.approx(np.exp(-logp.mean()), rel=1e-12)
    with pytest.raises(ValueError, match="zero tokens"):
        perplexity(0.0, 0)


def test_bad_counts_and_predictions_name_the_fix():
    with pytest.raises(ValueError, match="zero examples"):
        rates_from_counts(0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="Inconsistent counts"):
        rates_from_counts(10, 5, 6, 0, 0)  # resmem_correct - base_correct must equal fixed - broken
    with pytest.raises(ValueError, match="same length"):
        decompose([0, 1], [0], [0, 1])


# ------------------------------------------------------------------ the one select_best
def test_select_best_is_one_implementation_with_tunings_fallback():
    assert tuning.select_best is scoring.select_best
    assert not hasattr(evaluation_lm, "best_setting") and not hasattr(evaluation_lm, "best_lambda")
    rows = [
        dict(k=1, accuracy=0.80, tpr=0.10, fpr=0.08),
        dict(k=2, accuracy=0.85, tpr=0.12, fpr=0.06),
        dict(k=3, accuracy=0.85, tpr=0.11, fpr=0.04),
        dict(k=4, accuracy=0.70, tpr=0.05, fpr=0.07),
    ]
    assert select_best(rows, "accuracy", 0.05)["k"] == 3  # tie on accuracy: the lower FPR
    assert select_best(rows, "conservative", 0.05)["k"] == 3  # the only FPR < 0.05
    assert select_best(rows, "conservative", 0.07)["k"] == 2  # highest TPR among FPR < 0.07
    with pytest.warns(UserWarning, match="No combination of the grid keeps FPR < 0.01; picking the lowest FPR"):
        fallback = select_best(rows, "conservative", 0.01)
    assert fallback["k"] == 3  # the lowest FPR, as tuning has always done
    fallback["k"] = 99
    assert rows[2]["k"] == 3  # a copy is returned


# ------------------------------------------------------------------ the table formatter
def test_format_table_and_summary():
    rows = [
        {"split": "test", **rates_from_counts(4, 2, 3, 1, 0)},
        {"split": "paper", "base_accuracy": 0.5, "resmem_accuracy": 0.6, "gain": 0.1},
    ]
    text = format_table(rows, title="Results")
    assert text.startswith("### Results\n\n| split | DeepNet acc | ResMem acc | TPR | FPR | Gain |\n|---|---|---|---|---|---|\n")
    assert "| test | 50.00% | 75.00% | 25.00% | 0.00% | +25.00% |" in text
    assert "| paper | 50.00% | 60.00% | - | - | +10.00% |" in text
    tuning_row = {"k": 5, "sigma": 0.5, "temperature": 1.0, "accuracy": 0.75, "base_accuracy": 0.5, "tpr": 0.25,
                  "fpr": 0.0, "gain": 0.25}
    assert "| 1 | 5 | 0.5 | 50.00% | 75.00% |" in format_table([tuning_row])  # "accuracy" read as ResMem's
    line = format_summary({**tuning_row, "num_examples": 4, "split": "validation"})
    assert line == ("k=5 sigma=0.5 T=1  accuracy 50.00% -> 75.00%  TPR 25.00%  FPR 0.00%  gain +25.00%  "
                    "(4 examples of split 'validation')")
    with pytest.raises(ValueError, match="Unknown table columns"):
        format_table(rows, columns=("split", "best_lambda"))


# ------------------------------------------------------------------ resmem.evaluate: image classifier
@pytest.fixture(scope="module")
def image_model():
    model = ResMemWrapper.from_base(make_base("resnet", seed=3), k=4, sigma=0.7, temperature=1.3)
    model.build_memory(make_pixel_dataset(40, seed=3), batch_size=40)
    return model


def test_evaluate_image_classifier_matches_numpy_from_the_forward(image_model):
    test = make_pixel_dataset(25, seed=8)
    result = resmem.evaluate(image_model, test, split="test", batch_size=7, progress=False)
    pixels, labels = dataset_arrays(test)
    with torch.no_grad():
        out = image_model(pixel_values=torch.from_numpy(pixels))
    base = out.base_logits.numpy().argmax(-1)
    res = out.scores.numpy().argmax(-1)
    assert (base != res).any(), "the memory must change some predictions for this test to mean anything"
    assert_rates(result, np_rates(base, res, labels))
    assert result["task"] == "image-classification" and result["unit"] == "examples" and result["split"] == "test"
    assert (result["k"], result["sigma"], result["temperature"]) == (4, 0.7, 1.3)
    for row in result["per_class"]:
        mask = labels == row["label"]
        assert row["count"] == mask.sum()
        if mask.any():
            assert row["gain"] == pytest.approx(np_rates(base[mask], res[mask], labels[mask])["gain"], abs=1e-12)
    assert len(result["per_class"]) == NUM_LABELS
    assert image_model.config.last_evaluation["resmem_accuracy"] == result["resmem_accuracy"]
    assert image_model.config.last_evaluation["split"] == "test"
    assert image_model.config.last_evaluation["source"] == "evaluate"
    json.dumps(result)  # JSON-safe


def test_evaluate_is_public():
    assert "evaluate" in resmem.__all__ and resmem.evaluate is resmem.evaluation.evaluate


def test_evaluate_rejects_the_other_tasks_arguments(image_model):
    with pytest.raises(ValueError, match="max_tokens, tokenizer apply to causal LMs only"):
        resmem.evaluate(image_model, make_pixel_dataset(4, seed=1), tokenizer=object(), max_tokens=3)


# ------------------------------------------------------------------ resmem.evaluate: causal LM
@pytest.fixture(scope="module")
def lm_model():
    model = ResMemWrapper.from_base(tiny_base("llama"), k=3, sigma=0.7, temperature=1.2)
    model.build_memory(distinct_sequences(4, 20), window=12, stride=8, residual_top_m=16)
    return model


HELD_OUT = distinct_sequences(3, 10, seed=5)  # one window each: every position with a next token


def forward_reference(model, ids) -> dict:
    """Numpy metrics from the model's own forward outputs at its current config."""
    with torch.no_grad():
        out = model(ids)
    labels = ids[:, 1:].numpy().reshape(-1)
    logits = out.logits[:, :-1].double().numpy().reshape(len(labels), -1)  # log-distribution of config.distribution
    base_logits = out.base_logits[:, :-1].double().numpy().reshape(len(labels), -1)
    top = base_logits.max(-1, keepdims=True)
    base_logp = base_logits - top - np.log(np.exp(base_logits - top).sum(-1, keepdims=True))  # log_softmax
    rows = np.arange(len(labels))
    ref = np_rates(base_logits.argmax(-1), out.scores[:, :-1].numpy().reshape(len(labels), -1).argmax(-1), labels)
    ref["ppl"] = math.exp(-logits[rows, labels].mean())
    ref["base_ppl"] = math.exp(-base_logp[rows, labels].mean())
    return ref


def _set(model, **values):
    saved = {key: getattr(model.config, key) for key in values}
    for key, value in values.items():
        setattr(model.config, key, value)
    return saved


def test_evaluate_causal_lm_reports_the_clamp_perplexity(lm_model):
    saved = _set(lm_model, distribution="clamp")
    try:
        ref = forward_reference(lm_model, HELD_OUT)
        result = resmem.evaluate(lm_model, HELD_OUT, window=12, stride=8, split="test", progress=False)
    finally:
        _set(lm_model, **saved)
    assert_rates(result, ref)
    assert result["num_examples"] == 27 and result["unit"] == "token positions" and result["task"] == "causal-lm"
    assert result["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)
    assert result["base_ppl"] == pytest.approx(ref["base_ppl"], rel=1e-4)
    assert result["distribution"] == "clamp" and "mixture_lambda" not in result
    assert (result["k"], result["sigma"], result["temperature"]) == (3, 0.7, 1.2)
    assert lm_model.config.last_evaluation["ppl"] == result["ppl"]
    assert lm_model.config.last_evaluation["split"] == "test"


def test_evaluate_causal_lm_reports_the_configured_lambda_even_when_another_is_better(lm_model):
    """No selection on the evaluated data: the configured (worse) mixture weight's perplexity is reported."""
    ppl = {}
    for lam in (0.05, 0.95):
        saved = _set(lm_model, distribution="mixture", mixture_lambda=lam)
        try:
            ppl[lam] = forward_reference(lm_model, HELD_OUT)["ppl"]
        finally:
            _set(lm_model, **saved)
    worse, better = sorted(ppl, key=ppl.get, reverse=True)
    assert ppl[worse] > 1.01 * ppl[better], ppl  # the two lambdas really differ
    saved = _set(lm_model, distribution="mixture", mixture_lambda=worse)
    try:
        result = resmem.evaluate(lm_model, HELD_OUT, window=12, stride=8, record=False, progress=False)
        assert (lm_model.config.mixture_lambda, lm_model.config.distribution) == (worse, "mixture")  # left alone
        # the grid of evaluate_lm (tune's tool) holds the better lambda; evaluate did not pick it
        grid = evaluate_lm(lm_model, HELD_OUT, lambdas=[worse, better], window=12, stride=8)[0]
        assert grid["ppl_mixture"][str(better)] < grid["ppl_mixture"][str(worse)]
    finally:
        _set(lm_model, **saved)
    assert result["ppl"] == pytest.approx(ppl[worse], rel=1e-4)
    assert result["mixture_lambda"] == worse and result["distribution"] == "mixture"
    assert f"distribution=mixture (lambda {worse:g})" in format_summary(result)
    assert result["ppl"] != pytest.approx(ppl[better], rel=1e-3)


def test_evaluate_causal_lm_rejects_image_arguments(lm_model):
    with pytest.raises(ValueError, match="image_processor apply to image classifiers only"):
        resmem.evaluate(lm_model, HELD_OUT, image_processor=object())


def test_evaluate_lm_tables_print_no_best_lambda(lm_model):
    results = evaluate_lm(lm_model, HELD_OUT, ks=[1, 3], lambdas=[0.2, 0.8], window=12, stride=8)
    text = format_table(results, columns=("temperature", "k", "sigma", *evaluation_lm.TABLE_COLUMNS))
    assert "lambda" not in text and "(lam)" not in text and "mixture" not in text
    assert text.count("\n") == 2 + 2  # header, rule, one row per k


def test_summary_of_an_lm_evaluation(lm_model):
    result = resmem.evaluate(lm_model, HELD_OUT, window=12, stride=8, split="test", record=False, progress=False)
    line = format_summary(result)
    assert line.startswith("k=3 sigma=0.7 T=1.2 distribution=clamp  next-token accuracy ")
    assert f"perplexity {result['base_ppl']:.2f} -> {result['ppl']:.2f}" in line
    assert line.endswith("(27 token positions of split 'test')")


def test_evaluate_picks_the_split_of_a_dataset_dict(image_model):
    """`resmem.evaluate(model, dataset_dict, split="test")` evaluates that split, the same as passing it."""
    import datasets

    model, test = image_model, make_pixel_dataset(12, seed=5)
    other = test.select(range(min(2, len(test))))
    dd = datasets.DatasetDict({"validation": other, "test": test})
    direct = resmem.evaluate(model, test, split="test", record=False, progress=False)
    picked = resmem.evaluate(model, dd, split="test", record=False, progress=False)
    assert picked == direct and picked["num_examples"] == len(test)
    with pytest.raises(ValueError, match="pass split= naming the one to evaluate"):
        resmem.evaluate(model, dd, record=False, progress=False)
    with pytest.raises(ValueError, match="'train' is not in the DatasetDict"):
        resmem.evaluate(model, dd, split="train", record=False, progress=False)


def test_select_best_warns_when_every_setting_lowers_accuracy():
    """A grid whose best row still loses to the base is chosen (tune must set something) but never silently."""
    rows = [{"k": k, "accuracy": 0.5 - 0.01 * k, "tpr": 0.01, "fpr": 0.02 + 0.01 * k, "gain": -0.01 - 0.01 * k}
            for k in (1, 2)]
    with pytest.warns(UserWarning, match=r"best gain -2\.00 points"):
        assert select_best(rows, "accuracy", 0.05)["k"] == 1
    rows[0]["gain"], rows[0]["accuracy"] = 0.0, 0.6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_best(rows, "accuracy", 0.05)["k"] == 1
