"""The paper's analysis (sec. 4.2, Figure 5): TPR / FPR / Gain, per-class gain, sensitivity plots.

Plots need matplotlib (`pip install 'resmem-hf[plots]'`); it is imported lazily with the Agg
backend, so nothing here opens a window or needs a display.
"""

from __future__ import annotations

import json
import os

import torch

from .evaluation import decompose, predict

AXES = ("k", "sigma", "temperature")
AXIS_LABELS = {"k": "k (neighbours)", "sigma": "sigma (locality)", "temperature": "T (temperature)"}
PLOTS_INSTALL_HINT = "pip install 'resmem-hf[plots]' (matplotlib)"


from .records import record_evaluation  # noqa: E402  (moved to resmem.records; kept importable here)


def evaluate_model(
    model,
    dataset,
    batch_size: int = 256,
    split: str | None = None,
    record: bool = True,
    **data_kwargs,
) -> dict:
    """Accuracy of base and ResMem, TPR / FPR / Gain and per-class gain on a dataset.

    Args:
        model: a [`ResMemForImageClassification`] with a memory, used with its current config.
        dataset: as for [`resmem.evaluation.predict`]; `data_kwargs` are passed on to it.
        record: store the numbers as the model's latest evaluation (model card).
    Returns:
        `decompose(...)` plus `"per_class"` (see [`per_class_gain`]) and the hyperparameters.
    """
    preds = predict(model, dataset, batch_size=batch_size, **data_kwargs)
    result = decompose(preds.base, preds.resmem, preds.labels)
    result.update(k=model.config.k, sigma=model.config.sigma, temperature=model.config.residual_temperature)
    result["per_class"] = per_class_gain(
        preds.base, preds.resmem, preds.labels, model.base.config.num_labels, getattr(model.config, "id2label", None)
    )
    if record:
        record_evaluation(model, result, dataset=dataset, split=split, source="evaluate")
    return result


# ------------------------------------------------------------------ numbers
def per_class_gain(base_pred, resmem_pred, labels, num_labels: int, id2label: dict | None = None) -> list[dict]:
    """TPR / FPR / Gain within each true class (rates are shares of that class's examples).

    Args:
        base_pred, resmem_pred, labels: `(N,)` class ids.
    Returns:
        one dict per class `{"label", "name", "count", "base_accuracy", "resmem_accuracy", "tpr", "fpr", "gain"}`
        (rates are `None` for classes with no example).
    """
    base_pred, resmem_pred, labels = (torch.as_tensor(t).reshape(-1).long().cpu() for t in (base_pred, resmem_pred, labels))
    base_ok, resmem_ok = base_pred == labels, resmem_pred == labels  # (N,)
    count = torch.bincount(labels, minlength=num_labels).double()  # (C,)

    def per_class(mask):
        return torch.bincount(labels[mask], minlength=num_labels).double()  # (C,)

    base_acc, resmem_acc = per_class(base_ok), per_class(resmem_ok)
    tpr, fpr = per_class(~base_ok & resmem_ok), per_class(base_ok & ~resmem_ok)
    rows = []
    for c in range(num_labels):
        n = int(count[c].item())
        rate = (lambda x: x[c].item() / n) if n else (lambda x: None)  # noqa: E731
        name = (id2label or {}).get(c, (id2label or {}).get(str(c), str(c)))
        row = {"label": c, "name": name, "count": n}
        row.update(base_accuracy=rate(base_acc), resmem_accuracy=rate(resmem_acc), tpr=rate(tpr), fpr=rate(fpr))
        row["gain"] = None if not n else row["tpr"] - row["fpr"]
        rows.append(row)
    return rows


