"""Report files of `resmem tune` / `resmem eval`: the JSON results and their PNG plots in one folder.

Every file is written to a temporary name and renamed, so an interrupted run never leaves half a report.
"""

from __future__ import annotations

import os

from .atomic import write_json_atomic
from .scoring import per_class_gain, sensitivity


def write_json(data: dict, path: str) -> str:
    """`data` as JSON at `path` (written to a temporary name, then renamed); returns `path`."""
    write_json_atomic(path, data)
    return path


def save_tune_report(
    result, output_dir: str, num_labels: int | None = None, id2label: dict | None = None, plots: bool = True,
    title: str | None = None,
) -> dict:
    """Write `tune.json` (table, best, sensitivity curves, per-class gain of the best) and the PNGs.

    A causal-LM result carries no per-example predictions: it gets no per-class gain (JSON key and PNG).
    `title`: of the sensitivity plot (default: objective and validation size).
    Returns `{"json": path, "plots": [paths]}`.
    """
    os.makedirs(output_dir, exist_ok=True)
    if result.objective == "mse":  # a regressor (resmem.regression): MSE rows, no accuracy curves, no classes
        return {"json": write_json(result.to_dict(), os.path.join(output_dir, "tune.json")), "plots": []}
    data = result.to_dict()
    data["sensitivity"] = sensitivity(data)
    per_class = None
    if result.predictions is not None:
        best = result.best
        preds = result.predictions_for(best["k"], best["sigma"], best["temperature"])
        per_class = per_class_gain(result.base_predictions, preds, result.labels, num_labels, id2label)
        data["per_class"] = per_class
    written = {"json": write_json(data, os.path.join(output_dir, "tune.json")), "plots": []}
    if plots:
        from .plots import plot_per_class_gain, plot_sensitivity

        written["plots"].append(plot_sensitivity(data, os.path.join(output_dir, "tune_sensitivity.png"), title=title))
        if per_class is not None:
            written["plots"].append(plot_per_class_gain(per_class, os.path.join(output_dir, "tune_per_class_gain.png")))
    return written


def save_eval_report(evaluation: dict, output_dir: str, plots: bool = True) -> dict:
    """Write `eval.json` and, for an image classifier, `eval_per_class_gain.png`, for a `resmem.evaluate` result."""
    os.makedirs(output_dir, exist_ok=True)
    written = {"json": write_json(evaluation, os.path.join(output_dir, "eval.json")), "plots": []}
    if plots and evaluation.get("per_class") is not None:
        from .plots import plot_per_class_gain

        written["plots"].append(plot_per_class_gain(evaluation["per_class"], os.path.join(output_dir, "eval_per_class_gain.png")))
    return written


__all__ = ["save_eval_report", "save_tune_report", "write_json"]
