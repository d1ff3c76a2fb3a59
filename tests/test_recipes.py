"""Each paper recipe's `--smoke` mode runs end to end (tiny local data, no network) in the default run."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def load_recipe(relative: str):
    path = RECIPES / relative
    name = "recipe_" + relative.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_smoke(relative: str, tmp_path, *extra):
    module = load_recipe(relative)
    with torch.random.fork_rng(devices=[]):
        threads = torch.get_num_threads()
        try:
            results = module.main(["--smoke", "--output-dir", str(tmp_path), *extra])
        finally:
            torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "results.json").read_text())
    markdown = (tmp_path / "results.md").read_text()
    assert "paper" in markdown and "DeepNet" in markdown
    return results, saved


def check_decomposition(r: dict, base="base_accuracy", resmem="resmem_accuracy"):
    assert 0.0 <= r[base] <= 1.0 and 0.0 <= r[resmem] <= 1.0
    assert r["gain"] == pytest.approx(r["tpr"] - r["fpr"])
    assert r["gain"] == pytest.approx(r[resmem] - r[base], abs=1e-9)


def test_cifar100_resnet8_smoke(tmp_path):
    results, saved = run_smoke("cifar100_resnet8/train.py", tmp_path, "--tune-on-validation", "0.25", "--save-model")
    check_decomposition(results["test"])
    assert saved["test"] == results["test"]
    assert results["hyperparameters"]["chosen_by"].startswith("validation")
    assert any(name.startswith("validation") for name in results["rows"])
    assert (tmp_path / "resmem_model" / "resmem_memory.safetensors").is_file()
    assert (tmp_path / "base_model" / "config.json").is_file()


def test_cifar100_resnet8_schedule_and_augmentation():
    train = load_recipe("cifar100_resnet8/train.py")
    args = train.parse_args([])
    assert (args.epochs, args.batch_size, args.lr, args.momentum, args.warmup_epochs, args.milestones) == (
        256, 128, 0.4, 0.9, 15, [96, 192, 224])
    assert (args.k, args.sigma, args.temperature) == (53, 0.7, 1.4)
    lr = [train.lr_lambda(e * 10, 10, 15, [96, 192, 224], 0.1) for e in (0, 14, 15, 95, 96, 192, 224, 255)]
    assert lr == pytest.approx([0.1 / 15, 141 / 150, 1.0, 1.0, 0.1, 0.01, 0.001, 0.001])
    x = torch.randn(8, 3, 32, 32)
    y = train.augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    # every augmented image is a shifted (and possibly flipped) crop of the zero-padded original
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(8):
        crops = [padded[i, :, a:a + 32, b:b + 32] for a in range(9) for b in range(9)]
        assert any(torch.equal(y[i], c) or torch.equal(y[i], c.flip(-1)) for c in crops)


def test_imagenet_resnet18_smoke(tmp_path):
    results, saved = run_smoke("imagenet_resnet18/run.py", tmp_path)
    check_decomposition(results["validation"])
    assert saved["memory_entries"] == 30
    assert results["hyperparameters"]["k"] == 30  # clamped to the tiny memory (default 80)


def test_c4_causal_lm_smoke(tmp_path):
    results, saved = run_smoke("c4_causal_lm/run.py", tmp_path)
    r = results["evaluation"]
    check_decomposition(r, base="base_accuracy", resmem="accuracy")
    assert r["positions"] > 0 and results["memory_tokens"] > 0
    assert (r["k"], r["sigma"], r["temperature"]) == (50, 1.0, 1.0)
    assert saved["args"]["window"] == 256 and saved["args"]["stride"] == 192
