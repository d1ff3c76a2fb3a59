"""`resmem tune` / `resmem eval` handlers (commands.py) on an image folder and a save_to_disk folder."""

from __future__ import annotations

import argparse
import json
import os

import datasets
import numpy as np
import pytest
from conftest import IMAGE_SIZE, NUM_LABELS, make_base, make_pixel_dataset
from PIL import Image
from transformers import ViTImageProcessor

from resmem import ResMemWrapper
from resmem.commands import add_eval_parser, add_tune_parser

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(argv):
    parser = argparse.ArgumentParser(prog="resmem")
    sub = parser.add_subparsers(dest="command", required=True)
    add_tune_parser(sub)
    add_eval_parser(sub)
    args = parser.parse_args(argv)
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
    with pytest.raises(SystemExit, match=r"split 'validation' not found; available: \['test'\]"):
        run(["eval", str(tmp_path / "model"), "--dataset", str(saved), "--split", "validation"])
