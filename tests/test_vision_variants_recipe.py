"""recipes/cifar100_resnet8/variants.py: the ablation of ResMem variants (selection on validation only)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from test_recipes import load_recipe


def test_the_carve_is_train_pys(tmp_path):
    """The variants script validates on exactly the images train.py held out (same fraction and seed)."""
    train_mod = load_recipe("cifar100_resnet8/train.py")
    variants = load_recipe("cifar100_resnet8/variants.py")
    folder = train_mod.make_smoke_folder(str(tmp_path / "data"), classes=3, train_per_class=12, test_per_class=4)
    ns = argparse.Namespace(data_dir=folder, dataset=None, label_column=None, image_column=None,
                            train_split="train", test_split="test")
    train, test, label_column, image_column = train_mod.load_splits(ns)
    for seed in (0, 3):
        parts = train.train_test_split(test_size=0.25, stratify_by_column=label_column, seed=seed)  # as train.py
        splits = variants.Splits(train_mod, folder, 0.25, seed, cache={})
        x_val, y_val = train_mod.load_uint8(parts["test"], image_column, label_column)
        rows = np.asarray(splits.validation["row"])
        assert np.array_equal(splits.x_train[rows].numpy(), x_val.numpy())
        assert splits.validation["label"] == y_val.tolist()
        x_tr, _ = train_mod.load_uint8(parts["train"], image_column, label_column)
        assert np.array_equal(splits.x_train[np.asarray(splits.train["row"])].numpy(), x_tr.numpy())


def _seed(val: dict, test: dict, base=0.5) -> dict:
    return {"variants": {name: {"validation_accuracy": val[name], "validation_base_accuracy": base,
                                "test_accuracy": test[name], "test_base_accuracy": base,
                                "test_relative_error_reduction": (test[name] - base) / (1 - base)}
                         for name in val}}


def test_selection_reads_validation_never_test():
    variants = load_recipe("cifar100_resnet8/variants.py")
    names = ["paper", "l2 keys", "relative sigma"]
    # On test "relative sigma" is far best; on validation "l2 keys" wins seed 0 and ties "paper" on seed 1.
    seeds = [
        _seed({"paper": 0.60, "l2 keys": 0.62, "relative sigma": 0.55}, {"paper": 0.6, "l2 keys": 0.6, "relative sigma": 0.9}),
        _seed({"paper": 0.61, "l2 keys": 0.61, "relative sigma": 0.58}, {"paper": 0.6, "l2 keys": 0.6, "relative sigma": 0.9}),
    ]
    assert variants.winners(seeds, names) == []  # l2 keys does not beat paper on seed 1 (a tie)
    seeds[1]["variants"]["l2 keys"]["validation_accuracy"] = 0.615
    assert variants.winners(seeds, names) == ["l2 keys"]
    variants.select(seeds, names)
    assert [s["variants"][variants.SELECTED]["chose"] for s in seeds] == ["l2 keys", "l2 keys"]
    seeds[1]["variants"]["l2 keys"]["validation_accuracy"] = 0.61  # tie: the earlier variant (paper) wins
    variants.select(seeds, names)
    assert seeds[1]["variants"][variants.SELECTED]["chose"] == "paper"


def test_summary_means_and_standard_errors_match_numpy():
    variants = load_recipe("cifar100_resnet8/variants.py")
    test = [0.70, 0.74, 0.71]
    seeds = [_seed({"paper": 0.7}, {"paper": t}, base=0.68) for t in test]
    (row,) = variants.summarise(seeds, ["paper"])
    red = (np.array(test) - 0.68) / 0.32
    assert row["test_relative_error_reduction"] == pytest.approx(red.mean())
    assert row["test_relative_error_reduction_se"] == pytest.approx(red.std(ddof=1) / np.sqrt(3))
    assert row["test_gain"] == pytest.approx(np.mean(test) - 0.68)
    assert variants.relative_error_reduction(0.8, 0.82) == pytest.approx(0.1)
    assert np.isnan(variants.relative_error_reduction(1.0, 1.0))
    assert "paper" in variants.markdown([row], 3)


def test_unknown_variant_is_a_clear_error(capsys):
    variants = load_recipe("cifar100_resnet8/variants.py")
    with pytest.raises(SystemExit):
        variants.parse_args(["--runs", "r", "--data-dir", "d", "--variants", "paper+flip everything"])
    assert "unknown variant" in capsys.readouterr().err
    assert variants.combine("relative sigma+hflip memory") == {
        "config": {"sigma_mode": "relative"}, "build": {"augment": "hflip"}, "sigma": variants.ATOMS["relative sigma"]["sigma"]}
    json.dumps(variants.ATOMS)  # plain data: recorded as is in variants.json


def test_smoke_runs_every_variant_kind_through_the_library(tmp_path):
    """Two tiny seeds trained by train.py (with checkpoints), then the paper row and one row combining every kind."""
    variants = load_recipe("cifar100_resnet8/variants.py")
    combo = "relative sigma+whitened keys+hflip memory+hflip queries+residuals from epoch 3"
    out = variants.main(["--smoke", "--variants", "paper", combo, "--output-dir", str(tmp_path)])
    for seed in out["seeds"]:
        row = seed["variants"][combo]
        assert row["memory_size"] == 2 * seed["train"]  # the flipped copies are in the memory
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["validation_accuracy"] >= 0.0
        assert seed["variants"][variants.SELECTED]["chose"] in ("paper", combo)
    assert [r["variant"] for r in out["summary"]] == ["paper", combo, variants.SELECTED]
    assert (tmp_path / "variants.png").stat().st_size > 0
    assert json.loads((tmp_path / "variants.json").read_text())["summary"] == json.loads(json.dumps(out["summary"]))
    assert combo in (tmp_path / "variants.md").read_text()


def test_merge_joins_per_seed_files_and_needs_the_combined_row(tmp_path):
    """One process per seed, then the combined row: `--merge` joins them into the table a single run would give."""
    variants = load_recipe("cifar100_resnet8/variants.py")
    val = {"paper": 0.60, "l2 keys": 0.62, "relative sigma": 0.63}
    test = {"paper": 0.6, "l2 keys": 0.61, "relative sigma": 0.62}
    files = []
    for i in range(2):
        seed = dict(_seed(val, test), run=f"run{i}", seed=i)
        files.append(tmp_path / f"atoms{i}.json")
        files[-1].write_text(json.dumps({"seeds": [seed]}))
    with pytest.raises(SystemExit, match="relative sigma\\+l2 keys"):  # both beat paper on every seed: combined row needed
        variants.main(["--merge", *map(str, files), "--output-dir", str(tmp_path / "out")])
    combo = "relative sigma+l2 keys"  # winners in the order of ATOMS
    extra = tmp_path / "combined.json"
    extra.write_text(json.dumps({"seeds": [dict(_seed({combo: 0.65}, {combo: 0.7}), run=f"run{i}", seed=i) for i in range(2)]}))
    out = variants.main(["--merge", *map(str, files), str(extra), "--output-dir", str(tmp_path / "out")])
    assert [r["variant"] for r in out["summary"]] == ["paper", "relative sigma", "l2 keys", variants.COMBINED, variants.SELECTED]
    assert out["validation_winners"] == ["relative sigma", "l2 keys"]
    assert [s["variants"][variants.SELECTED]["chose"] for s in out["seeds"]] == [variants.COMBINED] * 2
