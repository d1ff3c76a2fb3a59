"""Config values that were accepted but gave wrong results (NaN scores, non-finite logits, a changed argmax, an
ignored memory) are refused where they are set: at construction, on assignment, and at load."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import NUM_LABELS, make_base, make_pixel_dataset
from lm_helpers import VOCAB, tiny_base

from resmem import ResMemConfig, ResMemWrapper
from resmem.configuration_resmem import MIN_RESIDUAL_TEMPERATURE
from resmem.residuals import resmem_scores

NAN, INF = float("nan"), float("inf")
T_FIX = r"residual_temperature must be a finite number >= 0\.0001.*model\.config\.residual_temperature = "
SIGMA_FIX = r"sigma must be a finite number > 0.*model\.config\.sigma = "
K_FIX = r"k must be an integer >= 1"
LAMBDA_FIX = r"mixture_lambda must lie in \[0, 1\] \(a finite number\)"
FLOOR_FIX = r"score_floor must lie strictly between 0 and 1/C = 0\.2 \(C = 5 classes.*Use e\.g\. 1e-8"

BAD_VALUES = [
    ("residual_temperature", 1e-300, T_FIX),
    ("residual_temperature", 1e-5, T_FIX),
    ("residual_temperature", NAN, T_FIX),
    ("residual_temperature", INF, T_FIX),
    ("sigma", NAN, SIGMA_FIX),
    ("sigma", INF, SIGMA_FIX),
    ("k", NAN, K_FIX),
    ("k", INF, K_FIX),
    ("mixture_lambda", NAN, LAMBDA_FIX),
    ("mixture_lambda", INF, LAMBDA_FIX),
    ("mixture_lambda", 1.5, LAMBDA_FIX),
    ("score_floor", -1.0, FLOOR_FIX),
    ("score_floor", 0.0, FLOOR_FIX),
    ("score_floor", NAN, FLOOR_FIX),
    ("score_floor", 2.0, FLOOR_FIX),
    ("score_floor", 1.0 / NUM_LABELS, FLOOR_FIX),
]
IDS = [f"{name}={value!r}" for name, value, _ in BAD_VALUES]


@pytest.fixture(scope="module")
def built():
    model = ResMemWrapper.from_base(make_base("resnet", seed=0), k=3, sigma=0.8)
    model.build_memory(make_pixel_dataset(30, seed=0), batch_size=16)
    return model


@pytest.mark.parametrize("name, value, match", BAD_VALUES, ids=IDS)
def test_bad_value_at_construction(name, value, match):
    with pytest.raises(ValueError, match=match):
        ResMemWrapper.from_base(make_base("resnet"), **{name: value})


@pytest.mark.parametrize("name, value, match", BAD_VALUES, ids=IDS)
def test_bad_value_assigned_after_construction(built, name, value, match):
    before = getattr(built.config, name)
    with pytest.raises(ValueError, match=match):
        setattr(built.config, name, value)
    assert getattr(built.config, name) == before  # refused, not stored


@pytest.mark.parametrize("name, value, match", BAD_VALUES[:3] + BAD_VALUES[-2:], ids=IDS[:3] + IDS[-2:])
def test_bad_value_in_a_saved_config(tmp_path, name, value, match):
    model = ResMemWrapper.from_base(make_base("resnet"))
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    data = json.loads(path.read_text())
    data[name] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        ResMemConfig.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=match):
        ResMemWrapper.from_pretrained(tmp_path / "m")


def test_good_values_are_still_accepted(built):
    config = built.config
    saved = (config.residual_temperature, config.sigma, config.k, config.mixture_lambda, config.score_floor)
    try:
        config.residual_temperature, config.sigma, config.k = MIN_RESIDUAL_TEMPERATURE, 1e6, np.int64(2)
        config.mixture_lambda, config.score_floor = 0.0, 0.199
        config.mixture_lambda = 1
    finally:
        (config.residual_temperature, config.sigma, config.k, config.mixture_lambda, config.score_floor) = saved


# ------------------------------------------------------------------ the bounds are the right ones
def _np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_tiny_temperature_is_what_gave_nan_scores():
    logits = torch.tensor([[100.0, -50.0, 3.0]])
    assert torch.isnan(resmem_scores(logits, torch.zeros(1, 3), 1e-300)).all()  # why 1e-300 must be refused


@pytest.mark.parametrize("scale", [100.0, 65504.0])  # logits of magnitude ~100, and at the float16 limit
def test_smallest_allowed_temperature_keeps_scores_finite(scale):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 50, generator=g) * scale).float()  # (N, C) float32
    residual = torch.randn(64, 50, generator=g) * 0.01  # (N, C)
    scores = resmem_scores(logits, residual, MIN_RESIDUAL_TEMPERATURE)  # (N, C)
    assert torch.isfinite(scores).all()
    expected = _np_softmax(logits.double().numpy() / MIN_RESIDUAL_TEMPERATURE) + residual.double().numpy()
    np.testing.assert_allclose(scores.numpy(), expected, atol=1e-6)


def test_extreme_allowed_values_give_finite_logits_with_the_scores_argmax(built, query_pixels):
    """T at its minimum on base logits of magnitude ~100, and a floor just below 1/C: finite logits whose argmax
    is the scores' argmax (the two promises the bounds protect)."""
    config = built.config
    saved = (config.residual_temperature, config.score_floor)
    head = built.base.classifier[1]
    weight = head.weight.detach().clone()
    try:
        with torch.no_grad():
            head.weight.mul_(100.0 / built(pixel_values=query_pixels).base_logits.abs().max())
            out_scaled = built(pixel_values=query_pixels)
        assert 50 < out_scaled.base_logits.abs().max() < 200
        for t, floor in ((MIN_RESIDUAL_TEMPERATURE, 1e-8), (1.0, 0.999 / NUM_LABELS), (MIN_RESIDUAL_TEMPERATURE, 0.999 / NUM_LABELS)):
            config.residual_temperature, config.score_floor = t, floor
            with torch.no_grad():
                out = built(pixel_values=query_pixels)
            assert torch.isfinite(out.scores).all() and torch.isfinite(out.logits).all()
            assert torch.equal(out.logits.argmax(-1), out.scores.argmax(-1))
    finally:
        with torch.no_grad():
            head.weight.copy_(weight)
        config.residual_temperature, config.score_floor = saved


