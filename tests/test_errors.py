"""Every bad input raises a ValueError/TypeError whose message names the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import NUM_LABELS, make_base, make_pixel_dataset
from torch import nn

from resmem import ResMemWrapper

K_FIX = r"k must be an integer >= 1.*model\.config\.k = "
SIGMA_FIX = r"sigma must be a finite number > 0"
TEMPERATURE_FIX = r"residual_temperature must be a finite number >= 0\.0001"


@pytest.fixture
def built(pixel_dataset):
    model = ResMemWrapper.from_base(make_base("resnet"), k=3)
    model.build_memory(pixel_dataset, batch_size=16)
    return model


# ------------------------------------------------------------------ hyperparameters
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), K_FIX),
        (dict(k=-3), K_FIX),
        (dict(k=2.5), K_FIX),
        (dict(sigma=0.0), SIGMA_FIX),
        (dict(sigma=-1.0), SIGMA_FIX),
        (dict(temperature=0.0), TEMPERATURE_FIX),
        (dict(temperature=-0.5), TEMPERATURE_FIX),
    ],
)
def test_bad_hyperparameters_at_from_base(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResMemWrapper.from_base(make_base("resnet"), **kwargs)


@pytest.mark.parametrize(
    "name, value, match",
    [("k", 0, K_FIX), ("sigma", 0.0, SIGMA_FIX), ("sigma", -2.0, SIGMA_FIX), ("residual_temperature", 0.0, TEMPERATURE_FIX)],
)
def test_bad_hyperparameters_set_on_config_before_forward(built, query_pixels, name, value, match):
    built(pixel_values=query_pixels)  # fine before the change
    with pytest.raises(ValueError, match=match):  # refused when set (before: at the next forward pass)
        setattr(built.config, name, value)
        built(pixel_values=query_pixels)


def test_non_pretrained_base_is_a_type_error():
    with pytest.raises(TypeError, match=r"PreTrainedModel"):
        ResMemWrapper.from_base(nn.Linear(4, 2))


# ------------------------------------------------------------------ layers
def test_unknown_layer_lists_close_matches():
    with pytest.raises(ValueError, match=r"'classifer\.1:input' is not a module") as info:
        ResMemWrapper.from_base(make_base("resnet"), layer="classifer.1:input")
    message = str(info.value)
    assert "Close matches" in message and "'classifier.1'" in message
    assert "named_modules" in message


def test_layer_with_spatial_output_is_not_per_example(pixel_dataset):
    model = ResMemWrapper.from_base(make_base("resnet"), layer="resnet.encoder.stages.1")  # (B, C, H, W)
    with pytest.raises(ValueError, match=r"shape \(16, 16, 2, 2\), not one vector per example.*:input") as info:
        model.build_memory(pixel_dataset, batch_size=16)
    assert "layer=None" in str(info.value)
    assert len(model.memory) == 0


def test_layer_with_non_tensor_output(pixel_dataset):
    model = ResMemWrapper.from_base(make_base("resnet"), layer="resnet")  # returns a ModelOutput
    with pytest.raises(ValueError, match=r"not a tensor; name a module whose output"):
        model.build_memory(pixel_dataset, batch_size=16)


def test_ambiguous_output_layer_asks_for_a_name(pixel_dataset):
    # The hand-written model's hidden Linear also has num_labels outputs: two candidate heads.
    base = make_base("handwritten", embedding_size=NUM_LABELS)
    with pytest.raises(ValueError, match=r"several candidate output layers.*layer='out_head:input'"):
        ResMemWrapper.from_base(base)
    model = ResMemWrapper.from_base(base, layer="out_head:input")  # the fix named in the message
    model.build_memory(pixel_dataset, batch_size=32)


def test_layer_changed_after_build_is_refused(built, query_pixels):
    built.config.layer = "classifier.0"
    with pytest.raises(ValueError, match=r"built with keys from layer 'classifier\.1:input'.*rebuild"):
        built(pixel_values=query_pixels)


# ------------------------------------------------------------------ data sets
def test_dataset_without_label_column(pixel_dataset):
    renamed = pixel_dataset.rename_column("label", "y")
    model = ResMemWrapper.from_base(make_base("resnet"))
    with pytest.raises(ValueError, match=r"no label column 'label'.*\['pixel_values', 'y'\].*label_column="):
        model.build_memory(renamed)
    model.build_memory(renamed, label_column="y")  # the fix named in the message
    assert len(model.memory) == len(pixel_dataset)


@pytest.mark.parametrize("bad_label", [NUM_LABELS, -1, 100])
def test_labels_outside_range(pixel_dataset, bad_label):
    labels = pixel_dataset["label"][:]
    labels[7] = bad_label
    dataset = pixel_dataset.remove_columns("label").add_column("label", labels)
    model = ResMemWrapper.from_base(make_base("resnet"))
    with pytest.raises(ValueError, match=rf"Labels must lie in \[0, {NUM_LABELS}\).*{bad_label}.*class_encode_column"):
        model.build_memory(dataset, batch_size=16)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nan_or_inf_embeddings(bad_value):
    pixels = np.random.default_rng(0).standard_normal((20, 3, 16, 16)).astype(np.float32)
    pixels[13, 0, 2, 2] = bad_value
    import datasets

    dataset = datasets.Dataset.from_dict({"pixel_values": pixels, "label": [0, 1, 2, 3] * 5})
    model = ResMemWrapper.from_base(make_base("resnet"))
    with pytest.raises(ValueError, match=r"NaN/inf for examples 10\.\.19.*normalisation"):
        model.build_memory(dataset, batch_size=10)
    assert len(model.memory) == 0


@pytest.mark.parametrize("iterable", [False, True], ids=["Dataset", "IterableDataset"])
def test_empty_dataset(pixel_dataset, iterable):
    empty = pixel_dataset.select([])
    if iterable:
        empty = pixel_dataset.to_iterable_dataset().take(0)
    model = ResMemWrapper.from_base(make_base("resnet"))
    with pytest.raises(ValueError, match=r"dataset is empty.*at least one example"):
        model.build_memory(empty)


def test_raw_images_without_processor(image_dataset):
    model = ResMemWrapper.from_base(make_base("resnet"))
    with pytest.raises(ValueError, match=r"raw images in 'image': pass `image_processor=`.*`transform=`"):
        model.build_memory(image_dataset)


def test_dataset_without_pixels_or_images(pixel_dataset):
    dataset = pixel_dataset.rename_column("pixel_values", "x")
    model = ResMemWrapper.from_base(make_base("resnet"))
    with pytest.raises(ValueError, match=r"neither a 'pixel_values' column nor an image column.*image_column="):
        model.build_memory(dataset)


# ------------------------------------------------------------------ state after errors
def test_forward_before_build_memory(query_pixels):
    model = ResMemWrapper.from_base(make_base("resnet"))
    with pytest.raises(ValueError, match=r"memory is empty: call `model\.build_memory\(train_dataset\)`"):
        model(pixel_values=query_pixels)


def test_failed_build_leaves_earlier_memory_untouched(built, pixel_dataset, query_pixels):
    before = {n: getattr(built.memory, n).clone() for n in ("keys", "base_logits", "labels", "example_ids")}
    scores = built(pixel_values=query_pixels).scores
    other = make_pixel_dataset(45, seed=4)
    labels = other["label"][:]
    labels[-1] = NUM_LABELS  # only the LAST batch (rows 40..44) is bad
    other = other.remove_columns("label").add_column("label", labels)
    with pytest.raises(ValueError, match=r"Labels must lie in"):
        built.build_memory(other, batch_size=10)
    for name, tensor in before.items():
        assert torch.equal(getattr(built.memory, name), tensor), name
    assert built.config.memory_size == len(pixel_dataset)
    assert built.training is False
    assert torch.equal(built(pixel_values=query_pixels).scores, scores)


def test_bad_index_spec_names_valid_ones(built, query_pixels):
    pytest.importorskip("faiss")
    built.config.index = "NotAFaissIndex"
    with pytest.raises(ValueError, match=r"factory string 'NotAFaissIndex'.*'exact', 'auto'"):
        built(pixel_values=query_pixels)
