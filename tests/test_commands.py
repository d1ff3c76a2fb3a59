"""The `resmem` command line: one grammar for `tune` / `eval` on both tasks, the task read after parsing.

Image classifiers on an image folder and a save_to_disk folder; causal LMs on text files and a
save_to_disk folder; options of the other task refused with the option to use instead; the demo's
options read by `HfArgumentParser(DemoConfig)`.
"""

from __future__ import annotations

import json
import math
import os
import re

import datasets
import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, NUM_LABELS, make_base, make_pixel_dataset
from lm_helpers import tiny_base, word_tokenizer
from PIL import Image
from transformers import ViTImageProcessor

from resmem import ResMemForCausalLM, ResMemForImageClassification, ResMemWrapper
from resmem.cli import build_parser, demo_config
from resmem.cli import main as cli_main
from resmem.demo import DemoConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(argv):
    """Parse with the real `resmem` parser and call the handler (user errors propagate as SystemExit)."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


def write_image_folder(root, splits, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in splits.items():
        for i in range(n):
            folder = root / split / f"class_{i % NUM_LABELS}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    data_dir = tmp_path / "images"
    write_image_folder(data_dir, {"train": 30, "validation": 20, "test": 10})
    processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    train = datasets.load_dataset("imagefolder", data_dir=str(data_dir), split="train")
    model = ResMemWrapper.from_base(make_base("resnet", seed=2), k=3)
    model.build_memory(train, batch_size=16, image_processor=processor)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    return tmp_path, data_dir


# ------------------------------------------------------------------ a tiny saved causal LM and its text
LM_TRAIN = ["w1 w2 w3 w4 w5 w6", "w7 w8 w9 w10", "w3 w4 w5 w11 w12"]
LM_HELD_OUT = ["w1 w2 w3 w9", "w4 w5 w6 w7 w8", "w3 w4 w5 w11 w2"]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A saved `ResMemForCausalLM` (tiny llama, word tokenizer saved next to it), windows of 12 tokens."""
    root = tmp_path_factory.mktemp("lm")
    tok = word_tokenizer(100)
    m = ResMemWrapper.from_base(tiny_base("llama"), k=2, sigma=1.0)
    m.config.window, m.config.stride = 12, 8
    m.build_memory(LM_TRAIN, tokenizer=tok)
    m.save_pretrained(root / "saved")
    tok.save_pretrained(root / "saved")
    (root / "heldout.txt").write_text("\n\n".join(LM_HELD_OUT) + "\n")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": LM_HELD_OUT})}).save_to_disk(str(root / "ds"))
    return root


def with_distribution(lm_dir, tmp_path, distribution, lam=0.3):
    """A copy of the saved LM whose config says `distribution` (and `mixture_lambda`)."""
    m = ResMemForCausalLM.from_pretrained(lm_dir / "saved")
    m.config.distribution, m.config.mixture_lambda = distribution, lam
    m.save_pretrained(tmp_path / "lm")
    word_tokenizer(100).save_pretrained(tmp_path / "lm")
    return tmp_path / "lm"


def reference_lm_numbers(folder, texts):
    """Perplexities and accuracy from the model's own forward (its `logits` are the configured distribution's
    log-probabilities), text by text: every text fits one window, so every position with a next token counts."""
    model = ResMemForCausalLM.from_pretrained(folder)
    tok = word_tokenizer(100)
    nll, base_nll, correct, n = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])  # (1, L)
            out = model(ids)
            labels = ids[:, 1:]  # (1, L-1)
            nll -= out.logits[:, :-1].gather(2, labels[..., None]).sum().item()
            base_nll -= out.base_logits[:, :-1].log_softmax(-1).gather(2, labels[..., None]).sum().item()
            correct += (out.scores[:, :-1].argmax(-1) == labels).sum().item()
            n += labels.numel()
    return {"ppl": math.exp(nll / n), "base_ppl": math.exp(base_nll / n), "accuracy": correct / n, "positions": n}


# ------------------------------------------------------------------ help and parsing
IMAGE_OPTIONS = ["--data-dir", "--label-column", "--image-column", "--image-processor"]
TEXT_OPTIONS = ["--data", "--tokenizer", "--text-column", "--sample-by", "--max-tokens"]
COMMON_OPTIONS = ["--dataset", "--split", "--batch-size", "--output-dir", "--save", "--no-progress", "--model"]