def test_score_floor_bound_uses_the_vocabulary_for_causal_lms():
    model = ResMemWrapper.from_base(tiny_base("llama"))
    assert model.config.num_classes() == VOCAB
    model.config.score_floor = 0.99 / VOCAB
    with pytest.raises(ValueError, match=rf"1/C = {1 / VOCAB:.3g} \(C = {VOCAB} classes or vocabulary"):
        model.config.score_floor = 1.0 / VOCAB
    with pytest.raises(ValueError, match=r"score_floor must lie strictly between 0 and 1/C"):
        ResMemWrapper.from_base(tiny_base("llama"), score_floor=0.01)


# ------------------------------------------------------------------ memory_size 0 with a memory file
def test_memory_size_zero_with_a_memory_file_refuses_to_load(built, tmp_path):
    built.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    data = json.loads(path.read_text())
    assert data["memory_size"] == len(built.memory) and os.path.isfile(tmp_path / "m" / "resmem_memory.safetensors")
    data["memory_size"] = 0
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"resmem_memory\.safetensors but its config\.json says memory_size 0.*"
                                         r"Set \"memory_size\" in config\.json.*or delete resmem_memory\.safetensors"):
        ResMemWrapper.from_pretrained(tmp_path / "m")
    os.remove(tmp_path / "m" / "resmem_memory.safetensors")  # the fix named by the error
    assert len(ResMemWrapper.from_pretrained(tmp_path / "m").memory) == 0


def test_model_saved_without_memory_still_loads(tmp_path):
    ResMemWrapper.from_base(make_base("resnet")).save_pretrained(tmp_path / "empty")
    assert len(ResMemWrapper.from_pretrained(tmp_path / "empty").memory) == 0
    assert math.isclose(ResMemConfig.from_pretrained(tmp_path / "empty").score_floor, 1e-8)


def test_tune_grid_below_the_smallest_temperature_is_refused(built):
    with pytest.raises(ValueError, match=r"Every temperature of the grid must be >= 0\.0001; got 1e-300"):
        built.tune(make_pixel_dataset(10, seed=1), k=[2], sigma=[0.5], temperature=[1.0, 1e-300], batch_size=10)
