"""The one metrics module: accuracy, TPR / FPR / Gain, perplexity, per-class gain, best-row selection, tables.

Paper sec. 4.2 (Yang et al.): on an evaluation set of N examples (images, or next-token positions of
a causal LM), TPR is the share of the N the base model gets wrong and ResMem right, FPR the share
the base model gets right and ResMem wrong, and `gain = tpr - fpr = resmem_accuracy - base_accuracy`.

Everything here is computed from five counts ([`rates_from_counts`]); the task-specific code only
produces the counts (from predictions, from a tuning grid, from an LM's running sums). Selection of a
setting ([`select_best`], [`best_mixture_lambda`]) belongs to tuning on validation data only: an
evaluation reports the configured setting and never calls them.
"""

from __future__ import annotations

import math
import warnings

import torch

RATE_KEYS = ("base_accuracy", "resmem_accuracy", "tpr", "fpr", "gain")
AXES = ("k", "sigma", "temperature")


# ------------------------------------------------------------------ the core: rates from counts
def rates_from_counts(num_examples: int, base_correct: int, resmem_correct: int, fixed: int, broken: int) -> dict:
    """Accuracies and the paper's TPR / FPR / Gain from counts over `num_examples` examples.

    Args:
        num_examples: N, the number of evaluated examples (or token positions).
        base_correct: examples the base model predicts right.
        resmem_correct: examples ResMem predicts right.
        fixed: examples the base model gets wrong and ResMem right (the TPR count).
        broken: examples the base model gets right and ResMem wrong (the FPR count).
    Returns:
        `{"base_accuracy", "resmem_accuracy", "tpr", "fpr", "gain", "num_examples"}`, every rate a share of
        N; `gain = (fixed - broken) / N`, equal to `resmem_accuracy - base_accuracy` exactly in counts.
    """
    n = int(num_examples)
    if n <= 0:
        raise ValueError("Cannot evaluate on zero examples: pass a non-empty evaluation set.")
    counts = [int(c) for c in (base_correct, resmem_correct, fixed, broken)]
    base_correct, resmem_correct, fixed, broken = counts
    if min(counts) < 0 or max(counts) > n or resmem_correct - base_correct != fixed - broken:
        raise ValueError(
            f"Inconsistent counts for {n} examples: base_correct={base_correct}, resmem_correct={resmem_correct}, "
            f"fixed={fixed}, broken={broken} (need 0 <= each <= N and resmem_correct - base_correct == fixed - broken)."
        )
    return {
        "base_accuracy": base_correct / n,
        "resmem_accuracy": resmem_correct / n,
        "tpr": fixed / n,
        "fpr": broken / n,
        "gain": (fixed - broken) / n,
        "num_examples": n,
    }


def correctness_counts(base_ok: torch.Tensor, resmem_ok: torch.Tensor):
    """The counts of [`rates_from_counts`] from whether each prediction is right.

    Args:
        base_ok, resmem_ok: `(..., N)` bool tensors, broadcastable against each other (e.g. `(1, 1, 1, N)` for
            the base and `(T, S, K, N)` for a tuning grid).
    Returns:
        `(num_examples, base_correct, resmem_correct, fixed, broken)`: Python ints for 1-D inputs, else `(...)`
        int64 tensors of counts over the last axis (`num_examples` is always an int).
    """
    counts = (base_ok.sum(-1), resmem_ok.sum(-1), (~base_ok & resmem_ok).sum(-1), (base_ok & ~resmem_ok).sum(-1))
    if base_ok.dim() == resmem_ok.dim() == 1:
        counts = tuple(int(c) for c in counts)
    return (torch.broadcast_shapes(base_ok.shape, resmem_ok.shape)[-1], *counts)


