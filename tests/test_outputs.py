"""Task dispatch through the task -> class map, and the outputs: transformers' output classes plus ResMem's
fields, `return_dict` as in transformers, and the loss against an independent numpy NLL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_base, make_pixel_dataset, random_pixels
from lm_helpers import distinct_sequences, tiny_base
from transformers.modeling_outputs import CausalLMOutputWithPast, ImageClassifierOutput

import resmem
from resmem import ResMemConfig, ResMemForCausalLM, ResMemForImageClassification, ResMemWrapper
from resmem.tasks import TASK_TO_RESMEM_MODEL_MAPPING, task_class


def np_log_probs(scores: np.ndarray, floor: float) -> np.ndarray:
    """`log(renormalise(clamp(scores, floor)))` in float64."""
    clamped = np.maximum(scores.astype(np.float64), floor)
    return np.log(clamped / clamped.sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def image_model():
    model = ResMemWrapper.from_base(make_base("resnet", seed=1), k=4, sigma=0.7, temperature=1.3)
    model.build_memory(make_pixel_dataset(30, seed=1), batch_size=16)
    return model


@pytest.fixture(scope="module")
def lm_model():
    model = ResMemWrapper.from_base(tiny_base("gpt2"), k=4, sigma=0.5, temperature=1.3)
    model.build_memory(distinct_sequences(3, 20), window=12, stride=8, residual_top_m=16, batch_size=4)
    return model


# ---------------------------------------------------------------------------------------------- dispatch
def test_the_task_map_names_each_task_class(image_model, lm_model):
    assert TASK_TO_RESMEM_MODEL_MAPPING == {
        "image-classification": ResMemForImageClassification, "causal-lm": ResMemForCausalLM,
        "text-classification": resmem.ResMemForSequenceClassification,
        "audio-classification": resmem.ResMemForAudioClassification,
    }
    for model in (image_model, lm_model):
        built = ResMemWrapper(model.config)  # a fresh base from the config, of the task's class
        assert type(built) is task_class(model.config.task) is type(model)
    with pytest.raises(ValueError, match="Unsupported task 'segmentation'; supported: \\['audio-classification', 'causal-lm', 'image-classification', 'text-classification'\\]"):
        task_class("segmentation")
    with pytest.raises(ValueError, match="Unsupported task"):
        ResMemWrapper.from_base(make_base("resnet"), task="segmentation")


# ---------------------------------------------------------------------------------------------- images
def test_image_output_is_transformers_image_classifier_output_and_loss_is_the_nll(image_model):
    x = torch.from_numpy(random_pixels(6, seed=3))
    labels = torch.tensor([0, 1, 2, 3, 4, 0]) % image_model.base.config.num_labels
    with torch.no_grad():
        out = image_model(pixel_values=x, labels=labels)
    assert isinstance(out, ImageClassifierOutput) and isinstance(out, resmem.ResMemImageClassifierOutput)
    logp = np_log_probs(out.scores.numpy(), image_model.config.score_floor)  # (B, C)
    nll = -logp[np.arange(6), labels.numpy()]  # (B,)
    assert out.loss.item() == pytest.approx(nll.mean(), rel=1e-6)
    with torch.no_grad():  # the Trainer's gradient accumulation: the sum over the batch / num_items_in_batch
        out = image_model(pixel_values=x, labels=labels, num_items_in_batch=torch.tensor(10))
    assert out.loss.item() == pytest.approx(nll.sum() / 10, rel=1e-6)


def test_image_return_dict_false_and_config_return_dict_give_the_tuple(image_model):
    x = torch.from_numpy(random_pixels(3, seed=4))
    labels = torch.tensor([1, 0, 2])
    with torch.no_grad():
        out = image_model(pixel_values=x, labels=labels)
        as_tuple = image_model(pixel_values=x, labels=labels, return_dict=False)
        image_model.config.return_dict = False
        try:
            from_config = image_model(pixel_values=x)
            explicit = image_model(pixel_values=x, return_dict=True)
        finally:
            image_model.config.return_dict = True
    assert isinstance(as_tuple, tuple) and isinstance(from_config, tuple)
    expected = (out.loss, out.logits, out.scores, out.base_logits, out.residual)  # None fields are skipped
    assert len(as_tuple) == 5 and all(torch.equal(a, b) for a, b in zip(as_tuple, expected))
    assert len(from_config) == 4 and all(torch.equal(a, b) for a, b in zip(from_config, expected[1:]))
    assert isinstance(explicit, ImageClassifierOutput)


# ---------------------------------------------------------------------------------------------- causal LM
def test_lm_output_is_causal_lm_output_with_past_and_loss_is_the_nll(lm_model):
    ids = distinct_sequences(2, 9, seed=7)
    labels = ids.clone()
    labels[0, 5] = -100  # ignored target
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = lm_model(ids, attention_mask=mask, labels=labels)
    assert isinstance(out, CausalLMOutputWithPast) and isinstance(out, resmem.ResMemCausalLMOutput)
    config = lm_model.config
    logp = np_log_probs(out.scores.numpy(), config.score_floor)  # (B, T, V)
    targets = labels[:, 1:].numpy()  # position t predicts token t + 1
    keep = targets != -100
    b, t = np.nonzero(keep)
    nll = -logp[:, :-1][b, t, targets[keep]]  # (n,)
    assert len(nll) == 2 * 8 - 1
    assert out.loss.item() == pytest.approx(nll.mean(), rel=1e-6)
    with torch.no_grad():
        out = lm_model(ids, labels=labels, num_items_in_batch=torch.tensor(40))
    assert out.loss.item() == pytest.approx(nll.sum() / 40, rel=1e-6)


def test_lm_mixture_loss_is_the_nll_of_the_mixture(lm_model):
    ids = distinct_sequences(2, 9, seed=8)
    config = lm_model.config
    config.distribution, config.mixture_lambda = "mixture", 0.3
    try:
        with torch.no_grad():
            out = lm_model(ids, labels=ids)
    finally:
        config.distribution, config.mixture_lambda = "clamp", 0.5
    scores = out.scores.double().numpy()
    base = torch.softmax(out.base_logits.double(), -1).numpy()
    p = 0.7 * np.maximum(scores, 0) / np.maximum(scores, 0).sum(-1, keepdims=True) + 0.3 * base  # lam weighs the base
    targets = ids[:, 1:].numpy()
    nll = -np.log(np.take_along_axis(p[:, :-1], targets[..., None], -1))
    assert out.loss.item() == pytest.approx(nll.mean(), rel=1e-5)


def test_lm_return_dict_false_is_transformers_tuple_order(lm_model):
    ids = distinct_sequences(2, 7, seed=9)
    with torch.no_grad():
        out = lm_model(ids, labels=ids, use_cache=True)
        as_tuple = lm_model(ids, labels=ids, use_cache=True, return_dict=False)
    assert out.cache is not None
    # as for any transformers causal LM: loss, logits, cache, ...; then ResMem's fields
    assert torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.logits)
    assert type(as_tuple[2]) is type(out.cache)
    assert all(torch.equal(a, b) for a, b in zip(as_tuple[3:], (out.scores, out.base_logits, out.residual)))
    assert len(as_tuple) == 6
