"""ResMem for regressors (paper Remark 3.1): residuals `y - f(x)`, prediction `f(x) + sum_i w_i r_i`.

A base model whose config says `problem_type == "regression"` (transformers' convention for
`*ForImageClassification` / `*ForSequenceClassification` heads with `num_labels` real outputs; as in
transformers' loss, `problem_type=None` with `num_labels == 1` counts as regression too) predicts
`f(x)` `(C,)` with `C = num_labels`. ResMem then stores, per training example, its key
`z_i = phi(x_i)`, the base output `f(x_i)` and the float target `y_i` `(C,)`, and predicts

    r_i      = y_i - f(x_i)                                   # (C,), no softmax, no temperature
    w_i      = softmax(-d_i / sigma) over the k nearest keys   # as for classifiers
    pred(x)  = f(x) + sum_i w_i r_i                            # the output's `logits`

This module holds everything regression-specific; the classifier code calls it from small branches
(`modeling_image.py`, `tuning.py`, `evaluation.py`, `data.py`). `T` (`config.residual_temperature`) is
unused for regression; the metrics (MSE, RMSE, MAE, R^2) are computed in `resmem.scoring`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .memory import MemoryFileError, MemorySchema, EditableMemory, _locked
from .residuals import neighbour_weights, weighted_residual
from .scoring import regression_counts_grid, regression_metrics_from_sums, select_best
from .tuning import TableRows
from .validation import ADD_FIX, FILE_FIX, ADD_SOURCE, _Checker, _tensor

REGRESSION = "regression"
REGRESSION_OBJECTIVES = ("mse",)

REGRESSION_SCHEMA = MemorySchema(
    name="regression",
    format="resmem-regression-memory",
    format_version="1",
    fields=(("keys", torch.float32, 2), ("base_logits", torch.float32, 2), ("labels", torch.float32, 2), ("example_ids", torch.long, 1)),
    kind="a ResMem regression memory file",
)


def is_regression(base_config) -> bool:
    """Whether a base model's config makes it a regressor: `problem_type == "regression"`, or (as transformers'
    `ForSequenceClassificationLoss` infers it) no `problem_type` and `num_labels == 1`."""
    problem_type = getattr(base_config, "problem_type", None)
    return problem_type == REGRESSION or (problem_type is None and getattr(base_config, "num_labels", None) == 1)


# ------------------------------------------------------------------ checks
def check_regression_targets(labels: torch.Tensor, num_labels: int, label_column: str = "label", role: str = "Labels") -> None:
    """Targets of a batch must be `(B, num_labels)` floats, all finite (read by `image_batches(float_labels=True)`)."""
    if labels.dim() != 2 or labels.shape[1] != num_labels:
        raise ValueError(
            f"{role} of a regression model must give {num_labels} number(s) per example (the model's num_labels); column "
            f"{label_column!r} gives shape {tuple(labels.shape[1:])}. Store one float per example for num_labels=1, or a "
            f"list of {num_labels} floats."
        )
    if not bool(torch.isfinite(labels).all()):
        bad = (~torch.isfinite(labels)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{role} in column {label_column!r} contain NaN or inf (rows {bad} of a batch); drop or fix those rows.")


def check_regression_entries(tensors, num_outputs: int | None = None, source: str = ADD_SOURCE, *, dim: int | None = None,
                             error: type[Exception] = ValueError, fix: str = ADD_FIX) -> dict[str, torch.Tensor]:
    """Validate regression memory entries: `keys (N, D)`, `base_logits (N, C)`, `labels (N, C)` finite floats,
    `example_ids (N,)` unique integers (as `resmem.validation.check_classifier_entries` does for classifiers)."""
    check = _Checker(source, error, fix)
    t = {name: _tensor(tensors[name]) for name in ("keys", "base_logits", "labels", "example_ids")}
    keys, outputs, targets, ids = t["keys"], t["base_logits"], t["labels"], t["example_ids"]
    check.rank(keys, "keys", 2, "(N, D)")
    check.rank(outputs, "base_logits", 2, "(N, C)")
    check.rank(targets, "labels", 2, "(N, C) float targets")
    check.rank(ids, "example_ids", 1, "(N,)")
    check.rows(t, keys.shape[0])
    if dim is not None and keys.shape[1] != dim:
        check.fail(f"keys have dimension {keys.shape[1]} but the memory's have {dim}; embed them with the same model and layer")
    width = outputs.shape[1] if num_outputs is None else int(num_outputs)
    if outputs.shape[1] != width or targets.shape[1] != width:
        check.fail(f"base_logits and labels must both have {width} columns (the model's outputs), got "
                   f"{outputs.shape[1]} and {targets.shape[1]}")
    for name, value in (("keys", keys), ("base_logits", outputs), ("labels", targets)):
        check.floating(value, name)
        check.finite(value, name)
    check.integer(ids, "example_ids", "source example ids")
    check.unique(ids, "example_ids")
    return t


# ------------------------------------------------------------------ the memory
class RegressionResiduals:
    """The regression payload: base outputs `f(x_i)` `(N, C)` and float targets `y_i` `(N, C)`; residual `y_i - f(x_i)`."""

    schema = REGRESSION_SCHEMA

    def _check_content(self, tensors: dict, source: str, error: type[Exception], joining: bool) -> None:
        fix = FILE_FIX if issubclass(error, MemoryFileError) else ADD_FIX
        width = self._widths().get("base_logits") if joining else None
        check_regression_entries(tensors, width, source, dim=self.dim if joining else None, error=error, fix=fix)

    @classmethod
    def _check_file_content(cls, tensors: dict, metadata: dict, source: str) -> None:
        check_regression_entries(tensors, None, source, error=MemoryFileError, fix=FILE_FIX)

    def neighbour_residuals(self, ids: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """Residuals `y_i - f(x_i)` of the given entries: `(B, k)` ids -> `(B, k, C)` (`temperature` is unused)."""
        b, k = ids.shape
        flat = ids.reshape(-1)
        return (self.field_rows("labels", flat) - self.field_rows("base_logits", flat)).view(b, k, -1)

    @_locked
    def residual_for(self, queries: torch.Tensor, k: int, sigma: float, temperature: float | None = None,
                     index_spec: str = "auto", index_params: dict | None = None) -> torch.Tensor:
        """`r_kNN(x) = sum_i w_i (y_i - f(x_i))` over the k nearest entries.

        Args:
            queries: `(B, D)` key embeddings. temperature: unused (regression residuals have no softmax).
        Returns:
            `(B, C)` float32 residual to add to `f(x)`, on the queries' device.
        """
        distances, ids = self.search(queries, k, index_spec, index_params)  # (B, k) each
        weights = torch.nan_to_num(neighbour_weights(distances, sigma), nan=0.0)  # (B, k)
        residual = weighted_residual(weights, self.neighbour_residuals(ids).to(weights.device))  # (B, C)
        return residual.to(queries.device)


class RegressionMemory(RegressionResiduals, EditableMemory):
    """Keys, base outputs and float targets of each memory entry (regressors), in RAM; saved as one
    safetensors file (format `resmem-regression-memory`) like [`ResidualMemory`].

    Buffers:
        keys: `(N, D)` float32.  base_logits: `(N, C)` float32 base outputs `f(x_i)`.
        labels: `(N, C)` float32 targets `y_i`.  example_ids: `(N,)` int64.
    """

    def set_entries(self, keys, base_logits, labels, example_ids, fingerprint: str, layer: str) -> None:
        """Replace the memory's content (shapes as in the class docstring)."""
        tensors = {"keys": keys, "base_logits": base_logits, "labels": labels, "example_ids": example_ids}
        self._replace(tensors, fingerprint, layer, "set_entries")