def prediction_counts(base_pred, resmem_pred, labels) -> tuple[int, int, int, int, int]:
    """`(num_examples, base_correct, resmem_correct, fixed, broken)` from `(N,)` class ids (tensors or lists)."""
    base_pred, resmem_pred, labels = (torch.as_tensor(t).reshape(-1) for t in (base_pred, resmem_pred, labels))
    if not (base_pred.shape == resmem_pred.shape == labels.shape):
        raise ValueError(
            f"base_pred, resmem_pred and labels must have the same length, got {base_pred.numel()}, "
            f"{resmem_pred.numel()} and {labels.numel()}."
        )
    resmem_pred, labels = resmem_pred.to(base_pred.device), labels.to(base_pred.device)
    return correctness_counts(base_pred == labels, resmem_pred == labels)  # (N,) bool each


def decompose(base_pred, resmem_pred, labels) -> dict:
    """Accuracies and the paper's TPR / FPR / Gain decomposition (sec. 4.2) from predictions.

    Args:
        base_pred: `(N,)` class ids predicted by the base model.
        resmem_pred: `(N,)` class ids predicted by ResMem.
        labels: `(N,)` true class ids.
    Returns:
        `{"base_accuracy", "resmem_accuracy", "tpr", "fpr", "gain", "num_examples"}` (see [`rates_from_counts`]).

    Example:

    ```python
    >>> import torch
    >>> from resmem.scoring import decompose
    >>> d = decompose(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 0]))
    >>> d["tpr"], d["fpr"], d["gain"]
    (0.25, 0.25, 0.0)
    ```
    """
    return rates_from_counts(*prediction_counts(base_pred, resmem_pred, labels))


def perplexity(total_nll: float, num_tokens: int) -> float:
    """`exp(total_nll / num_tokens)`: perplexity from the summed negative log-likelihood (natural log)."""
    if num_tokens <= 0:
        raise ValueError("Cannot compute a perplexity over zero tokens: pass at least one scored token.")
    return math.exp(total_nll / num_tokens)


def per_class_gain(base_pred, resmem_pred, labels, num_labels: int, id2label: dict | None = None) -> list[dict]:
    """TPR / FPR / Gain within each true class (rates are shares of that class's examples).

    Args:
        base_pred, resmem_pred, labels: `(N,)` class ids.
        num_labels: C, the number of classes (classes with no example get a row with `None` rates).
    Returns:
        one dict per class `{"label", "name", "count", "base_accuracy", "resmem_accuracy", "tpr", "fpr", "gain"}`
        (rates are `None` for classes with no example).
    """
    base_pred, resmem_pred, labels = (torch.as_tensor(t).reshape(-1).long().cpu() for t in (base_pred, resmem_pred, labels))
    base_ok, resmem_ok = base_pred == labels, resmem_pred == labels  # (N,)

    def per_class(mask):  # (N,) bool -> (C,) counts of the examples of each class where mask holds
        return torch.bincount(labels[mask], minlength=num_labels).tolist()

    counts = zip(
        per_class(torch.ones_like(base_ok)), per_class(base_ok), per_class(resmem_ok),
        per_class(~base_ok & resmem_ok), per_class(base_ok & ~resmem_ok),
    )
    names = id2label or {}
    rows = []
    for c, class_counts in enumerate(counts):
        if c >= num_labels:  # bincount grows past num_labels for out-of-range labels; report the C classes
            break
        row = {"label": c, "name": names.get(c, names.get(str(c), str(c))), "count": class_counts[0]}
        if class_counts[0]:
            rates = rates_from_counts(*class_counts)
            row.update({key: rates[key] for key in RATE_KEYS})
        else:
            row.update(dict.fromkeys(RATE_KEYS))
        rows.append(row)
    return rows


# ------------------------------------------------------------------ calibration
CALIBRATION_BINS = 15


