"""Tiny random image classifiers and data sets for the resmem test suite (no Hub downloads).

Everything is seeded locally: models inside `torch.random.fork_rng()`, data with a
`numpy.random.default_rng(seed)` generator, so no test leaks random state into another.
"""

from __future__ import annotations

import contextlib

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    PreTrainedConfig,
    PreTrainedModel,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import logging as hf_logging

import resmem  # noqa: F401  registers the resmem model type with the Auto classes

hf_logging.disable_progress_bar()

NUM_LABELS = 5
IMAGE_SIZE = 16
ARCHS = ("resnet", "vit", "convnext", "handwritten")
# Where each architecture's pre-logit features live (the input of its output Linear). Only the
# tests know this; the library must find it from the model's structure.
PRE_LOGIT_LAYER = {
    "resnet": "classifier.1:input",
    "vit": "classifier:input",
    "convnext": "classifier:input",
    "handwritten": "out_head:input",
    "cifar_resnet": "classifier:input",
}


# ---------------------------------------------------------------------------------------------
# A hand-written classifier, registered with the Auto classes the way a user would do it.
class TinyClassifierConfig(PreTrainedConfig):
    model_type = "resmem_test_tiny_classifier"
    num_channels: int = 3
    hidden_size: int = 16
    embedding_size: int = 12
    initializer_range: float = 0.5


class TinyClassifier(PreTrainedModel):
    """conv -> ReLU -> global pool -> Linear `proj` -> tanh -> Linear `out_head` (the logits)."""

    config_class = TinyClassifierConfig
    base_model_prefix = "backbone"
    main_input_name = "pixel_values"

    def __init__(self, config: TinyClassifierConfig):
        super().__init__(config)
        self.backbone = nn.Sequential(
            nn.Conv2d(config.num_channels, config.hidden_size, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.proj = nn.Linear(config.hidden_size, config.embedding_size)
        self.out_head = nn.Linear(config.embedding_size, config.num_labels)
        self.post_init()

    def forward(self, pixel_values, labels=None, **kwargs):
        features = torch.tanh(self.proj(self.backbone(pixel_values)))  # (B, embedding_size)
        logits = self.out_head(features)  # (B, num_labels)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(TinyClassifierConfig.model_type, TinyClassifierConfig, exist_ok=True)
AutoModelForImageClassification.register(TinyClassifierConfig, TinyClassifier, exist_ok=True)


# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch inside the block only; the global RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def base_config(arch: str, num_labels: int = NUM_LABELS, **overrides) -> PreTrainedConfig:
    if arch == "resnet":
        kw = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
        return ResNetConfig(num_channels=3, num_labels=num_labels, **{**kw, **overrides})
    if arch == "vit":
        kw = dict(patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
        kw.update(initializer_range=0.2)
        return ViTConfig(image_size=IMAGE_SIZE, num_channels=3, num_labels=num_labels, **{**kw, **overrides})
    if arch == "convnext":
        kw = dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], patch_size=2)
        return ConvNextConfig(num_channels=3, num_labels=num_labels, **{**kw, **overrides})
    if arch == "handwritten":
        return TinyClassifierConfig(num_labels=num_labels, **overrides)
    if arch == "cifar_resnet":
        from resmem.models import CifarResNetConfig

        return CifarResNetConfig(num_labels=num_labels, hidden_sizes=[8, 16], depths=[1, 1], **overrides)
    raise KeyError(arch)


def make_base(arch: str, seed: int = 0, num_labels: int = NUM_LABELS, **overrides) -> PreTrainedModel:
    """A tiny random classifier of the given architecture, in eval mode."""
    config = base_config(arch, num_labels, **overrides)
    with seeded(seed):
        return AutoModelForImageClassification.from_config(config).eval()


def random_pixels(n: int, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """`(n, 3, size, size)` float32 standard normal pixels."""
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def make_pixel_dataset(n: int = 60, seed: int = 0, num_labels: int = NUM_LABELS) -> datasets.Dataset:
    """A `datasets.Dataset` with `pixel_values` `(3, 16, 16)` float32 and integer `label` columns."""
    rng = np.random.default_rng(seed + 1000)
    pixels = random_pixels(n, seed)
    labels = rng.integers(0, num_labels, n).astype(np.int64)
    return datasets.Dataset.from_dict({"pixel_values": pixels, "label": labels})


def dataset_arrays(dataset: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """`(pixels (N, 3, H, W) float32, labels (N,) int64)` read back from a pixel dataset."""
    rows = dataset.with_format("numpy")[:]
    return np.asarray(rows["pixel_values"], dtype=np.float32), np.asarray(rows["label"], dtype=np.int64)


def make_image_dataset(n: int = 24, seed: int = 0, num_labels: int = NUM_LABELS) -> datasets.Dataset:
    """A `datasets.Dataset` of `n` random 16x16 RGB PIL images (`image`) with `label`s."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)) for _ in range(n)]
    labels = rng.integers(0, num_labels, n).tolist()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


# ---------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="session")
def _resmem_cache(tmp_path_factory):
    """Indexes trained at run time (on-disk memories) go to a temporary cache, never into the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RESMEM_CACHE", str(tmp_path_factory.mktemp("resmem_cache")))
        yield


@pytest.fixture
def pixel_dataset() -> datasets.Dataset:
    return make_pixel_dataset(60, seed=0)


@pytest.fixture
def query_pixels() -> torch.Tensor:
    """Query images drawn from another seed than any memory data set (distinct from memory points)."""
    return torch.from_numpy(random_pixels(12, seed=12345))


@pytest.fixture
def image_dataset() -> datasets.Dataset:
    return make_image_dataset(24, seed=0)
