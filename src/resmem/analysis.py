"""Compatibility module: re-exports the analysis helpers from the modules that now hold them.

Each job lives in its own module: the numbers (TPR / FPR / Gain, per-class gain, sensitivity curves)
in `resmem.scoring`, evaluation in `resmem.evaluation` (`resmem.evaluate`), plots in `resmem.plots`,
report files in `resmem.reports`, and `record_evaluation` in `resmem.records`.
"""

from __future__ import annotations

from .plots import AXIS_LABELS, PLOTS_INSTALL_HINT, plot_per_class_gain, plot_sensitivity
from .reports import save_eval_report, save_tune_report, write_json
from .records import record_evaluation  # moved to resmem.records; kept importable here
from .scoring import AXES, per_class_gain, sensitivity


def evaluate_model(model, dataset, batch_size: int = 256, split: str | None = None, record: bool = True, **data_kwargs) -> dict:
    """`resmem.evaluate(model, dataset, ...)` for an image classifier (kept for existing callers)."""
    from .evaluation import evaluate

    return evaluate(model, dataset, batch_size=batch_size, split=split, record=record, **data_kwargs)


__all__ = [
    "AXES",
    "AXIS_LABELS",
    "PLOTS_INSTALL_HINT",
    "evaluate_model",
    "per_class_gain",
    "plot_per_class_gain",
    "plot_sensitivity",
    "record_evaluation",
    "save_eval_report",
    "save_tune_report",
    "sensitivity",
    "write_json",
]