def calibration_bin_sums(confidence: torch.Tensor, correct: torch.Tensor, num_bins: int = CALIBRATION_BINS) -> torch.Tensor:
    """Per-bin `sum(correct - confidence)` over equal-width confidence bins `((b-1)/M, b/M]` (0 goes to bin 1).

    The ECE is `sum_b |n_b / N * (acc_b - conf_b)| = sum_b |sum_{i in b} (correct_i - conf_i)| / N`, so these
    sums can be accumulated over chunks of examples (and over a grid of settings at once) before the abs.

    Args:
        confidence: `(..., N)` top-label probabilities in [0, 1]; correct: `(..., N)` bool, same shape.
    Returns:
        `(..., num_bins)` float64 sums.
    """
    conf = confidence.double()
    bins = (torch.ceil(conf * num_bins).long() - 1).clamp_(0, num_bins - 1)  # (..., N)
    sums = torch.zeros(*conf.shape[:-1], num_bins, dtype=torch.float64, device=conf.device)
    return sums.scatter_add_(-1, bins, correct.double() - conf)


def calibration(log_probs: torch.Tensor, labels: torch.Tensor, num_bins: int = CALIBRATION_BINS) -> dict:
    """Expected calibration error (top label, `num_bins` equal-width bins) and mean negative log-likelihood.

    Args:
        log_probs: `(N, C)` log-probabilities (each row's logsumexp 0, e.g. ResMem's `logits`, or
            `log_softmax(base_logits)`); labels: `(N,)` true class ids.
    Returns:
        `{"ece": float, "nll": float}`: `ece = sum_b n_b / N * |acc_b - conf_b|` with `conf` the largest
        probability and `acc` whether its class is the label; `nll = -mean(log p(y))` (natural log).
    """
    log_probs = log_probs.double()
    labels = torch.as_tensor(labels).reshape(-1).long().to(log_probs.device)
    if log_probs.dim() != 2 or log_probs.shape[0] != labels.shape[0] or labels.numel() == 0:
        raise ValueError(f"calibration needs (N, C) log-probabilities and (N,) labels, N > 0; got {tuple(log_probs.shape)} and {tuple(labels.shape)}.")
    top, pred = log_probs.max(dim=-1)  # (N,) each
    return calibration_from(top.exp(), pred == labels, log_probs.gather(1, labels[:, None]).squeeze(1), num_bins)


def calibration_from(confidence, correct, label_log_prob, num_bins: int = CALIBRATION_BINS) -> dict:
    """[`calibration`] from per-example values: `(N,)` top-label probability, whether the top label is right,
    and the log-probability of the true label (what `resmem.evaluation.predict` keeps instead of `(N, C)`)."""
    confidence, label_log_prob = torch.as_tensor(confidence).double(), torch.as_tensor(label_log_prob).double()
    n = confidence.numel()
    gap = calibration_bin_sums(confidence, torch.as_tensor(correct).to(confidence.device), num_bins)  # (bins,)
    return {"ece": float(gap.abs().sum() / n), "nll": float(-label_log_prob.sum() / n)}