def sensitivity(result) -> dict[str, list[dict]]:
    """Paper Figure 5: accuracy along each axis of a tuning grid with the other two at the best values.

    Args:
        result: a [`resmem.tuning.TuneResult`] (or its `to_dict()`).
    Returns:
        `{"k": [{"k": ..., "accuracy": ..., "tpr": ..., "fpr": ..., "gain": ...}, ...], "sigma": [...], "temperature": [...]}`.
    """
    data = result.to_dict() if hasattr(result, "to_dict") else result
    best = data["best"]
    curves = {}
    for axis in AXES:
        others = [a for a in AXES if a != axis]
        rows = [r for r in data["table"] if all(r[a] == best[a] for a in others)]
        curves[axis] = [
            {axis: r[axis], "accuracy": r["accuracy"], "tpr": r["tpr"], "fpr": r["fpr"], "gain": r["gain"]}
            for r in sorted(rows, key=lambda r: r[axis])
        ]
    return curves


# ------------------------------------------------------------------ plots
def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f"Plots need matplotlib, which is not installed: {PLOTS_INSTALL_HINT}.") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_sensitivity(result, path: str, title: str | None = None) -> str:
    """One PNG with a panel per varied axis: accuracy vs k, vs sigma, vs T (others at their best), base accuracy dashed."""
    plt = _pyplot()
    data = result.to_dict() if hasattr(result, "to_dict") else result
    curves = sensitivity(data)
    # Axes the grid did not vary (e.g. T of a causal-LM memory, fixed at build time) get no panel.
    varied = [a for a in AXES if len({r[a] for r in data["table"]}) > 1] or list(AXES)
    fig, axes = plt.subplots(1, len(varied), figsize=(4 * len(varied), 3.6), constrained_layout=True, squeeze=False)
    axes = axes[0]
    for ax, axis in zip(axes, varied):
        xs = [p[axis] for p in curves[axis]]
        ax.plot(xs, [100 * p["accuracy"] for p in curves[axis]], "o-", label="ResMem")
        ax.axhline(100 * data["base_accuracy"], color="gray", linestyle="--", label="base")
        ax.axvline(data["best"][axis], color="tab:red", alpha=0.3)
        fixed = ", ".join(f"{a}={data['best'][a]:g}" for a in AXES if a != axis)
        ax.set_xlabel(AXIS_LABELS[axis])
        ax.set_ylabel("accuracy (%)")
        ax.set_title(fixed, fontsize=9)
        if axis == "sigma" and len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title or f"ResMem sensitivity ({data['objective']}, {data['num_examples']} validation examples)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_class_gain(per_class: list[dict], path: str, title: str | None = None) -> str:
    """Bar chart of TPR (up) and FPR (down) per class, with the gain marked."""
    plt = _pyplot()
    rows = [r for r in per_class if r["count"]]
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows) + 2), 3.6), constrained_layout=True)
    ax.bar(xs, [100 * r["tpr"] for r in rows], color="tab:green", label="TPR (fixed by ResMem)")
    ax.bar(xs, [-100 * r["fpr"] for r in rows], color="tab:red", label="FPR (broken by ResMem)")
    ax.plot(xs, [100 * r["gain"] for r in rows], "k.", label="gain")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(r["name"]) for r in rows], rotation=90 if len(rows) > 12 else 0, fontsize=7)
    ax.set_ylabel("% of the class's examples")
    ax.legend(fontsize=8)
    ax.set_title(title or "ResMem per-class gain")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(data: dict, path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
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
        written["plots"].append(plot_sensitivity(data, os.path.join(output_dir, "tune_sensitivity.png"), title=title))
        if per_class is not None:
            written["plots"].append(plot_per_class_gain(per_class, os.path.join(output_dir, "tune_per_class_gain.png")))
    return written


def save_eval_report(evaluation: dict, output_dir: str, plots: bool = True) -> dict:
    """Write `eval.json` and `eval_per_class_gain.png` for an [`evaluate_model`] result."""
    os.makedirs(output_dir, exist_ok=True)
    written = {"json": write_json(evaluation, os.path.join(output_dir, "eval.json")), "plots": []}
    if plots:
        written["plots"].append(plot_per_class_gain(evaluation["per_class"], os.path.join(output_dir, "eval_per_class_gain.png")))
    return written


__all__ = [
    "evaluate_model",
    "per_class_gain",
    "plot_per_class_gain",
    "plot_sensitivity",
    "record_evaluation",
    "save_eval_report",
    "save_tune_report",
    "sensitivity",
]
