"""ResMemForImageClassification end to end on tiny random models, checked against tests/reference.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import (
    ARCHS,
    NUM_LABELS,
    PRE_LOGIT_LAYER,
    base_config,
    dataset_arrays,
    make_base,
    make_pixel_dataset,
)
from reference import hooked_forward, np_resmem
from transformers import AutoModelForImageClassification, ViTImageProcessor

from resmem import ResMemConfig, ResMemForImageClassification, ResMemWrapper
from resmem.models import CifarResNetForImageClassification


def _forward(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values=pixel_values)


class Reference:
    """Memory and query keys/logits captured with a plain torch hook, plus the numpy equations."""

    def __init__(self, base, layer, dataset, queries):
        pixels, self.labels = dataset_arrays(dataset)
        self.memory_keys, self.memory_logits = hooked_forward(base, layer, pixels)
        self.query_keys, self.query_logits = hooked_forward(base, layer, queries)

    def scores(self, k, sigma, temperature):
        return np_resmem(
            self.query_keys, self.query_logits, self.memory_keys, self.memory_logits, self.labels, k, sigma, temperature
        )


# ------------------------------------------------------------------ wrapping is transparent
@pytest.mark.parametrize("arch", ARCHS)
def test_default_layer_and_exact_base_logits(arch, pixel_dataset, query_pixels):
    base = make_base(arch)
    untouched = copy.deepcopy(base)
    expected = _forward(untouched, query_pixels).logits
    model = ResMemWrapper.from_base(base, k=3)
    assert isinstance(model, ResMemForImageClassification)
    assert model.config.layer == PRE_LOGIT_LAYER[arch]  # found from the structure, not a table
    model.build_memory(pixel_dataset, batch_size=16)
    out = _forward(model, query_pixels)
    assert torch.equal(out.base_logits, expected)
    assert out.scores.shape == out.logits.shape == out.residual.shape == (12, NUM_LABELS)
    # The base model itself is not patched: calling it directly still gives the same logits.
    assert torch.equal(_forward(model.base, query_pixels).logits, expected)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.base.modules())


# ------------------------------------------------------------------ scores vs numpy, paper eq. 3
MEMORY_SIZE = 60


@pytest.fixture(scope="module", params=["resnet", "vit"])
def built(request):
    arch = request.param
    dataset = make_pixel_dataset(MEMORY_SIZE, seed=3)
    queries = torch.from_numpy(np.random.default_rng(99).standard_normal((10, 3, 16, 16)).astype(np.float32))
    model = ResMemWrapper.from_base(make_base(arch, seed=1), k=5)
    model.build_memory(dataset, batch_size=16)
    reference = Reference(copy.deepcopy(model.base), PRE_LOGIT_LAYER[arch], dataset, queries)
    return model, reference, queries


@pytest.mark.parametrize(
    "k, sigma_scale, temperature",
    [(1, 1.0, 1.0), (5, 0.3, 1.4), (5, 3.0, 0.5), (17, 1.0, 2.0), (MEMORY_SIZE, 1.0, 1.0), (MEMORY_SIZE, 0.05, 0.7)],
)
def test_scores_match_numpy_reference(built, k, sigma_scale, temperature):
    model, reference, queries = built
    # sigma relative to the typical neighbour distance, so the weights are neither uniform nor one-hot.
    sigma = float(sigma_scale * np.median(np.sqrt(((reference.query_keys[:, None] - reference.memory_keys) ** 2).sum(-1))))
    model.config.k, model.config.sigma, model.config.residual_temperature = k, sigma, temperature
    out = _forward(model, queries)
    ref_scores, ref_residual = reference.scores(k, sigma, temperature)
    assert np.abs(ref_residual).max() > 1e-2  # the memory really changes the scores
    np.testing.assert_allclose(out.residual.double().numpy(), ref_residual, atol=1e-4)
    np.testing.assert_allclose(out.scores.double().numpy(), ref_scores, atol=1e-4)
    np.testing.assert_allclose(out.base_logits.double().numpy(), reference.query_logits, atol=1e-5)
    # logits: log of the clamped, renormalised scores, same argmax.
    clamped = np.maximum(ref_scores, model.config.score_floor)
    expected = clamped / clamped.sum(-1, keepdims=True)
    # Compared as probabilities at the scores' tolerance: a float32 score near 0 (after p + r cancels)
    # is exact to ~1e-7 absolute, so its log can differ by more than 1e-3 from the float64 reference.
    np.testing.assert_allclose(out.logits.double().exp().numpy(), expected, atol=1e-4)
    confident = expected > 1e-2
    np.testing.assert_allclose(out.logits.double().numpy()[confident], np.log(expected[confident]), atol=1e-3)
    assert (out.logits.argmax(-1).numpy() == ref_scores.argmax(-1)).all()


def test_changing_config_takes_effect_without_rebuild(built):
    model, reference, queries = built
    memory_keys = model.memory.keys.clone()
    seen = []
    for k, sigma, temperature in [(3, 1.0, 1.0), (9, 0.2, 1.0), (9, 0.2, 2.5)]:
        model.config.k, model.config.sigma, model.config.residual_temperature = k, sigma, temperature
        out = _forward(model, queries)
        ref_scores, _ = reference.scores(k, sigma, temperature)
        np.testing.assert_allclose(out.scores.double().numpy(), ref_scores, atol=1e-4)
        seen.append(out.scores)
    assert not torch.allclose(seen[0], seen[1]) and not torch.allclose(seen[1], seen[2])
    assert torch.equal(model.memory.keys, memory_keys)  # nothing was rebuilt


def test_numpy_scalar_hyperparameters_work_and_save(built, tmp_path):
    """Grid searches over numpy arrays hand numpy scalars to the config; they must work and stay JSON-serialisable."""
    model, reference, queries = built
    model.config.k, model.config.sigma, model.config.residual_temperature = np.int64(5), np.float32(0.5), np.float64(1.5)
    assert type(model.config.k) is int and type(model.config.sigma) is float
    out = _forward(model, queries)
    ref_scores, _ = reference.scores(5, 0.5, 1.5)
    np.testing.assert_allclose(out.scores.double().numpy(), ref_scores, atol=1e-4)
    model.config.save_pretrained(tmp_path)
    assert ResMemConfig.from_pretrained(tmp_path).k == 5


# ------------------------------------------------------------------ memorisation (paper Remark 3.2)
@pytest.mark.parametrize("arch", ARCHS)
def test_k1_small_sigma_memorises_training_set(arch):
    dataset = make_pixel_dataset(80, seed=7)
    pixels, labels = dataset_arrays(dataset)
    model = ResMemWrapper.from_base(make_base(arch, seed=2), k=1, sigma=1e-3, temperature=1.0)
    model.build_memory(dataset, batch_size=32)
    out = _forward(model, torch.from_numpy(pixels))
    base_accuracy = (out.base_logits.argmax(-1).numpy() == labels).mean()
    assert base_accuracy < 0.9  # random labels: the base alone cannot fit them
    assert (out.scores.argmax(-1).numpy() == labels).all()
    assert (out.logits.argmax(-1).numpy() == labels).all()


# ------------------------------------------------------------------ zero and empty memories
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_zero_residual_memory_gives_base_distribution_exactly(pixel_dataset, query_pixels, temperature):
    model = ResMemWrapper.from_base(make_base("resnet"), k=4, temperature=temperature)
    model.build_memory(pixel_dataset, batch_size=32)
    memory = model.memory
    # Entries whose stored logits put all mass on their label: softmax(1000 * onehot / T) is
    # exactly one-hot in float32 (exp(-500) underflows to 0), so every residual is exactly 0.
    confident = 1000.0 * torch.nn.functional.one_hot(memory.labels, NUM_LABELS).float()
    assert torch.equal(torch.softmax(confident / temperature, -1), confident / 1000.0)
    memory.set_entries(memory.keys, confident, memory.labels, memory.example_ids, memory.fingerprint, memory.layer)
    out = _forward(model, query_pixels)
    assert torch.equal(out.residual, torch.zeros_like(out.residual))
    assert torch.equal(out.scores, torch.softmax(out.base_logits / temperature, dim=-1))


def test_empty_memory_forward_raises(query_pixels):
    model = ResMemWrapper.from_base(make_base("resnet"))
    assert len(model.memory) == 0
    with pytest.raises(ValueError, match=r"build_memory"):
        model(pixel_values=query_pixels)


# ------------------------------------------------------------------ Auto classes and dispatch
@pytest.mark.parametrize("arch", ["resnet", "handwritten"])
def test_wrapper_config_dispatches_to_image_classification(arch):
    config = ResMemConfig(base_config=base_config(arch), k=7)
    model = ResMemWrapper(config)
    assert type(model) is ResMemForImageClassification
    assert type(model.base) is type(make_base(arch))
    assert model.config.k == 7


def test_deepcopy_of_a_built_wrapper(pixel_dataset, query_pixels):
    model = ResMemWrapper.from_base(make_base("resnet"), k=3)
    model.build_memory(pixel_dataset, batch_size=32)
    expected = _forward(model, query_pixels).scores  # also builds the search index
    clone = copy.deepcopy(model)
    assert type(clone) is ResMemForImageClassification and clone.base is not model.base
    assert torch.equal(_forward(clone, query_pixels).scores, expected)


def test_auto_class_loads_the_wrapper(tmp_path, pixel_dataset, query_pixels):
    model = ResMemWrapper.from_base(make_base("handwritten"), k=3)
    model.build_memory(pixel_dataset, batch_size=32)
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "saved")
    assert type(loaded) is ResMemForImageClassification
    assert len(loaded.memory) == len(pixel_dataset)
    assert torch.equal(_forward(loaded, query_pixels).scores, _forward(model, query_pixels).scores)


# ------------------------------------------------------------------ memory sources
def _uint8_to_pixels(images) -> np.ndarray:
    """(x / 255 - 0.5) / 0.5, channels first: what the processor below computes."""
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return ((arrays / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).astype(np.float32)


def test_build_memory_from_every_source_gives_the_same_entries(image_dataset):
    import datasets

    processor = ViTImageProcessor(
        do_resize=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    images = image_dataset["image"][:]
    pixel_dataset = datasets.Dataset.from_dict({"pixel_values": _uint8_to_pixels(images), "label": image_dataset["label"][:]})

    def transform(batch_images):
        return torch.from_numpy(_uint8_to_pixels(batch_images))

    model = ResMemWrapper.from_base(make_base("vit", seed=4), k=3)
    layer = model.config.layer
    entries = {}
    sources = {
        "pixel_values": dict(dataset=pixel_dataset),
        "processor": dict(dataset=image_dataset, image_processor=processor),
        "transform": dict(dataset=image_dataset, image_column="image", transform=transform),
        "iterable": dict(dataset=pixel_dataset.to_iterable_dataset()),
        "iterable+processor": dict(dataset=image_dataset.to_iterable_dataset(), image_processor=processor),
    }
    for name, kwargs in sources.items():
        memory = model.build_memory(batch_size=10, **kwargs)
        entries[name] = (memory.keys.clone(), memory.base_logits.clone(), memory.labels.clone(), memory.example_ids.clone())
    ref_keys, ref_logits = hooked_forward(model.base, layer, _uint8_to_pixels(images))
    labels = np.asarray(image_dataset["label"][:])
    for name, (keys, logits, mem_labels, example_ids) in entries.items():
        assert keys.shape == (len(images), 16), name
        np.testing.assert_allclose(keys.numpy(), ref_keys, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(logits.numpy(), ref_logits, atol=1e-5, err_msg=name)
        assert (mem_labels.numpy() == labels).all(), name
        assert example_ids.tolist() == list(range(len(images))), name
    assert torch.equal(entries["iterable"][0], entries["pixel_values"][0])
    assert model.config.memory_size == len(images)


# ------------------------------------------------------------------ k larger than the memory
def test_k_larger_than_memory_clamps_with_warning(query_pixels):
    dataset = make_pixel_dataset(20, seed=5)
    model = ResMemWrapper.from_base(make_base("resnet", seed=3), k=50, sigma=0.5)
    model.build_memory(dataset, batch_size=8)
    with pytest.warns(UserWarning, match=r"k=50 is larger than the memory \(20 entries\); using k=20"):
        clamped = _forward(model, query_pixels)
    model.config.k = 20
    exact = _forward(model, query_pixels)
    assert torch.equal(clamped.scores, exact.scores)
    assert torch.equal(clamped.residual, exact.residual)


# ------------------------------------------------------------------ bundled CIFAR ResNet
def test_bundled_cifar_resnet_works_with_the_wrapper(tmp_path, query_pixels):
    dataset = make_pixel_dataset(40, seed=6)
    base = make_base("cifar_resnet", seed=5)
    assert isinstance(base, CifarResNetForImageClassification)
    model = ResMemWrapper.from_base(base, k=6, sigma=0.5, temperature=1.3)
    assert model.config.layer == PRE_LOGIT_LAYER["cifar_resnet"]
    model.build_memory(dataset, batch_size=16)
    reference = Reference(copy.deepcopy(base), PRE_LOGIT_LAYER["cifar_resnet"], dataset, query_pixels)
    out = _forward(model, query_pixels)
    ref_scores, ref_residual = reference.scores(6, 0.5, 1.3)
    assert np.abs(ref_residual).max() > 1e-2
    np.testing.assert_allclose(out.scores.double().numpy(), ref_scores, atol=1e-4)
    model.save_pretrained(tmp_path / "cifar")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "cifar")
    assert isinstance(loaded.base, CifarResNetForImageClassification)
    assert torch.equal(_forward(loaded, query_pixels).scores, out.scores)


def test_non_default_layer_by_name(pixel_dataset, query_pixels):
    """`layer="name"` (a module output) works too, here the pooled ResNet features before flattening."""
    base = make_base("resnet", seed=8)
    model = ResMemWrapper.from_base(base, k=4, sigma=0.5, layer="classifier.0")  # nn.Flatten output (B, C)
    model.build_memory(pixel_dataset, batch_size=32)
    reference = Reference(copy.deepcopy(base), "classifier.0", pixel_dataset, query_pixels)
    ref_scores, _ = reference.scores(4, 0.5, 1.0)
    np.testing.assert_allclose(_forward(model, query_pixels).scores.double().numpy(), ref_scores, atol=1e-4)