# ------------------------------------------------------------------ selection (tuning only)
def select_best(rows: list[dict], objective: str, max_fpr: float) -> dict:
    """The best row of a tuning table (validation data only: an evaluation never selects).

    `"mse"` (regressors): lowest `"mse"` (rows of `resmem.regression.tune_regression`).
    `"accuracy"`: highest accuracy. `"conservative"`: highest TPR among rows with FPR < `max_fpr`
    (paper sec. 4.2); if none qualifies, the lowest FPR (with a warning).
    Ties go to the higher accuracy, then the lower FPR, then the earliest row in grid order.

    Args:
        rows: dicts with `"accuracy"` (ResMem's), `"tpr"` and `"fpr"`.
    Returns:
        a copy of the chosen row.
    """
    if objective == "mse":  # regression: the lowest validation MSE; ties go to the earliest row in grid order
        best = dict(min(rows, key=lambda r: r["mse"]))
        if best["mse"] > best["base_mse"]:
            warnings.warn(
                f"Every setting of the grid raises the MSE on this data (best {best['mse']:.6g} vs base "
                f"{best['base_mse']:.6g}): ResMem would make this model worse here. Add smaller k / sigma values to the "
                "grid (sigma=\"auto\" searches multiples of model.sigma_scale()), or do not use the memory for this data.",
                stacklevel=3,
            )
        return best
    if objective == "accuracy":
        key = lambda r: (r["accuracy"], -r["fpr"])  # noqa: E731
        candidates = rows
    else:
        candidates = [r for r in rows if r["fpr"] < max_fpr]
        key = lambda r: (r["tpr"], r["accuracy"], -r["fpr"])  # noqa: E731
        if not candidates:
            warnings.warn(
                f"No combination of the grid keeps FPR < {max_fpr}; picking the lowest FPR. Add smaller k / sigma "
                "values to the grid or raise max_fpr.",
                stacklevel=3,
            )
            candidates = rows
            key = lambda r: (-r["fpr"], r["tpr"])  # noqa: E731
    best_value = max(key(r) for r in candidates)
    best = dict(next(r for r in candidates if key(r) == best_value))
    if best.get("gain") is not None and best["gain"] < 0:
        warnings.warn(
            f"Every setting of the grid lowers accuracy on this data (best gain {100 * best['gain']:+.2f} points): "
            "ResMem would make this model worse here. Add smaller k / sigma values to the grid (sigma=\"auto\" "
            "searches multiples of model.sigma_scale()), or do not use the memory for this data.",
            stacklevel=4,  # select_best <- tune <- model.tune <- the user's call
        )
    return best


# ------------------------------------------------------------------ regression (paper Remark 3.1)
REGRESSION_METRIC_KEYS = ("base_mse", "mse", "base_rmse", "rmse", "base_mae", "mae", "base_r2", "r2")


def regression_counts_grid(base_pred: torch.Tensor, resmem_pred: torch.Tensor, targets: torch.Tensor):
    """The sums every regression metric is computed from, for one prediction or a whole tuning grid at once.

    Args:
        base_pred: `(N, C)` base model outputs; targets: `(N, C)` true values.
        resmem_pred: `(..., N, C)` ResMem predictions (`(N, C)`, or `(S, K, N, C)` for a grid).
    Returns:
        `(num_examples, num_values, base_sse, base_sae, sse, sae, sst)`: N, N * C, the base model's sums of squared
        and absolute errors (floats), ResMem's (`(...)` float64 tensors, Python floats for `(N, C)` input), and
        `sst = sum (y - column mean)^2` (float). Sums in float64.
    """
    targets = torch.as_tensor(targets).double()
    if targets.dim() == 1:
        targets = targets[:, None]
    base = torch.as_tensor(base_pred).double().reshape(targets.shape)
    pred = torch.as_tensor(resmem_pred).to(targets.device).double()
    pred = pred.reshape(*pred.shape[:-2], *targets.shape) if pred.dim() >= 2 else pred.reshape(targets.shape)
    if pred.shape[-2:] != targets.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and targets {tuple(targets.shape)} do not match.")
    base_error, error = base.to(targets.device) - targets, pred - targets  # (N, C), (..., N, C)
    sse, sae = error.square().sum(dim=(-2, -1)), error.abs().sum(dim=(-2, -1))  # (...)
    if sse.dim() == 0:
        sse, sae = float(sse), float(sae)
    sst = float((targets - targets.mean(dim=0, keepdim=True)).square().sum())
    return targets.shape[0], targets.numel(), float(base_error.square().sum()), float(base_error.abs().sum()), sse, sae, sst


