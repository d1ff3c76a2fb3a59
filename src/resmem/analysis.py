"""Compatibility module: records an evaluation on the model, and re-exports the analysis helpers.

Each job lives in its own module: the numbers (TPR / FPR / Gain, per-class gain, sensitivity curves)
in `resmem.scoring`, evaluation in `resmem.evaluation` (`resmem.evaluate`), plots in `resmem.plots`,
report files in `resmem.reports`. `record_evaluation` stays here.
"""

from __future__ import annotations

from .plots import AXIS_LABELS, PLOTS_INSTALL_HINT, plot_per_class_gain, plot_sensitivity
from .reports import save_eval_report, save_tune_report, write_json
from .scoring import AXES, per_class_gain, sensitivity


# ------------------------------------------------------------------ recording on the model
def record_evaluation(model, metrics: dict, dataset=None, split: str | None = None, source: str = "evaluate") -> dict:
    """Store an evaluation on `model.config.last_evaluation` (saved with the config, shown in the model card).

    The hyperparameters in effect are stored with the numbers, so a card never pairs numbers with
    other settings than the ones they were measured with.
    """
    from .model_card import describe_dataset

    record = {
        key: metrics[key]
        for key in (
            "base_accuracy", "resmem_accuracy", "tpr", "fpr", "gain", "num_examples",
            # causal LMs: what an "example" is, and the perplexities of each mode
            "unit", "base_ppl", "ppl", "distribution", "ppl_clamp", "ppl_mixture", "mixture_lambda",
        )
        if key in metrics
    }
    record.update(
        k=model.config.k,
        sigma=model.config.sigma,
        temperature=model.config.residual_temperature,
        source=source,
        split=split,
        dataset=describe_dataset(dataset) if dataset is not None else None,
    )
    model.config.last_evaluation = record
    return record


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