def memory_class(base_config):
    """The in-RAM memory class for a base: [`RegressionMemory`] for regressors, else `ResidualMemory`."""
    from .memory import ResidualMemory

    return RegressionMemory if is_regression(base_config) else ResidualMemory


# ------------------------------------------------------------------ forward
def regression_prediction(base_logits: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Paper Remark 3.1: `f(x) + r_kNN(x)`; `(B, C)` + `(B, C)` -> `(B, C)` float32."""
    return base_logits.float() + residual.to(base_logits.device)


def regression_loss(prediction: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Mean squared error, as transformers' regression loss (`MSELoss` over all outputs).

    With `num_items_in_batch` (the `Trainer`'s gradient accumulation) the summed error is divided by it times C.
    """
    target = labels.to(prediction.device, prediction.dtype).reshape(prediction.shape)  # (B, C)
    if num_items_in_batch is None:
        return torch.nn.functional.mse_loss(prediction, target)
    total = torch.nn.functional.mse_loss(prediction, target, reduction="sum")
    return total / (torch.as_tensor(num_items_in_batch, device=total.device) * prediction.shape[-1])


# ------------------------------------------------------------------ tuning
@dataclass
class RegressionTuneResult(TableRows):
    """The table of a regression grid search (one row per `(k, sigma)`, grid order k then sigma) and its best row.

    Rows: `{"k", "sigma", "mse", "rmse", "mae", "r2", "base_mse", "base_rmse", "base_mae", "base_r2"}`.
    `predictions`: `(S, K, V, C)` float32 ResMem predictions of every setting (not serialised).
    """

    table: list[dict]
    best: dict
    objective: str
    grid: dict
    num_examples: int
    base_mse: float
    predictions: torch.Tensor | None = field(default=None, repr=False)
    base_predictions: torch.Tensor | None = field(default=None, repr=False)
    labels: torch.Tensor | None = field(default=None, repr=False)

    def predictions_for(self, k: int, sigma: float) -> torch.Tensor:
        """`(V, C)` ResMem predictions of one `(k, sigma)` of the grid."""
        try:
            s, j = self.grid["sigma"].index(float(sigma)), self.grid["k"].index(int(k))
        except ValueError as err:
            raise ValueError(f"({k}, {sigma}) is not a combination of this grid {self.grid}.") from err
        return self.predictions[s, j]

    def to_dict(self) -> dict:
        return {"objective": self.objective, "num_examples": self.num_examples, "base_mse": self.base_mse,
                "grid": self.grid, "best": self.best, "table": self.table}


def grid_regression_predictions(cache, ks, sigmas, memory, chunk_elements: int = 1 << 24):
    """ResMem predictions of every `(sigma, k)` from cached neighbours (one search at `max(ks)`).

    The k nearest are the first k of the `k_max` nearest, so each `(sigma, k)` is a prefix-masked softmax of
    `-d / sigma` over the cached distances (shifted by the nearest one, which cancels in the ratio and keeps
    the weights finite, as the forward's softmax does).

    Args:
        cache: `resmem.tuning.NeighbourCache` with `base_logits (V, C)`, `labels (V, C)`, `distances`/`ids (V, k_max)`.
        memory: the [`RegressionMemory`] the ids point into.
    Returns:
        `(S, K, V, C)` float32 predictions `f(x) + sum_i w_i (y_i - f(x_i))`.
    """
    v_total, k_max = cache.distances.shape
    k_max = min(k_max, max(ks))
    device = cache.distances.device
    c = cache.base_logits.shape[1]
    n_s, n_k = len(sigmas), len(ks)
    sigma_t = torch.tensor(sigmas, device=device, dtype=torch.float32)
    prefix = (torch.arange(k_max, device=device)[None, :] < torch.tensor(ks, device=device)[:, None]).float()  # (K, k_max)
    chunk = max(1, min(v_total, chunk_elements // max(1, n_s * n_k * max(k_max, c))))
    out = torch.empty(n_s, n_k, v_total, c, dtype=torch.float32, device=device)
    for start in range(0, v_total, chunk):
        d = cache.distances[start : start + chunk, :k_max].float()  # (v, k_max)
        v = d.shape[0]
        e = torch.exp(-(d - d[:, :1])[:, None, :] / sigma_t[None, :, None])  # (v, S, k_max), contiguous in this order
        weights = (e[:, :, None, :] * prefix[None, None]).reshape(v, n_s * n_k, k_max)  # (v, S*K, k_max), a view
        weights = weights / weights.sum(dim=-1, keepdim=True)
        residuals = memory.neighbour_residuals(cache.ids[start : start + chunk, :k_max]).to(device)  # (v, k_max, C)
        pred = cache.base_logits[start : start + chunk].float()[:, None, :] + torch.bmm(weights, residuals)  # (v, S*K, C)
        out[:, :, start : start + v] = pred.permute(1, 0, 2).reshape(n_s, n_k, v, c)
    return out


def tune_regression(model, val_dataset, k=None, sigma=None, temperature=None, objective: str = "mse",
                    batch_size: int = 256, label_column: str = "label", image_column: str | None = None,
                    image_processor=None, transform=None, set_best: bool = True, split: str | None = None,
                    progress: bool = True, **unused) -> RegressionTuneResult:
    """Grid-search `k` and `sigma` of a ResMem regressor by validation MSE, from ONE neighbour search.

    The same pass as the classifier's `tune` (`resmem.tuning.collect_neighbours` at the largest k, `sigma="auto"`
    in units of `model.sigma_scale(val_dataset)`); every `(k, sigma)` is scored by `resmem.scoring` and the
    lowest validation MSE is chosen by `resmem.scoring.select_best(rows, "mse")`. There is no temperature.
    """
    from .tuning import auto_sigma, collect_neighbours, mark_sigma_scale, validate_grid

    if objective not in REGRESSION_OBJECTIVES:
        raise ValueError(f"A regression model is tuned by validation MSE: objective must be one of {REGRESSION_OBJECTIVES}, "
                         f"got {objective!r}.")
    if temperature is not None:
        raise ValueError("A regression model has no temperature (residuals y - f(x), no softmax): drop `temperature=`.")
    unknown = sorted(key for key in unused if key not in ("max_fpr",))
    if unknown:
        raise TypeError(f"tune() got unexpected arguments {unknown}.")
    model._check_ready()
    read = dict(label_column=label_column, image_column=image_column, image_processor=image_processor, transform=transform)
    sigma, scale = auto_sigma(model, val_dataset, sigma, batch_size=batch_size, progress=progress, **read)
    grid = validate_grid(k, sigma, None, len(model.memory), model.config, model.memory)
    grid.pop("temperature")
    cache = collect_neighbours(model, val_dataset, max(grid["k"]), batch_size, progress=progress, **read)
    predictions = grid_regression_predictions(cache, grid["k"], grid["sigma"], model.memory)  # (S, K, V, C)
    sums = regression_counts_grid(cache.base_logits, predictions, cache.labels)
    rows = []
    for j, kk in enumerate(grid["k"]):
        for s, sg in enumerate(grid["sigma"]):
            metrics = regression_metrics_from_sums(*(x if not torch.is_tensor(x) else x[s, j] for x in sums))
            rows.append({"k": kk, "sigma": sg, **metrics})
    mark_sigma_scale(rows, grid, scale)
    best = select_best(rows, "mse", 0.0)
    result = RegressionTuneResult(rows, best, "mse", grid, len(cache), rows[0]["base_mse"], predictions.cpu(),
                                  cache.base_logits.cpu(), cache.labels.cpu())
    if set_best:
        model.config.k, model.config.sigma = best["k"], best["sigma"]
        from .records import record_evaluation

        record_evaluation(model, {key: value for key, value in best.items() if key not in ("k", "sigma", "sigma_scale")},
                          dataset=val_dataset, split=split, source="tune (mse)")
    return result


__all__ = [
    "REGRESSION_SCHEMA",
    "RegressionMemory",
    "RegressionTuneResult",
    "check_regression_entries",
    "check_regression_targets",
    "grid_regression_predictions",
    "is_regression",
    "memory_class",
    "regression_loss",
    "regression_prediction",
    "tune_regression",
]
