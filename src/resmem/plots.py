"""Plots of the paper's analysis: sensitivity curves (Figure 5) and per-class gain, as PNG files.

They need matplotlib (`pip install 'resmem-hf[plots]'`); it is imported lazily with the Agg backend,
so nothing here opens a window or needs a display. The numbers come from `resmem.scoring`.
"""

from __future__ import annotations

import os
import tempfile

from .scoring import AXES, sensitivity

AXIS_LABELS = {"k": "k (neighbours)", "sigma": "sigma (locality)", "temperature": "T (temperature)"}
PLOTS_INSTALL_HINT = "pip install 'resmem-hf[plots]' (matplotlib)"


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f"Plots need matplotlib, which is not installed: {PLOTS_INSTALL_HINT}.") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: str) -> str:
    """Save to a temporary name beside `path`, then rename onto it (never half a PNG)."""
    plt = _pyplot()
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp.png", dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


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
    return _save_png(fig, path)


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
    return _save_png(fig, path)


__all__ = ["AXIS_LABELS", "PLOTS_INSTALL_HINT", "plot_per_class_gain", "plot_sensitivity"]