def regression_metrics_from_sums(num_examples: int, num_values: int, base_sse: float, base_sae: float,
                                 sse: float, sae: float, sst: float) -> dict:
    """MSE, RMSE, MAE and R^2 of the base model and of ResMem from the sums of [`regression_counts_grid`].

    MSE and MAE are means over all N * C values; R^2 = 1 - SSE / SST with SST around each output's mean (for
    C > 1 this is scikit-learn's `r2_score(..., multioutput="variance_weighted")`; for C = 1 its plain R^2;
    `nan` when the targets are constant).
    """
    n, m = int(num_examples), int(num_values)
    if n <= 0:
        raise ValueError("Cannot evaluate on zero examples: pass a non-empty evaluation set.")
    out = {}
    for prefix, sq, ab in (("base_", base_sse, base_sae), ("", float(sse), float(sae))):
        out[prefix + "mse"] = sq / m
        out[prefix + "rmse"] = math.sqrt(sq / m)
        out[prefix + "mae"] = ab / m
        out[prefix + "r2"] = 1.0 - sq / sst if sst > 0 else float("nan")
    out["num_examples"] = n
    return out


def regression_metrics(base_pred, resmem_pred, targets) -> dict:
    """`{"base_mse", "mse", "base_rmse", "rmse", "base_mae", "mae", "base_r2", "r2", "num_examples"}` of `(N, C)`
    (or `(N,)`) predictions against targets; see [`regression_metrics_from_sums`]."""
    return regression_metrics_from_sums(*regression_counts_grid(base_pred, resmem_pred, targets))


def best_mixture_lambda(row: dict) -> float:
    """The mixture weight with the lowest perplexity in one row's `ppl_mixture` `{str(lam): ppl}` (tuning only)."""
    return float(min(row["ppl_mixture"].items(), key=lambda item: item[1])[0])


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
        others = [a for a in AXES if a != axis] + [a for a in ("label_smoothing",) if a in best]  # logit space: 4th axis
        rows = [r for r in data["table"] if all(r[a] == best[a] for a in others)]
        curves[axis] = [
            {axis: r[axis], "accuracy": r["accuracy"], "tpr": r["tpr"], "fpr": r["fpr"], "gain": r["gain"]}
            for r in sorted(rows, key=lambda r: r[axis])
        ]
    return curves


# ------------------------------------------------------------------ the one table formatter
def _pct(x) -> str:
    return f"{x:.2%}"


def _signed_pct(x) -> str:
    return f"{x:+.2%}"


def _num(x) -> str:
    return f"{x:g}"


def _ppl(x) -> str:
    return f"{x:.2f}"


# key -> (header, formatter); "resmem_accuracy" also reads a tuning row's "accuracy", "num_examples" its "positions".
COLUMNS = {
    "split": ("split", str),
    "setting": ("setting", str),
    "temperature": ("T", _num),
    "k": ("k", _num),
    "sigma": ("sigma", _num),
    "num_examples": ("examples", lambda x: f"{x:,}"),
    "base_accuracy": ("DeepNet acc", _pct),  # the paper's name for the base model
    "resmem_accuracy": ("ResMem acc", _pct),
    "tpr": ("TPR", _pct),
    "fpr": ("FPR", _pct),
    "gain": ("Gain", _signed_pct),
    "base_ppl": ("base ppl", _ppl),
    "ppl": ("ResMem ppl", _ppl),
    "ppl_clamp": ("ResMem ppl (clamp)", _ppl),
    "distribution": ("distribution", str),
    "mixture_lambda": ("lambda", _num),
    # regressors (resmem.regression)
    "base_mse": ("base MSE", _num), "mse": ("ResMem MSE", _num), "base_rmse": ("base RMSE", _num),
    "rmse": ("ResMem RMSE", _num), "base_mae": ("base MAE", _num), "mae": ("ResMem MAE", _num),
    "base_r2": ("base R^2", _num), "r2": ("ResMem R^2", _num),
    "residual_space": ("space", str),
    "label_smoothing": ("eps", _num),
    "base_nll": ("base NLL", lambda x: f"{x:.4f}"),
    "nll": ("ResMem NLL", lambda x: f"{x:.4f}"),
    "base_ece": ("base ECE", _pct),
    "ece": ("ResMem ECE", _pct),
}
_ALIASES = {"resmem_accuracy": "accuracy", "num_examples": "positions"}
DEFAULT_COLUMNS = ("base_accuracy", "resmem_accuracy", "tpr", "fpr", "gain")


