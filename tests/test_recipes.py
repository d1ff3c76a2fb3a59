"""Each paper recipe's `--smoke` mode runs end to end (tiny local data, no network) in the default run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
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


def lr_sequence(make_scheduler, steps: int) -> np.ndarray:
    """The lr multiplier of each of `steps` optimizer steps (lr read before the step, scheduler stepped after)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = make_scheduler(optimizer)
    lr = []
    for _ in range(steps):
        lr.append(optimizer.param_groups[0]["lr"] / 0.5)
        optimizer.step()
        scheduler.step()
    return np.array(lr)


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
    lr = lr_sequence(lambda opt: train.lr_schedule(opt, 10, 15, [96, 192, 224], 0.1), 2560)
    assert lr[[0, 140, 149, 150, 959, 960, 1920, 2240, 2559]] == pytest.approx(
        [0.1 / 15, 141 / 150, 1.0, 1.0, 1.0, 0.1, 0.01, 0.001, 0.001])
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
    check_decomposition(r, base="base_accuracy", resmem="resmem_accuracy")
    assert r["num_examples"] > 0 and results["memory_tokens"] > 0 and r["distribution"] == "clamp"
    assert (r["k"], r["sigma"], r["temperature"]) == (50, 1.0, 1.0)
    assert saved["args"]["window"] == 256 and saved["args"]["stride"] == 192


# ----------------------------------------------------------------------------- scaling studies (CIFAR recipe)
def test_subsample_is_class_balanced_random_and_checked():
    from datasets import ClassLabel, Dataset, Features, Value

    train = load_recipe("cifar100_resnet8/train.py")
    labels = [c for c in range(4) for _ in range(25)]  # sorted by class, like an image folder
    ds = Dataset.from_dict({"label": labels, "idx": list(range(100))},
                           features=Features({"label": ClassLabel(num_classes=4), "idx": Value("int64")}))
    half = train.subsample(ds, "label", fraction=0.5, seed=0)
    assert len(half) == 50
    assert sorted(np.bincount(half["label"], minlength=4).tolist()) == [12, 12, 13, 13]  # every class, not a prefix
    assert train.subsample(ds, "label", fraction=0.5, seed=0)["idx"] == half["idx"]  # seeded
    assert len(train.subsample(ds, "label", fraction=1.0, max_examples=20)) == 20
    assert train.subsample(ds, "label", fraction=1.0) is ds
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="--train-fraction"):
            train.subsample(ds, "label", fraction=bad)


def test_scaling_smoke_runs_both_studies_and_plots(tmp_path):
    scaling = load_recipe("cifar100_resnet8/scaling.py")
    with torch.random.fork_rng(devices=[]):
        threads = torch.get_num_threads()
        try:
            summary = scaling.main(["--smoke", "--output-dir", str(tmp_path), "--", "--tune-on-validation", "0.25"])
        finally:
            torch.set_num_threads(threads)
    fractions = summary["training_fraction"]
    sizes = summary["network_size"]
    assert [r["train_fraction"] for r in fractions] == [0.5, 1.0]
    assert [r["depth"] for r in sizes] == [8, 14]
    assert fractions[0]["train_examples"] < fractions[1]["train_examples"]
    assert sizes[0]["parameters"] < sizes[1]["parameters"]
    # the ResNet8 at the size study's fraction is one run shared by both studies
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "resnet14_fraction1", "resnet8_fraction0.5", "resnet8_fraction1"]
    for r in fractions + sizes:
        saved = json.loads((tmp_path / r["run"] / "results.json").read_text())
        assert r["base_accuracy"] == saved["test"]["base_accuracy"]
        assert r["resmem_accuracy"] == saved["test"]["resmem_accuracy"]
        check_decomposition(r)
    assert json.loads((tmp_path / "scaling.json").read_text())["network_size"] == sizes
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| resnet14_fraction1 |" in (tmp_path / "scaling.md").read_text()


def test_scaling_resumes_only_runs_made_with_the_same_arguments(tmp_path):
    scaling = load_recipe("cifar100_resnet8/scaling.py")
    args = scaling.parse_args(["--", "--data-dir", "somewhere", "--epochs", "3"])
    argv = scaling.train_argv(args, 2, 0.5, str(tmp_path))
    assert scaling.finished(str(tmp_path), argv) is None  # nothing saved yet
    saved_args = vars(scaling.train.parse_args(argv))
    saved_args.pop("train_fraction")  # written before the flag existed: counts as its default (1.0)
    (tmp_path / "results.json").write_text(json.dumps({"args": saved_args}))
    assert scaling.finished(str(tmp_path), argv) is None  # 1.0 != 0.5
    saved_args["train_fraction"] = 0.5
    saved_args["output_dir"] = "elsewhere"  # where it was written does not matter
    (tmp_path / "results.json").write_text(json.dumps({"args": saved_args}))
    assert scaling.finished(str(tmp_path), argv) is not None
    assert scaling.finished(str(tmp_path), scaling.train_argv(args, 3, 0.5, str(tmp_path))) is None  # other depth


