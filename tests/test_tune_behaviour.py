"""A new user's path through tune / from_base / build_memory: each test fails without its fix.

- LM `tune` sets the distribution mode with the lower validation perplexity (the forward then gives it);
- `from_base` returns eval mode, a train-mode forward warns, the save error names `.eval()`;
- `with_transform` datasets that yield `pixel_values`;
- `sigma_scale` against a numpy brute force, `tune(sigma="auto")`;
- `tune` clamps k > memory size like the forward;
- `progress=` switches and the LM bars' totals;
- 1-channel models through `pipeline("image-classification")`.
"""

from __future__ import annotations

import re
import warnings

import datasets
import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, NUM_LABELS, PRE_LOGIT_LAYER, make_base, make_image_dataset, make_pixel_dataset
from lm_helpers import distinct_sequences, hook_keys, tiny_base
from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor, pipeline
from transformers.utils import logging as hf_logging

from resmem import ResMemWrapper
from resmem.evaluation import predict
AUTO_SIGMA_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)  # the documented `sigma="auto"` grid, in units of sigma_scale

WINDOW, STRIDE = 12, 8


def lower_median(values: np.ndarray) -> float:
    """The lower median (torch.median's convention) of a 1-D array."""
    return float(np.sort(values)[(len(values) - 1) // 2])


def brute_nearest(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """`(Q,)` plain L2 distance from every query to its nearest key, in float64."""
    d2 = ((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1)  # (Q, N)
    return np.sqrt(d2.min(axis=1))


@pytest.fixture(scope="module")
def lm_problem():
    """A tiny GPT-2 with a memory of 6 sequences; validation text of other sequences (one window each)."""
    model = ResMemWrapper.from_base(tiny_base("gpt2"), k=3, sigma=1.0, temperature=1.0)
    model.build_memory(distinct_sequences(6, 20), window=WINDOW, stride=STRIDE, residual_top_m=16, progress=False)
    val = distinct_sequences(5, 10, seed=21)  # (5, 10): shorter than the window, so every position is evaluated
    return model, val


@pytest.fixture(scope="module")
def image_problem():
    memory = make_pixel_dataset(40, seed=2)
    model = ResMemWrapper.from_base(make_base("resnet", seed=4), k=3, sigma=1.0)
    model.build_memory(memory, batch_size=16, progress=False)
    return model, make_pixel_dataset(30, seed=8)


def forward_ppl(model, val: torch.Tensor) -> float:
    """Perplexity of the next tokens of `val` under the model's `logits`, computed in numpy."""
    with torch.no_grad():
        logits = model(val).logits[:, :-1].double().numpy()  # (B, T-1, V)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))  # log-softmax (a no-op if normalised)
    labels = val[:, 1:].numpy()  # (B, T-1)
    nll = -np.take_along_axis(log_probs, labels[..., None], axis=-1).squeeze(-1)
    return float(np.exp(nll.mean()))


# ---------------------------------------------------------------------- 1. LM tune picks the distribution
def test_lm_tune_sets_the_distribution_with_the_lowest_validation_perplexity(lm_problem):
    model, val = lm_problem
    old = model.config.distribution, model.config.mixture_lambda
    try:
        result = model.tune(val, k=[1, 4, 16], sigma=[0.3, 3.0], window=WINDOW, stride=STRIDE, progress=False)
        best = result.best
        assert result.grid["mixture_lambda"] == [0.1, 0.25, 0.5, 0.75, 0.9]  # the default grid was tried
        assert best["distribution"] == model.config.distribution
        assert best["ppl"] <= best["ppl_clamp"]
        # The adaptive mixture (resmem.adaptive_mixture) is in the running by default too.
        adaptive = [v["ppl"] for by_tau in best["adaptive"].values() for v in by_tau.values()]
        assert best["ppl"] == min([best["ppl_clamp"], *best["ppl_mixture"].values(), *adaptive])
        # Clamped scores are a poor distribution here: tune must have switched to a mixture.
        assert best["distribution"] in ("mixture", "adaptive") and model.config.mixture_lambda == best["mixture_lambda"]
        assert forward_ppl(model, val) == pytest.approx(best["ppl"], rel=1e-4)  # what the saved model gives
        record = model.config.last_evaluation
        assert record["distribution"] == best["distribution"] and record["ppl"] == pytest.approx(best["ppl"])

        # No lambda grid: the clamp distribution is set, and the forward gives its perplexity.
        result = model.tune(val, k=[4], sigma=[3.0], mixture_lambda=[], window=WINDOW, stride=STRIDE, progress=False)
        assert model.config.distribution == result.best["distribution"] == "clamp"
        assert forward_ppl(model, val) == pytest.approx(result.best["ppl_clamp"], rel=1e-4)
    finally:
        model.config.distribution, model.config.mixture_lambda = old


# ---------------------------------------------------------------------- 2. train mode
def test_from_base_returns_eval_mode_and_a_train_forward_warns_once(tmp_path):
    base = make_base("resnet", seed=3).train()  # as right after a training loop; ResNet has BatchNorm
    model = ResMemWrapper.from_base(base, k=2)
    assert not model.training and not base.training
    model.build_memory(make_pixel_dataset(20, seed=1), batch_size=8, progress=False)
    x = torch.from_numpy(make_pixel_dataset(4, seed=5).with_format("numpy")["pixel_values"][:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval mode: no warning
        model(pixel_values=x)
    model.save_pretrained(tmp_path / "ok")  # the base weights did not move

    model.train()
    with pytest.warns(UserWarning, match=r"train mode.*BatchNorm.*model\.eval\(\)") as caught:
        model(pixel_values=x)
        model(pixel_values=x)
    assert sum("train mode" in str(w.message) for w in caught) == 1  # once per model
    # The train-mode forward updated the running statistics: the save refuses and names the cause and the fix.
    with pytest.raises(ValueError, match=r"train mode updates BatchNorm running statistics.*model\.eval\(\)"):
        model.save_pretrained(tmp_path / "bad")


# ---------------------------------------------------------------------- 3. with_transform datasets
def test_with_transform_pixel_values_dataset_matches_the_preprocessed_one():
    processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    raw = make_image_dataset(24, seed=0)

    def transform(batch):  # the HF image-classification tutorial's pattern
        pixels = processor(images=batch["image"], return_tensors="pt")["pixel_values"]
        return {"pixel_values": [p for p in pixels], "label": batch["label"]}

    lazy = raw.with_transform(transform)
    eager = raw.map(lambda b: {"pixel_values": processor(images=b["image"])["pixel_values"]}, batched=True)
    eager = eager.remove_columns("image")
    models = []
    for data in (eager, lazy):
        model = ResMemWrapper.from_base(make_base("resnet", seed=1), k=3, sigma=0.5)
        model.build_memory(data, batch_size=10, progress=False)
        models.append(model)
    assert torch.equal(models[0].memory.keys, models[1].memory.keys)
    assert torch.equal(models[0].memory.labels, models[1].memory.labels)
    a, b = predict(models[0], eager, progress=False), predict(models[0], lazy, progress=False)
    assert torch.equal(a.resmem, b.resmem) and torch.equal(a.labels, b.labels)
    ta = models[0].tune(eager, k=[1, 3], sigma=[0.1, 1.0], progress=False)
    tb = models[1].tune(lazy, k=[1, 3], sigma=[0.1, 1.0], progress=False)
    assert ta.table == tb.table


# ---------------------------------------------------------------------- 4. sigma_scale
def test_sigma_scale_of_the_memory_keys_matches_numpy(image_problem):
    model, _ = image_problem
    keys = model.memory.keys.double().numpy()  # (N, D)
    n = keys.shape[0]
    d2 = ((keys[:, None] - keys[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)  # each key to its nearest OTHER key
    nearest = np.sqrt(d2.min(1))  # (N,)
    assert model.sigma_scale() == pytest.approx(lower_median(nearest), rel=1e-5)  # sample >= N: every key
    sample = torch.randperm(n, generator=torch.Generator().manual_seed(3))[:15].numpy()
    assert model.sigma_scale(sample_size=15, seed=3) == pytest.approx(lower_median(nearest[sample]), rel=1e-5)


def test_sigma_scale_of_validation_data_matches_numpy(image_problem):
    model, val = image_problem
    module = dict(model.base.named_modules())[PRE_LOGIT_LAYER["resnet"].split(":")[0]]
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].flatten(1)))
    try:
        with torch.no_grad():
            model.base(pixel_values=torch.from_numpy(val.with_format("numpy")["pixel_values"][:]))
    finally:
        handle.remove()
    queries = seen[0].double().numpy()  # (V, D)
    nearest = brute_nearest(queries, model.memory.keys.double().numpy())
    assert model.sigma_scale(val) == pytest.approx(lower_median(nearest), rel=1e-5)
    rows = torch.randperm(len(val), generator=torch.Generator().manual_seed(0))[:7].sort().values.numpy()
    assert model.sigma_scale(val, sample_size=7) == pytest.approx(lower_median(nearest[rows]), rel=1e-5)
    with pytest.raises(ValueError, match="sample_size must be an integer >= 1"):
        model.sigma_scale(val, sample_size=0)


def test_tune_sigma_auto_grid_both_tasks(image_problem, lm_problem):
    model, val = image_problem
    before = model.config.k, model.config.sigma
    try:
        result = model.tune(val, k=[1, 3], sigma="auto", progress=False)
        scale = model.sigma_scale(val)
        assert result.grid["sigma"] == pytest.approx([scale * m for m in AUTO_SIGMA_MULTIPLES], rel=1e-6)
        assert result.grid["sigma_scale"] == pytest.approx(scale)
        assert all(row["sigma_scale"] == pytest.approx(scale) for row in result.table)
        assert {row["sigma"] for row in result.table} == set(result.grid["sigma"])
        with pytest.raises(ValueError, match='sigma must be a number, a list of numbers, None or "auto"'):
            model.tune(val, sigma="median")
    finally:
        model.config.k, model.config.sigma = before

    lm, text = lm_problem
    old = lm.config.k, lm.config.sigma, lm.config.distribution, lm.config.mixture_lambda
    try:
        keys, _ = hook_keys(lm.base, lm.config.layer, text)  # (B, T, D) by a plain torch hook
        queries = keys[:, :-1].reshape(-1, keys.shape[-1])  # positions with a next token
        expected = lower_median(brute_nearest(queries, lm.memory.keys.double().numpy()))
        assert lm.sigma_scale(text, window=WINDOW, stride=STRIDE) == pytest.approx(expected, rel=1e-5)
        result = lm.tune(text, k=[2], sigma="auto", window=WINDOW, stride=STRIDE, progress=False)
        assert result.grid["sigma"] == pytest.approx([expected * m for m in AUTO_SIGMA_MULTIPLES], rel=1e-5)
        assert result.grid["sigma_scale"] == pytest.approx(expected, rel=1e-5)
    finally:
        lm.config.k, lm.config.sigma, lm.config.distribution, lm.config.mixture_lambda = old


# ---------------------------------------------------------------------- 5. k above the memory size
def test_tune_clamps_k_like_the_forward(image_problem, lm_problem):
    model, val = image_problem
    n = len(model.memory)
    before = model.config.k, model.config.sigma
    try:
        model.config.k = 1000
        with pytest.warns(UserWarning) as forward_warnings:
            model(pixel_values=torch.from_numpy(val.with_format("numpy")["pixel_values"][:4]))
        forward_text = str(forward_warnings[0].message)
        assert f"using k={n}" in forward_text
        with pytest.warns(UserWarning, match=re.escape(forward_text)):
            result = model.tune(val, k=[3, 1000, n], sigma=[1.0], progress=False)
        assert result.grid["k"] == [3, n]  # clamped and de-duplicated
        assert [row["k"] for row in result.table] == [3, n]
    finally:
        model.config.k, model.config.sigma = before
    with pytest.raises(ValueError, match="k of the grid must be an integer >= 1"):
        model.tune(val, k=[0], progress=False)

    lm, text = lm_problem
    old = lm.config.k, lm.config.sigma, lm.config.distribution, lm.config.mixture_lambda
    try:
        with pytest.warns(UserWarning, match=f"using k={len(lm.memory)}"):
            result = lm.tune(text, k=[10**6, len(lm.memory)], sigma=[1.0], window=WINDOW, stride=STRIDE, progress=False)
        assert result.grid["k"] == [len(lm.memory)]
    finally:
        lm.config.k, lm.config.sigma, lm.config.distribution, lm.config.mixture_lambda = old


def test_from_base_documents_its_defaults_and_sigma_tuning():
    doc = ResMemWrapper.from_base.__doc__
    assert "k=50, sigma=1.0, T=1.0" in doc and "k=53, sigma=0.7, T=1.4" in doc and 'sigma="auto"' in doc


# ---------------------------------------------------------------------- 6. progress bars
@pytest.fixture
def bars_on():
    hf_logging.enable_progress_bar()
    try:
        yield
    finally:
        hf_logging.disable_progress_bar()


def test_progress_false_prints_nothing(bars_on, capfd):
    memory = make_pixel_dataset(20, seed=2)
    model = ResMemWrapper.from_base(make_base("resnet", seed=4), k=2)
    capfd.readouterr()
    model.build_memory(memory, batch_size=8, progress=False)
    model.tune(make_pixel_dataset(12, seed=9), k=[1, 2], sigma="auto", progress=False)
    lm = ResMemWrapper.from_base(tiny_base("gpt2"), k=2)
    lm.build_memory(distinct_sequences(3, 20), window=WINDOW, stride=STRIDE, progress=False)
    lm.tune(distinct_sequences(2, 10, seed=5), k=[1], sigma="auto", window=WINDOW, stride=STRIDE, progress=False)
    assert capfd.readouterr().err == ""
    model.build_memory(memory, batch_size=8)  # the default shows the bar
    assert "Embedding for ResMem memory" in capfd.readouterr().err


def test_lm_build_and_tune_bars_have_a_total(bars_on, capfd):
    lm = ResMemWrapper.from_base(tiny_base("gpt2"), k=2)
    capfd.readouterr()
    lm.build_memory(distinct_sequences(3, 20), window=WINDOW, stride=STRIDE)
    err = capfd.readouterr().err
    assert "Building ResMem memory" in err and "3/3" in err
    lm.tune(distinct_sequences(4, 10, seed=5), k=[1], sigma=[1.0], window=WINDOW, stride=STRIDE)
    err = capfd.readouterr().err
    assert "Evaluating ResMem" in err and "4/4" in err  # examples, with their total
    lm.add_to_memory(distinct_sequences(2, 10, seed=7))
    assert "2/2" in capfd.readouterr().err


# ---------------------------------------------------------------------- 7. one-channel images in a pipeline
def test_one_channel_model_in_the_image_classification_pipeline():
    from PIL import Image

    processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5], image_std=[0.5])
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (16, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    labels = rng.integers(0, NUM_LABELS, 16)
    train = datasets.Dataset.from_dict(
        {"pixel_values": processor(images=[g[..., None] for g in gray])["pixel_values"], "label": labels}
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        base = ResNetForImageClassification(
            ResNetConfig(num_channels=1, num_labels=NUM_LABELS, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
        ).eval()
    model = ResMemWrapper.from_base(base, k=1, sigma=0.01)
    model.build_memory(train, batch_size=8, progress=False)
    pipe = pipeline("image-classification", model=model, image_processor=processor)

    # (H, W, 1) arrays reach the processor unchanged (PIL images are converted to RGB first).
    predictions = pipe([g[..., None] for g in gray])
    assert [p[0]["label"] for p in predictions] == [model.config.id2label[int(y)] for y in labels]  # memorised
    # A 3-channel processor on a 1-channel model: the wrapper's error names the pipeline fix.
    rgb_processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})  # image_mean of 3 values
    rgb_pipe = pipeline("image-classification", model=model, image_processor=rgb_processor)
    with pytest.raises(ValueError, match=r"3 channels but the base model expects 1.*\(H, W, 1\) numpy arrays"):
        rgb_pipe(Image.fromarray(gray[0], mode="L"))