@pytest.mark.parametrize("command", ["eval", "tune"])
def test_help_lists_the_options_of_both_tasks(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "image data:" in text and "text data (causal LM):" in text
    for option in IMAGE_OPTIONS + TEXT_OPTIONS + COMMON_OPTIONS + (["--k", "--sigma", "--temperature", "--lam"] if command == "tune" else []):
        assert f"{option} " in text, option
    if command == "eval":  # eval reports at the saved setting: no grid to choose from
        assert "--k " not in text and "--sigma " not in text and "--lam" not in text


def test_no_option_is_abbreviated():
    """`--data` is its own option (no "ambiguous option: --data could match --data-dir, --dataset"), and a prefix
    of a longer option is not silently taken for it."""
    args = build_parser().parse_args(["eval", "m", "--data", "x.txt"])
    assert args.data == ["x.txt"] and args.data_dir is None and args.dataset is None
    for argv in (["eval", "m", "--image-proc", "p"], ["tune", "m", "--data-d", "d"], ["demo", "--epo", "1"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)


def test_demo_parser_reads_the_old_options_into_demo_config():
    old = ["demo", "--output-dir", "out", "--seed", "3", "--epochs", "2", "--no-tune", "--k", "7", "--sigma", "0.5",
           "--temperature", "1.4", "--threads", "0", "--splits-dir", "splits", "--no-progress"]
    config = demo_config(build_parser().parse_args(old))
    assert config == DemoConfig(output_dir="out", seed=3, epochs=2, tune=False, k=7, sigma=0.5, temperature=1.4,
                                num_threads=None, splits_dir="splits", progress=False)
    assert demo_config(build_parser().parse_args(["demo"])) == DemoConfig()
    assert demo_config(build_parser().parse_args(["demo", "--threads", "2", "--k-grid", "3", "4"])).num_threads == 2
    assert demo_config(build_parser().parse_args(["demo", "--k-grid", "3", "4"])).k_grid == [3, 4]


def test_demo_help_keeps_the_option_help(capsys):
    with pytest.raises(SystemExit):
        cli_main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("--output-dir", "where the ResMem model is saved", "--threads", "--no-tune", "--no-progress",
                     "--splits-dir", "kernel width, with --no-tune"):
        assert fragment in text, fragment


# ------------------------------------------------------------------ image classifiers
def test_tune_command_writes_json_plots_and_card(setup, capsys):
    tmp_path, data_dir = setup
    out = tmp_path / "report"
    status = run(["tune", str(tmp_path / "model"), "--data-dir", str(data_dir), "--k", "1", "3", "10",
                  "--sigma", "0.5", "1", "--temperature", "1", "2", "--output-dir", str(out), "--save", "--no-progress"])
    assert status == 0
    assert sorted(os.listdir(out)) == ["tune.json", "tune_per_class_gain.png", "tune_sensitivity.png"]
    for name in ("tune_per_class_gain.png", "tune_sensitivity.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    report = json.loads((out / "tune.json").read_text())
    assert len(report["table"]) == 12 and report["num_examples"] == 20
    assert set(report["sensitivity"]) == {"k", "sigma", "temperature"}
    assert len(report["sensitivity"]["k"]) == 3 and len(report["per_class"]) == NUM_LABELS
    best = report["best"]
    assert f"k={best['k']}" in capsys.readouterr().out
    loaded = ResMemWrapper.from_pretrained(tmp_path / "model")
    assert (loaded.config.k, loaded.config.sigma, loaded.config.residual_temperature) == (best["k"], best["sigma"], best["temperature"])
    card = (tmp_path / "model" / "README.md").read_text()
    assert f"{100 * best['accuracy']:.2f}%" in card and f"{100 * best['base_accuracy']:.2f}%" in card
    assert "split `validation`" in card and "imagefolder" in card


def test_tune_refuses_the_test_split(setup):
    tmp_path, data_dir = setup
    with pytest.raises(SystemExit, match="must not see the test split"):
        run(["tune", str(tmp_path / "model"), "--data-dir", str(data_dir), "--split", "test"])


def test_eval_command_on_a_saved_dataset(setup):
    tmp_path, _ = setup
    saved = tmp_path / "saved_ds"
    datasets.DatasetDict({"test": make_pixel_dataset(15, seed=4)}).save_to_disk(str(saved))
    out = tmp_path / "eval"
    assert run(["eval", str(tmp_path / "model"), "--dataset", str(saved), "--output-dir", str(out), "--no-progress"]) == 0
    assert sorted(os.listdir(out)) == ["eval.json", "eval_per_class_gain.png"]
    result = json.loads((out / "eval.json").read_text())
    assert result["num_examples"] == 15 and result["gain"] == pytest.approx(result["tpr"] - result["fpr"])
    assert result["task"] == "image-classification" and result["split"] == "test"
    # the --model alias of older scripts gives the same numbers
    out2 = tmp_path / "eval2"
    assert run(["eval", "--model", str(tmp_path / "model"), "--dataset", str(saved), "--output-dir", str(out2), "--no-plots",
                "--no-progress"]) == 0
    assert json.loads((out2 / "eval.json").read_text())["resmem_accuracy"] == result["resmem_accuracy"]
    with pytest.raises(SystemExit, match=r"split 'validation' not found; available: \['test'\]"):
        run(["eval", str(tmp_path / "model"), "--dataset", str(saved), "--split", "validation"])


# ------------------------------------------------------------------ causal LMs
@pytest.mark.parametrize("distribution", ["clamp", "mixture"])
def test_lm_eval_reports_the_configured_distribution_only(lm_dir, tmp_path, capsys, distribution):
    """`resmem eval MODEL --data FILE` on a causal LM: positional model, no ambiguity error, the perplexity of the
    saved distribution (checked against the model's own forward), and no best-of-a-grid column."""
    folder = with_distribution(lm_dir, tmp_path, distribution)
    out = tmp_path / "report"
    assert cli_main(["eval", str(folder), "--data", str(lm_dir / "heldout.txt"), "--output-dir", str(out),
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    assert sorted(os.listdir(out)) == ["eval.json"]
    expected = reference_lm_numbers(folder, LM_HELD_OUT)
    assert result["num_examples"] == expected["positions"] == 3 + 4 + 4
    assert result["ppl"] == pytest.approx(expected["ppl"], rel=1e-4)
    assert result["base_ppl"] == pytest.approx(expected["base_ppl"], rel=1e-4)
    assert result["resmem_accuracy"] == pytest.approx(expected["accuracy"])
    assert result["distribution"] == distribution and ("mixture_lambda" in result) == (distribution == "mixture")
    assert result["unit"] == "token positions" and result["split"] == "test"
    assert f"-> {expected['ppl']:.2f}" in printed and f"distribution={distribution}" in printed
    assert "best" not in printed.lower() and "(lam)" not in printed
    if distribution == "mixture":
        assert "lambda 0.3" in printed


def test_lm_eval_from_a_saved_dataset_and_the_model_alias(lm_dir, tmp_path):
    """`--dataset` serves LMs too (same numbers as the same texts in a file); `--model` still names the model."""
    out_file, out_ds = tmp_path / "file", tmp_path / "ds"
    assert cli_main(["eval", "--model", str(lm_dir / "saved"), "--data", str(lm_dir / "heldout.txt"),
                     "--output-dir", str(out_file), "--no-progress"]) == 0
    assert cli_main(["eval", str(lm_dir / "saved"), "--dataset", str(lm_dir / "ds"), "--output-dir", str(out_ds),
                     "--no-progress"]) == 0
    a, b = (json.loads((d / "eval.json").read_text()) for d in (out_file, out_ds))
    assert a["num_examples"] == b["num_examples"] == 11
    assert (a["resmem_accuracy"], a["ppl"]) == pytest.approx((b["resmem_accuracy"], b["ppl"]))


def test_lm_tune_from_a_saved_dataset_with_the_model_alias(lm_dir, tmp_path, capsys):
    ds = tmp_path / "val_ds"
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"body": LM_HELD_OUT})}).save_to_disk(str(ds))
    out = tmp_path / "report"
    assert cli_main(["tune", "--model", str(lm_dir / "saved"), "--dataset", str(ds), "--text-column", "body",
                     "--k", "1", "2", "--sigma", "0.5", "5", "--lam", "0.3", "0.8", "--output-dir", str(out),
                     "--no-plots", "--no-progress"]) == 0
    report = json.loads((out / "tune.json").read_text())
    assert len(report["table"]) == 4 and report["num_examples"] == 11
    assert report["best"]["mixture_lambda"] in (0.3, 0.8)
    assert "best (accuracy)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "task, extra, match",
    [
        ("lm", ["--image-processor", "p"], r"--image-processor does not apply: the model is a causal LM .*--tokenizer"),
        ("lm", ["--label-column", "y"], r"--label-column does not apply: .*--text-column"),
        ("lm-data-dir", [], r"--data-dir does not apply: the model is a causal LM .*--data FILE\.\.\. or .*--dataset DIR"),
        ("lm-tune", ["--temperature", "1"], r"--temperature does not apply: .*fixed when it is built.*--lam"),
        ("image", ["--tokenizer", "t"], r"--tokenizer does not apply: the model is an image classifier .*--image-processor"),
        ("image-data", [], r"--data does not apply: the model is an image classifier .*--data-dir DIR or .*--dataset DIR"),
        ("image-tune", ["--lam", "0.5"], r"--lam does not apply: .*--temperature"),
        ("lm", ["--dataset", "d"], r"--dataset and --data together: pass exactly one of --data-dir"),
        ("lm-nodata", [], r"no data: pass exactly one of --data-dir DIR \(image folder\), --dataset DIR"),
        ("lm-tune", ["--sigma", "auto", "1"], r"--sigma takes numbers or the single word auto"),
        ("lm-two-models", [], r"MODEL given twice"),
        ("lm-after-data", [], r"--data took the folder .*saved as a text file: name the model first, resmem eval .*saved --data"),
    ],
)
def test_options_of_the_other_task_are_one_line_errors_naming_the_fix(setup, lm_dir, capsys, task, extra, match):
    tmp_path, data_dir = setup
    lm, image, text = str(lm_dir / "saved"), str(tmp_path / "model"), str(lm_dir / "heldout.txt")
    argv = {
        "lm": ["eval", lm, "--data", text],
        "lm-data-dir": ["eval", lm, "--data-dir", str(data_dir)],
        "lm-tune": ["tune", lm, "--data", text],
        "image": ["eval", image, "--data-dir", str(data_dir)],
        "image-data": ["eval", image, "--data", text],
        "image-tune": ["tune", image, "--data-dir", str(data_dir)],
        "lm-nodata": ["eval", lm],
        "lm-two-models": ["eval", lm, "--model", image, "--data", text],
        "lm-after-data": ["eval", "--data", text, lm],
    }[task] + extra
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("resmem: error: ") and "Traceback" not in err, err
    assert re.search(match, err), err


class _Stop(Exception):
    """Raised by the stand-in `tune` once it has seen its arguments (not a user error: cli.main re-raises it)."""


@pytest.mark.parametrize("task", ["image", "lm"])
def test_tune_passes_sigma_auto_through_by_default(setup, lm_dir, monkeypatch, task):
    """`resmem tune` without --sigma (and with --sigma auto) asks `model.tune(sigma="auto")`: the grid in units of
    `model.sigma_scale()` is model.tune's job."""
    tmp_path, data_dir = setup
    seen = []

    def fake_tune(self, data, **kwargs):
        seen.append(kwargs["sigma"])
        raise _Stop

    cls = ResMemForCausalLM if task == "lm" else ResMemForImageClassification
    monkeypatch.setattr(cls, "tune", fake_tune)
    argv = (["tune", str(lm_dir / "saved"), "--data", str(lm_dir / "heldout.txt"), "--split", "validation"] if task == "lm"
            else ["tune", str(tmp_path / "model"), "--data-dir", str(data_dir)])
    for extra in ([], ["--sigma", "auto"], ["--sigma", "0.5", "2"]):
        with pytest.raises(_Stop):
            cli_main(argv + extra + ["--no-progress"])
    assert seen == ["auto", "auto", [0.5, 2.0]]