# ----------------------------------------------------------------------------- from-scratch decoder LM
def test_scratch_decoder_lm_smoke(tmp_path):
    results, saved = run_smoke("scratch_decoder_lm/run.py", tmp_path)
    assert results["chosen"]["chosen_by"] == "validation paragraphs"
    for name in ("tuned on validation", "paper (k=50, sigma=1)"):
        r = results["test"][name]
        check_decomposition(r, base="base_accuracy", resmem="resmem_accuracy")
        assert r["num_examples"] > 0 and r["base_ppl"] > 1.0 and r["split"] == "test"
        assert r["distribution"] == results["chosen"]["distribution"]
    # the smoke text is templated sentences: a memory of the training paragraphs must help on held-out ones
    tuned = results["test"]["tuned on validation"]
    assert tuned["resmem_accuracy"] > tuned["base_accuracy"]
    assert (tuned["k"], tuned["sigma"]) == (results["chosen"]["k"], results["chosen"]["sigma"])
    assert results["memory"]["entries"] > 0
    assert results["memory"]["layer"].endswith("post_attention_layernorm")
    assert saved["split"]["train_paragraphs"] > saved["split"]["test_paragraphs"] > 0
    assert (tmp_path / "base_model" / "tokenizer.json").is_file()
    assert (tmp_path / "base_model" / "config.json").is_file()


def test_scratch_decoder_lm_schedule_and_split(tmp_path):
    run = load_recipe("scratch_decoder_lm/run.py")
    lr = lr_sequence(lambda opt: run.lr_schedule(opt, 100, 10), 101)
    assert lr[[0, 9, 10, 55, 100]] == pytest.approx([0.1, 1.0, 1.0, 0.5, 0.0])
    text = tmp_path / "t.txt"
    paragraphs = [f"paragraph {i} about topic {i % 7}." for i in range(200)] + ["a repeated paragraph."] * 20
    text.write_text("\n\n".join(paragraphs) + "\n")
    train, val, test = run.load_paragraph_splits([str(text)], 0.1, 0.1, seed=0)
    assert len(train) + len(val) + len(test) <= 220 and len(val) > 0 and len(test) > 0
    assert not (set(val) | set(test)) & set(train)  # nothing held out is also in train


def test_scaling_equal_steps_schedule_and_gain_standard_error():
    scaling = load_recipe("cifar100_resnet8/scaling.py")
    args = scaling.parse_args(["--equal-steps", "--", "--epochs", "12", "--warmup-epochs", "1", "--milestones", "5", "9", "11"])
    parsed = scaling.train.parse_args(scaling.train_argv(args, 1, 0.25, "out"))
    assert (parsed.epochs, parsed.warmup_epochs, parsed.milestones, parsed.train_fraction) == (48, 4.0, [20, 36, 44], 0.25)
    parsed = scaling.train.parse_args(scaling.train_argv(args, 1, 1.0, "out"))
    assert (parsed.epochs, parsed.milestones) == (12, [5, 9, 11])  # the full set keeps the schedule as given
    # the s.e. of a paired accuracy difference, against the per-example differences themselves
    n, fixed, broken = 1000, 37, 21
    d = np.zeros(n)
    d[:fixed], d[fixed:fixed + broken] = 1.0, -1.0
    r = {"tpr": fixed / n, "fpr": broken / n, "gain": (fixed - broken) / n}
    assert scaling.gain_standard_error(r, n) == pytest.approx(d.std() / np.sqrt(n))


# ----------------------------------------------------------------------------- lr schedules
def _warmup_then_steps(step, steps_per_epoch, warmup_epochs, milestones, decay):
    """The cifar recipe's former hand-written LambdaLR multiplier."""
    epoch = step / steps_per_epoch
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return (step + 1) / (warmup_epochs * steps_per_epoch)
    return decay ** sum(epoch >= m for m in milestones)


def _cosine_with_warmup(step, total, warmup):
    """The scratch LM recipe's former hand-written LambdaLR multiplier."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + np.cos(np.pi * min(1.0, progress)))


@pytest.mark.parametrize("steps_per_epoch,warmup_epochs,milestones,decay", [
    (10, 15, [96, 192, 224], 0.1), (7, 2, [1, 5, 9], 0.5), (3, 0, [1, 2], 0.1), (4, 1, [], 0.1), (391, 1, [2], 0.1),
])
def test_cifar_schedule_is_the_former_hand_written_one(steps_per_epoch, warmup_epochs, milestones, decay):
    """torch's LinearLR + MultiStepLR give every step's lr of the former LambdaLR (whole warm-up steps)."""
    train = load_recipe("cifar100_resnet8/train.py")
    steps = (max(milestones, default=3) + 2) * steps_per_epoch
    lr = lr_sequence(lambda opt: train.lr_schedule(opt, steps_per_epoch, warmup_epochs, milestones, decay), steps)
    reference = [_warmup_then_steps(s, steps_per_epoch, warmup_epochs, milestones, decay) for s in range(steps)]
    np.testing.assert_allclose(lr, reference, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("total,warmup", [(100, 10), (37, 0), (50, 1), (33, 5), (2000, 100)])
def test_scratch_lm_schedule_is_the_former_hand_written_one(total, warmup):
    """torch's LinearLR + CosineAnnealingLR give every step's lr of the former cosine-with-warm-up LambdaLR."""
    run = load_recipe("scratch_decoder_lm/run.py")
    lr = lr_sequence(lambda opt: run.lr_schedule(opt, total, warmup), total + 1)
    np.testing.assert_allclose(lr, [_cosine_with_warmup(s, total, warmup) for s in range(total + 1)], rtol=1e-9, atol=1e-12)