def _cell(row: dict, key: str) -> str:
    value = row.get(key, row.get(_ALIASES.get(key, key)))
    return "-" if value is None else COLUMNS[key][1](value)


def format_table(rows: list[dict], columns=None, title: str | None = None) -> str:
    """A markdown table of evaluation or tuning rows, one row per dict; missing values print as `-`.

    Args:
        rows: dicts of [`rates_from_counts`] / `resmem.evaluate` results or tuning rows (`"accuracy"` is read
            as `"resmem_accuracy"`, `"positions"` as `"num_examples"`).
        columns: keys of [`COLUMNS`] in order (default: the setting keys any row has, then the rates, then
            the perplexities any row has).
        title: a `### title` line above the table.
    """
    if columns is None:
        present = lambda key: any(key in r or _ALIASES.get(key) in r for r in rows)  # noqa: E731
        columns = [c for c in ("split", "setting", "temperature", "k", "sigma") if present(c)]
        columns += list(REGRESSION_METRIC_KEYS if present("mse") else DEFAULT_COLUMNS)
        columns += [c for c in ("base_ppl", "ppl", "ppl_clamp", "distribution", "mixture_lambda") if present(c)]
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise ValueError(f"Unknown table columns {unknown}; available: {sorted(COLUMNS)}.")
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(COLUMNS[c][0] for c in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    lines.extend("| " + " | ".join(_cell(r, c) for c in columns) + " |" for r in rows)
    return "\n".join(lines) + "\n"


def format_summary(result: dict) -> str:
    """One line of text for an evaluation result or a tuning table's best row (the commands' output)."""
    setting = " ".join(f"{key if key != 'temperature' else 'T'}={_num(result[key])}" for key in AXES if key in result)
    if result.get("distribution"):  # causal LMs: the distribution the perplexity is of
        setting += f" distribution={result['distribution']}"
    if "mixture_lambda" in result:  # evaluate: only in the mixture mode; tune: a tuned lambda
        setting += f" (lambda {_num(result['mixture_lambda'])})"
    unit = result.get("unit", "examples")
    n = result.get("num_examples", result.get("positions"))
    if "mse" in result:  # a regressor (resmem.regression): errors instead of accuracies
        line = (f"{setting}  MSE {_num(result['base_mse'])} -> {_num(result['mse'])}  "
                f"MAE {_num(result['base_mae'])} -> {_num(result['mae'])}  R^2 {_num(result['base_r2'])} -> {_num(result['r2'])}")
        return line if n is None else f"{line}  ({n} {unit})"
    what = "next-token accuracy" if unit == "token positions" else "accuracy"
    line = (
        f"{setting}  {what} {_pct(result['base_accuracy'])} -> {_cell(result, 'resmem_accuracy')}  "
        f"TPR {_pct(result['tpr'])}  FPR {_pct(result['fpr'])}  gain {_signed_pct(result['gain'])}"
    )
    if "ppl" in result and "base_ppl" in result:
        line += f"  perplexity {_ppl(result['base_ppl'])} -> {_ppl(result['ppl'])}"
    if n is None:
        return line
    split = f" of split {result['split']!r}" if result.get("split") else ""
    return f"{line}  ({n} {unit}{split})"


__all__ = [
    "CALIBRATION_BINS",
    "COLUMNS",
    "best_mixture_lambda",
    "calibration",
    "calibration_bin_sums",
    "calibration_from",
    "correctness_counts",
    "decompose",
    "format_summary",
    "format_table",
    "per_class_gain",
    "perplexity",
    "prediction_counts",
    "rates_from_counts",
    "regression_counts_grid",
    "regression_metrics",
    "regression_metrics_from_sums",
    "select_best",
    "sensitivity",
]
