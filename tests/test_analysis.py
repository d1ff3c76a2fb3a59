"""Analysis: per-class gain by hand, Figure-5 sensitivity curves from a table, PNG plots (scoring.py / plots.py)."""

from __future__ import annotations

import pytest
import torch

from resmem import analysis, plots, reports, scoring
from resmem.plots import plot_per_class_gain, plot_sensitivity
from resmem.scoring import per_class_gain, select_best, sensitivity

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_per_class_gain_by_hand():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    base = torch.tensor([0, 1, 1, 1, 0, 2])  # class 0: 1/3 right, class 1: 1/2, class 2: 1/1
    resmem = torch.tensor([0, 0, 1, 0, 0, 2])  # class 0: fixes ex 1; class 1: breaks ex 3
    rows = per_class_gain(base, resmem, labels, num_labels=4, id2label={0: "cat", 1: "dog", 2: "eel", 3: "fox"})
    assert [r["name"] for r in rows] == ["cat", "dog", "eel", "fox"]
    cat, dog, eel, fox = rows
    assert cat["count"] == 3 and cat["tpr"] == pytest.approx(1 / 3) and cat["fpr"] == 0 and cat["gain"] == pytest.approx(1 / 3)
    assert cat["base_accuracy"] == pytest.approx(1 / 3) and cat["resmem_accuracy"] == pytest.approx(2 / 3)
    assert dog["tpr"] == 0 and dog["fpr"] == 0.5 and dog["gain"] == -0.5
    assert eel["gain"] == 0 and eel["resmem_accuracy"] == 1
    assert fox["count"] == 0 and fox["gain"] is None and fox["tpr"] is None


def _table():
    rows = []
    for k in (1, 5, 10):
        for sigma in (0.1, 1.0):
            for temperature in (0.5, 1.0, 2.0):
                acc = 0.5 + 0.01 * k - abs(sigma - 1.0) * 0.1 - abs(temperature - 1.0) * 0.05
                rows.append(dict(k=k, sigma=sigma, temperature=temperature, accuracy=acc, base_accuracy=0.5,
                                 tpr=acc - 0.45, fpr=0.05 if k == 10 else 0.01, gain=acc - 0.5, feasible=k != 10))
    return rows


def test_sensitivity_holds_the_other_axes_at_the_best():
    rows = _table()
    best = select_best(rows, "accuracy", 0.05)
    assert (best["k"], best["sigma"], best["temperature"]) == (10, 1.0, 1.0)
    data = {"table": rows, "best": best, "objective": "accuracy", "num_examples": 100, "base_accuracy": 0.5}
    curves = sensitivity(data)
    assert [p["k"] for p in curves["k"]] == [1, 5, 10]
    assert [p["temperature"] for p in curves["temperature"]] == [0.5, 1.0, 2.0]
    assert curves["sigma"][0]["accuracy"] == pytest.approx(0.5 + 0.1 - 0.09)
    conservative = select_best(rows, "conservative", 0.05)  # k=10 has FPR 0.05, not < 0.05
    assert conservative["k"] == 5 and (conservative["sigma"], conservative["temperature"]) == (1.0, 1.0)


def test_plots_are_png(tmp_path):
    rows = _table()
    data = {"table": rows, "best": select_best(rows, "accuracy", 0.05), "objective": "accuracy", "num_examples": 100,
            "base_accuracy": 0.5}
    plot_sensitivity(data, str(tmp_path / "s.png"))
    per_class = per_class_gain(torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([1, 1]), 3)
    plot_per_class_gain(per_class, str(tmp_path / "c.png"))
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC


def test_analysis_keeps_the_old_names():
    """resmem.analysis is a thin compatibility module: the moved names are the new modules' objects."""
    assert analysis.per_class_gain is scoring.per_class_gain and analysis.sensitivity is scoring.sensitivity
    assert analysis.plot_sensitivity is plots.plot_sensitivity and analysis.plot_per_class_gain is plots.plot_per_class_gain
    assert analysis.save_tune_report is reports.save_tune_report and analysis.save_eval_report is reports.save_eval_report
    assert callable(analysis.record_evaluation) and callable(analysis.evaluate_model)
