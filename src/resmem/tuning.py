"""Fast hyperparameter search for ResMem: one neighbour search, every `(k, sigma, T)` from the cache.

The expensive parts of a ResMem prediction are the base model's forward pass and the nearest-
neighbour search. Neither depends on `sigma` or `T`, and the `k` nearest entries are the first `k`
of the `k_max` nearest. So [`tune`] runs the validation set through the base model and the index
**once**, at the largest `k` of the grid, and caches per query:

    base_logits (V, C)    labels (V,)    distances (V, k_max) plain L2    ids (V, k_max)

Every combination is then scored from the cache and the memory's stored base logits and labels
(residuals are recomputed at each `T`, exactly as the forward pass does):

    e_i(sigma)      = exp(-(d_i - d_0) / sigma)                        (S, V, k_max)
    r_kNN(k, sigma) = sum_{i<k} e_i r_i(T) / sum_{i<k} e_i             one bmm over a (K, k_max) prefix mask
    scores          = softmax(f(x) / T) + r_kNN                        (V, S*K, C), argmax -> predictions

The only Python loop runs over the temperatures (and over chunks of validation points when the
`(V, S*K, C)` block would not fit the memory budget); each iteration is a batched tensor operation
over all the chunk's points and all `(sigma, k)` pairs. Shifting by `d_0` cancels in the ratio and
keeps `e_0 = 1`, so no weight underflows to 0/0 (the forward pass uses the same softmax).

Causal LMs (implemented in `resmem.tuning_lm` on top of `evaluation_lm.evaluate_lm`): the search and the `(V, k_max)` cache
are the same with one query per token position. `k` and `sigma` are tunable exactly as above. `T`
is **not** tunable without a rebuild when the memory stores sparse top-m residuals computed at the
build temperature: the grid's temperature axis must be `[config.residual_temperature]` (raise otherwise), or
the memory must keep the base logits of every entry. With a vocabulary of ~50k the `(V, S*K, C)`
scores block needs small chunks (or only the true token's score plus a running max over the
vocabulary); `neighbour_residuals` would return densified sparse residuals.

Approximate indexes (IVF, HNSW) may return a different top-k for a small k than the prefix of
their top-`k_max`; the exact indexes (`"auto"`, `"exact"`, `"Flat"`) never do (up to ties).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .configuration_resmem import MIN_RESIDUAL_TEMPERATURE
from .data import dataset_length
from .hooks import EmbeddingCapture
from .key_variants import RELATIVE_SIGMA_EPS, SIGMA_MODES
from .scoring import correctness_counts, rates_from_counts, select_best  # select_best: the one implementation, re-exported here
from .validation import check_batch_size

OBJECTIVES = ("accuracy", "conservative")
# `sigma="auto"`: the grid in units of `model.sigma_scale(val_data)` (the median nearest-key distance).
AUTO_SIGMA_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)
# `sigma="auto"` for `sigma_mode="relative"`: the width is already in units of each query's k-th distance, and the
# distances past the nearest span (0, d_k], so ~0.05 is close to 1-NN and ~2 close to uniform weights over the k.
RELATIVE_AUTO_SIGMA = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
# Elements of the largest intermediate block (floats) per chunk of validation points.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class NeighbourCache:
    """What one pass over a validation set leaves for the grid search.

    Args:
        base_logits: `(V, C)` float32 base model logits of the queries.
        labels: `(V,)` int64 true class ids.
        distances: `(V, k_max)` plain L2 distances to the nearest memory entries, nearest first.
        ids: `(V, k_max)` int64 memory entry ids.
    """

    base_logits: torch.Tensor
    labels: torch.Tensor
    distances: torch.Tensor
    ids: torch.Tensor
    queries: torch.Tensor | None = None  # (V, D) the queries' keys (index="auto" measures its index on them)

    def __len__(self) -> int:
        return self.labels.shape[0]


class TableRows:
    """A tuning result read as its table: `list(result)`, `len(result)`, `result[i]` are the rows of `.table`."""

    table: list[dict]

    def __iter__(self):
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        return self.table[i]


@dataclass
class TuneResult(TableRows):
    """The full table of a grid search and the combination it picked.

    Iterating, indexing and `len()` act on `table` (one dict per `(k, sigma, temperature)`, in grid
    order: k, then sigma, then temperature, each ascending). `to_dict()` is JSON-serialisable.

    Args:
        table: rows `{"k", "sigma", "temperature", "accuracy", "base_accuracy", "tpr", "fpr", "gain", "feasible"}`.
        best: the chosen row (also set on `model.config`).
        objective: `"accuracy"` or `"conservative"` (max TPR subject to FPR < `max_fpr`).
        predictions: `(T, S, K, V)` int32 ResMem class ids of every combination (not serialised).
        base_predictions, labels: `(V,)` int64.
    """

    table: list[dict]
    best: dict
    objective: str
    max_fpr: float
    grid: dict
    num_examples: int
    base_accuracy: float
    predictions: torch.Tensor | None = field(default=None, repr=False)
    base_predictions: torch.Tensor | None = field(default=None, repr=False)
    labels: torch.Tensor | None = field(default=None, repr=False)

    def predictions_for(self, k: int, sigma: float, temperature: float) -> torch.Tensor:
        """`(V,)` ResMem predictions of one combination of the grid (of the best `sigma_mode` when the grid has several)."""
        try:
            t = self.grid["temperature"].index(float(temperature))
            relative = self.best.get("sigma_mode") == "relative" and "relative_sigma" in self.grid  # the held block's sigmas
            s = self.grid["relative_sigma" if relative else "sigma"].index(float(sigma))
            j = self.grid["k"].index(int(k))
        except ValueError as err:
            raise ValueError(f"({k}, {sigma}, {temperature}) is not a combination of this grid {self.grid}.") from err
        return self.predictions[t, s, j].long()

    def to_dict(self) -> dict:
        return {
            "objective": self.objective,
            "max_fpr": self.max_fpr,
            "num_examples": self.num_examples,
            "base_accuracy": self.base_accuracy,
            "grid": self.grid,
            "best": self.best,
            "table": self.table,
        }


# ------------------------------------------------------------------ validation of the inputs
def _grid(values, name: str, current) -> list:
    if values is None:
        values = [current]
    elif isinstance(values, (numbers.Number, torch.Tensor)) and not isinstance(values, (list, tuple)):
        values = [values]
    values = [v.item() if isinstance(v, torch.Tensor) else v for v in values]
    if len(values) == 0:
        raise ValueError(f"The {name} grid is empty: pass at least one value, e.g. `{name}=[...]` (or None to keep it).")
    return values


def validate_grid(k, sigma, temperature, memory_size: int, config, memory=None) -> dict[str, list]:
    """Check a grid and return it sorted and de-duplicated: `{"k": [...], "sigma": [...], "temperature": [...]}`.

    A `k` above `memory_size` is clamped to it with the warning the forward pass gives
    (`memory.effective_k`, when `memory` is passed), and the clamped grid is de-duplicated.
    """
    ks = _grid(k, "k", config.k)
    sigmas = _grid(sigma, "sigma", config.sigma)
    temps = _grid(temperature, "temperature", config.residual_temperature)
    for v in ks:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"Every k of the grid must be an integer >= 1; got {v!r}.")
    clamped = []
    for v in sorted({int(v) for v in ks}):
        if v > memory_size and memory is not None:
            v = memory.effective_k(v)  # warns as the forward does
        clamped.append(min(v, memory_size))
    ks = clamped
    for name, grid in (("sigma", sigmas), ("temperature", temps)):
        for v in grid:
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"Every {name} of the grid must be a finite number > 0; got {v!r}.")
    if min(temps, default=1.0) < MIN_RESIDUAL_TEMPERATURE:  # below it float32 softmax(z / T) gives NaN scores
        raise ValueError(f"Every temperature of the grid must be >= {MIN_RESIDUAL_TEMPERATURE:g}; got {min(temps)!r}.")
    return {
        "k": sorted({int(v) for v in ks}),
        "sigma": sorted({float(v) for v in sigmas}),
        "temperature": sorted({float(v) for v in temps}),
    }


def sigma_mode_grid(sigma_mode, config) -> list[str]:
    """The `sigma_mode` axis of a tune grid: `None` -> `[config.sigma_mode]`; a string or list, checked, in the
    order of `SIGMA_MODES` ("absolute" first, so ties go to the paper's kernel)."""
    values = [config.sigma_mode] if sigma_mode is None else [sigma_mode] if isinstance(sigma_mode, str) else list(sigma_mode)
    if not values or any(v not in SIGMA_MODES for v in values):
        raise ValueError(f"sigma_mode must be one of {SIGMA_MODES} or a non-empty list of them, got {sigma_mode!r}; e.g. "
                         "`model.tune(val, sigma_mode=[\"absolute\", \"relative\"])`.")
    return [m for m in SIGMA_MODES if m in values]


def _check_objective(objective: str, max_fpr) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
    if isinstance(max_fpr, bool) or not isinstance(max_fpr, numbers.Real) or not 0 < max_fpr < 1:
        raise ValueError(f"max_fpr must lie in (0, 1) (a share of the validation set), got {max_fpr!r}.")


def auto_sigma(model, val_data, sigma, **data_kwargs) -> tuple[object, float | None]:
    """`(sigma grid, scale)`: `sigma="auto"` -> `model.sigma_scale(val_data) * AUTO_SIGMA_MULTIPLES`; else as given."""
    if not isinstance(sigma, str):
        return sigma, None
    if sigma != "auto":
        raise ValueError(f'sigma must be a number, a list of numbers, None or "auto"; got {sigma!r}.')
    scale = model.sigma_scale(val_data, **data_kwargs)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"sigma=\"auto\" needs a positive median nearest-key distance, got {scale!r}: the validation queries "
            "coincide with memory keys (validation data inside the memory?). Pass a sigma grid instead."
        )
    return [scale * m for m in AUTO_SIGMA_MULTIPLES], scale


def mark_sigma_scale(rows: list[dict], grid: dict, scale: float | None) -> None:
    """Record the `sigma="auto"` unit in the grid and in every row (`sigma_scale`), in place."""
    if scale is None:
        return
    grid["sigma_scale"] = scale
    grid["sigma_multiples"] = list(AUTO_SIGMA_MULTIPLES)
    for row in rows:
        row["sigma_scale"] = scale


# ------------------------------------------------------------------ the one pass over the data
@torch.inference_mode()
def collect_neighbours(
    model,
    dataset,
    k_max: int,
    batch_size: int = 256,
    label_column: str = "label",
    image_column: str | None = None,
    image_processor=None,
    transform=None,
    progress: bool = True,
    flip: bool = False,
    **read_kwargs,
) -> NeighbourCache:
    """Run the base model and ONE `k_max`-nearest-neighbour search over a validation set.

    Returns a [`NeighbourCache`] on the model's device. Raises a `ValueError` for labels outside
    `[0, num_labels)`. `progress=False` hides the bar (as does `disable_progress_bar()`).
    `flip=True`: the horizontally flipped images (`config.query_augmentation`, see `resmem.augmentation`).
    """
    from transformers.utils.logging import is_progress_bar_enabled, tqdm

    check_batch_size(batch_size)
    capture = EmbeddingCapture(model.base, model.config.layer)
    length = dataset_length(dataset)
    total = math.ceil(length / batch_size) if length else None
    # The model reads its own inputs (images; text or audio for the subclasses, with `read_kwargs`).
    batches = model._batch_reader(batch_size, label_column, image_column, image_processor, transform, **read_kwargs)(dataset)
    logits, labels, distances, ids = [], [], [], []
    keys = []  # the queries, for index="auto"'s measurement (resmem.index_choice.measure_in_tune)
    was_training = model.training
    model.eval()
    try:
        disable = not (progress and is_progress_bar_enabled())
        for batch in tqdm(batches, total=total, desc="ResMem tune: search", unit="batch", disable=disable):
            if flip:
                from .augmentation import flipped_batch

                batch = flipped_batch(batch)
            batch_logits, queries = model.embed_batch(batch, capture, label_column, role="Validation labels")  # (B, C), (B, D)
            queries = model.memory_queries(queries)  # (B, D) in the memory's key space (config.key_normalization)
            d, i = model.memory.search(queries, k_max, model.config.index, model.config.index_params)  # (B, k_max) each
            logits.append(batch_logits)
            labels.append(batch.labels.to(model.device))
            distances.append(d)
            ids.append(i)
            keys.append(queries)
    finally:
        model.train(was_training)
    return NeighbourCache(torch.cat(logits), torch.cat(labels), torch.cat(distances), torch.cat(ids), torch.cat(keys))


# ------------------------------------------------------------------ every combination from the cache
def grid_weights(
    d: torch.Tensor, k_t: torch.Tensor, sigma_t: torch.Tensor, prefix: torch.Tensor, sigma_mode: str = "absolute"
) -> torch.Tensor:
    """Neighbour weights of every `(sigma, k)` of a grid, as the forward computes them.

    Args:
        d: `(v, k_max)` plain L2 distances, ascending per row (`inf` for slots an index could not fill).
        k_t: `(K,)` the grid's k values; sigma_t: `(S,)` its sigmas; prefix: `(K, k_max)` 1 on each k's first k slots.
        sigma_mode: `"absolute"`: `softmax(-d / sigma)`; `"relative"`: width `sigma * d_k(x)`, the query's largest
            finite distance among its first k (clamped at `RELATIVE_SIGMA_EPS`), so it depends on `k` too.
    Returns:
        `(v, S*K, k_max)` weights, each row summing to 1 over its first k entries (shifted by `d_0`, as the forward's
        softmax, so large `d / sigma` cannot underflow to 0/0).
    """
    v, k_max = d.shape
    if sigma_mode == "relative":  # width sigma * d_k(x) at each k of the grid: (v, S, K, 1)
        finite = torch.where(torch.isfinite(d), d, torch.zeros_like(d))  # (v, k_max); unfilled slots are not used
        d_k = finite.cummax(dim=1).values[:, k_t - 1].clamp_min(RELATIVE_SIGMA_EPS)  # (v, K) largest of the first k
        width = sigma_t[None, :, None, None] * d_k[:, None, :, None]  # (v, S, K, 1)
        weights = torch.exp(-(d - d[:, :1])[:, None, None, :] / width) * prefix[None, None]  # (v, S, K, k_max)
    else:
        e = torch.exp(-(d - d[:, :1])[None] / sigma_t[:, None, None])  # (S, v, k_max)
        weights = e.permute(1, 0, 2)[:, :, None, :] * prefix[None, None]  # (v, S, K, k_max)
    weights = weights.reshape(v, len(sigma_t) * len(k_t), k_max)  # (v, S*K, k_max)
    return weights / weights.sum(dim=-1, keepdim=True)


def grid_predictions(
    cache: NeighbourCache,
    ks: Sequence[int],
    sigmas: Sequence[float],
    temperatures: Sequence[float],
    memory_logits: torch.Tensor | None = None,
    memory_labels: torch.Tensor | None = None,
    neighbour_residuals: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
    chunk_elements: int = _CHUNK_ELEMENTS,
    sigma_mode: str = "absolute",
    flipped: NeighbourCache | None = None,
) -> torch.Tensor:
    """ResMem predictions of every `(T, sigma, k)` from cached neighbours.

    Args:
        cache: [`NeighbourCache`] with at least `max(ks)` neighbours per query.
        memory_logits, memory_labels: `(N, C)` / `(N,)` stored base logits and labels of the memory
            (dense path: residuals are split as `sum w_i onehot(y_i) - sum w_i softmax(l_i / T)`, so the
            label part and the gather are computed once per chunk, not once per `T`).
        neighbour_residuals: alternatively, `(ids (v, k_max), T) -> (v, k_max, C)` residuals of those
            entries at `T` (e.g. `ResidualMemory.neighbour_residuals`; the hook for sparse LM memories).
        sigma_mode: `"relative"`: the width at `(sigma, k)` is `sigma * d_k(x)`, the query's k-th finite distance
            (clamped at `RELATIVE_SIGMA_EPS`), so it depends on `k` too (see `resmem.key_variants`).
        flipped: the [`NeighbourCache`] of the queries' flipped copies (`config.query_augmentation="hflip"`, same
            order): the forward's residual `(r_kNN(x) + r_kNN(flip x)) / 2` is a sum over `2k` neighbours, the k of
            each view with that view's weights halved, so the two views' weights and ids are concatenated.
    Returns:
        `(T, S, K, V)` int32 predicted class ids (argmax of paper eq. 3).
    """
    if (neighbour_residuals is None) == (memory_logits is None or memory_labels is None):
        raise ValueError("Pass either memory_logits and memory_labels, or neighbour_residuals.")
    v_total, k_max = cache.distances.shape
    k_max = min(k_max, max(ks))
    device = cache.distances.device
    num_classes = cache.base_logits.shape[1]
    k_t = torch.tensor(ks, device=device)
    sigma_t = torch.tensor(sigmas, device=device, dtype=torch.float32)
    n_s, n_k = len(sigmas), len(ks)
    prefix = (torch.arange(k_max, device=device)[None, :] < k_t[:, None]).float()  # (K, k_max)
    views = [cache] if flipped is None else [cache, flipped]
    width = len(views) * k_max  # neighbours per query over all views
    per_point = max(n_s * n_k * max(width, num_classes), width * num_classes)
    chunk = max(1, min(v_total, chunk_elements // per_point))
    out = torch.empty(len(temperatures), n_s, n_k, v_total, dtype=torch.int32, device=device)
    for start in range(0, v_total, chunk):
        weights = torch.cat([  # (v, S*K, width): each view's weights, divided by the number of views
            grid_weights(view.distances[start : start + chunk, :k_max].float(), k_t, sigma_t, prefix, sigma_mode)
            for view in views
        ], dim=-1) / len(views)
        ids = torch.cat([view.ids[start : start + chunk, :k_max] for view in views], dim=-1)  # (v, width)
        v = ids.shape[0]
        logits = cache.base_logits[start : start + chunk]  # (v, C)
        if neighbour_residuals is None:
            nb_logits = memory_logits[ids].float()  # (v, width, C)
            nb_labels = memory_labels[ids].long()  # (v, width)
            label_part = torch.zeros(v, n_s * n_k, num_classes, device=device)  # (v, S*K, C)
            label_part.scatter_add_(2, nb_labels[:, None, :].expand(v, n_s * n_k, width), weights)  # sum w_i onehot(y_i)
        for t, temperature in enumerate(temperatures):
            base = torch.softmax(logits / temperature, dim=-1)[:, None, :]  # (v, 1, C)
            if neighbour_residuals is None:
                probs = torch.softmax(nb_logits / temperature, dim=-1)  # (v, width, C)
                scores = torch.baddbmm(base + label_part, weights, probs, alpha=-1.0)  # (v, S*K, C)
            else:
                scores = base + torch.bmm(weights, neighbour_residuals(ids, temperature))  # (v, S*K, C)
            pred = scores.argmax(dim=-1)  # (v, S*K)
            out[t, :, :, start : start + v] = pred.T.reshape(n_s, n_k, v).to(torch.int32)
    return out


def summarise(
    predictions: torch.Tensor, base_predictions: torch.Tensor, labels: torch.Tensor, grid: dict, max_fpr: float
) -> list[dict]:
    """The table rows (grid order k, sigma, T) from `(T, S, K, V)` predictions; rates are shares of V.

    The counts are taken for the whole grid at once; the rates come from `resmem.scoring.rates_from_counts`.
    """
    ok = predictions.long() == labels.view(1, 1, 1, -1)  # (T, S, K, V)
    base_ok = (base_predictions == labels).view(1, 1, 1, -1)  # (1, 1, 1, V)
    n, base_correct, correct, fixed, broken = correctness_counts(base_ok, ok)  # counts (1, 1, 1), (T, S, K) x 3
    base_correct, correct, fixed, broken = int(base_correct), correct.tolist(), fixed.tolist(), broken.tolist()
    rows = []
    for j, k in enumerate(grid["k"]):
        for s, sigma in enumerate(grid["sigma"]):
            for t, temperature in enumerate(grid["temperature"]):
                rates = rates_from_counts(n, base_correct, correct[t][s][j], fixed[t][s][j], broken[t][s][j])
                rows.append(
                    {
                        "k": k,
                        "sigma": sigma,
                        "temperature": temperature,
                        "accuracy": rates["resmem_accuracy"],
                        "base_accuracy": rates["base_accuracy"],
                        "tpr": rates["tpr"],
                        "fpr": rates["fpr"],
                        "gain": rates["gain"],
                        "feasible": rates["fpr"] < max_fpr,
                    }
                )
    return rows


# ------------------------------------------------------------------ the entry point
def tune(
    model,
    val_dataset,
    k=None,
    sigma=None,
    temperature=None,
    objective: str = "accuracy",
    max_fpr: float = 0.05,
    batch_size: int = 256,
    label_column: str = "label",
    image_column: str | None = None,
    image_processor=None,
    transform=None,
    set_best: bool = True,
    split: str | None = None,
    progress: bool = True,
    label_smoothing=None,
    sigma_mode=None,
    **read_kwargs,
) -> TuneResult:
    """Grid-search `k`, `sigma` and `temperature` of a ResMem classifier on a validation set.

    One forward pass and one neighbour search at the largest `k`; every combination is then scored
    from the cache (see the module docstring). Use a validation split, never the test split.

    Args:
        model: a [`ResMemForImageClassification`] with a built (or loaded) memory.
        val_dataset: `datasets.Dataset` as for `build_memory` (`pixel_values` or images + processor).
        k, sigma, temperature: lists of values (a scalar or `None` = the current config value only).
            A `k` larger than the memory is clamped to its size, with the forward pass's warning.
            `sigma="auto"`: `model.sigma_scale(val_dataset) * (0.25, 0.5, 1, 2, 4)` (the median distance from
            a validation query to its nearest key; see [`ResMemWrapper.sigma_scale`]), recorded in
            `result.grid["sigma_scale"]` and in every row (`"sigma_scale"`).
        objective: `"accuracy"` or `"conservative"` (max TPR subject to FPR < `max_fpr`).
        max_fpr: the conservative rule's bound, in (0, 1).
        set_best: write the best `k`, `sigma`, `temperature` to `model.config` and record the best
            row as the model's latest evaluation (shown in its model card).
        split: name of the validation split, recorded with the evaluation.
        progress: show progress bars (also hidden by `transformers.utils.logging.disable_progress_bar()`).
        label_smoothing: `config.residual_space="logit"` only: grid of the target smoothing `eps` in (0, 1)
            (`None` = the configured value); rows then also carry `label_smoothing`, `nll` and `ece`, and
            `result.predictions` holds the best `eps`'s `(T, S, K, V)` block (see `resmem.logit_residuals`).
        sigma_mode: `"absolute"`, `"relative"` or a list of both (`None` = the configured mode only): every mode is
            scored from the SAME search (`resmem.key_variants`). When given (or when the configured mode is not
            `"absolute"`) rows carry `"sigma_mode"`, `result.grid["sigma_mode"]` lists the modes (rows: mode, then k,
            sigma, T) and `result.predictions` holds the best mode's `(T, S, K, V)` block. In the relative mode `sigma`
            is a multiple of each query's k-th neighbour distance, so `sigma="auto"` gives it `RELATIVE_AUTO_SIGMA`
            `(0.05, 0.1, 0.2, 0.5, 1, 2)` (from near 1-NN to near-uniform weights; recorded as `result.grid["relative_sigma"]`
            when mixed with the absolute mode).
        read_kwargs: text / audio classifiers: how to read `val_dataset` (`tokenizer=`, `text_column=`;
            `feature_extractor=`, `audio_column=`), as for their `build_memory`.
    Returns:
        [`TuneResult`]: the full table (`list(result)`), `result.best`, JSON via `result.to_dict()`.
    """
    _check_objective(objective, max_fpr)
    model._check_ready()
    read = dict(
        label_column=label_column, image_column=image_column, image_processor=image_processor, transform=transform,
        **read_kwargs,
    )
    modes = sigma_mode_grid(sigma_mode, model.config)
    relative_auto = isinstance(sigma, str) and sigma == "auto" and "relative" in modes
    if relative_auto and modes == ["relative"]:  # relative widths are multiples of d_k(x): no distance scale needed
        sigma, relative_auto = list(RELATIVE_AUTO_SIGMA), False
    sigma, scale = auto_sigma(model, val_dataset, sigma, batch_size=batch_size, progress=progress, **read)
    grid = validate_grid(k, sigma, temperature, len(model.memory), model.config, model.memory)
    logit_space = model.config.residual_space == "logit"
    if logit_space and modes != ["absolute"]:
        raise ValueError("sigma_mode='relative' is implemented for residual_space='probability' only: drop sigma_mode "
                         "from tune (or set model.config.residual_space = 'probability').")
    if logit_space:
        from .logit_residuals import smoothing_grid, tune_logit_space

        grid["label_smoothing"] = smoothing_grid(label_smoothing, model.config.label_smoothing)
    elif label_smoothing is not None:
        raise ValueError("label_smoothing is a setting of logit-space residuals: set model.config.residual_space = 'logit' first, or drop it.")
    if set_best and model.config.index == "auto":  # the grid from exact search; the index is measured after it
        model.memory.auto_index = None
    cache = collect_neighbours(model, val_dataset, max(grid["k"]), batch_size, progress=progress, **read)
    base_predictions = cache.base_logits.argmax(dim=-1)  # (V,)
    flipped = None
    if model.config.query_augmentation != "none":  # mean residual of x and flip(x): a second cache, same grid
        from .augmentation import check_tune_query_augmentation

        check_tune_query_augmentation(model.config)
        flipped = collect_neighbours(model, val_dataset, max(grid["k"]), batch_size, progress=progress, flip=True, **read)

    def predict_grid(mode: str, mode_grid: dict) -> torch.Tensor:  # (T, S, K, V)
        return grid_predictions(cache, mode_grid["k"], mode_grid["sigma"], grid["temperature"],
                                memory_logits=model.memory.base_logits, memory_labels=model.memory.labels,
                                sigma_mode=mode, flipped=flipped)

    if logit_space:
        rows, all_predictions = tune_logit_space(model, cache, grid, max_fpr)  # predictions (E, T, S, K, V)
    elif modes == ["absolute"] and sigma_mode is None:  # the paper's tune, unchanged
        predictions = predict_grid("absolute", grid)  # (T, S, K, V)
        rows = summarise(predictions, base_predictions, cache.labels, grid, max_fpr)
    else:  # every sigma mode from the same cache (one search)
        rows, by_mode = [], {}
        grid["sigma_mode"] = modes
        if relative_auto:
            grid["relative_sigma"] = list(RELATIVE_AUTO_SIGMA)
        for mode in modes:
            mode_grid = dict(grid, sigma=grid["relative_sigma"]) if mode == "relative" and relative_auto else grid
            by_mode[mode] = predict_grid(mode, mode_grid)  # (T, S, K, V)
            mode_rows = summarise(by_mode[mode], base_predictions, cache.labels, mode_grid, max_fpr)
            if mode == "absolute":
                mark_sigma_scale(mode_rows, {}, scale)  # the distance unit applies to absolute widths only
            rows += [{"sigma_mode": mode, **row} for row in mode_rows]
    mark_sigma_scale(rows if "sigma_mode" not in grid else [], grid, scale)
    best = select_best(rows, objective, max_fpr)
    if logit_space:
        predictions = all_predictions[grid["label_smoothing"].index(best["label_smoothing"])]  # (T, S, K, V)
    elif "sigma_mode" in grid:
        predictions = by_mode[best["sigma_mode"]]  # (T, S, K, V) of the chosen mode
    result = TuneResult(
        table=rows,
        best=best,
        objective=objective,
        max_fpr=float(max_fpr),
        grid=grid,
        num_examples=len(cache),
        base_accuracy=rows[0]["base_accuracy"],
        predictions=predictions.cpu(),
        base_predictions=base_predictions.cpu(),
        labels=cache.labels.cpu(),
    )
    if set_best:
        model.config.k, model.config.sigma, model.config.residual_temperature = best["k"], best["sigma"], best["temperature"]
        if "sigma_mode" in best:
            model.config.sigma_mode = best["sigma_mode"]
        if logit_space:
            model.config.label_smoothing = best["label_smoothing"]
        from .index_choice import measure_in_tune
        from .records import record_evaluation

        on_chosen_index = {} if logit_space else measure_in_tune(model, cache)  # index="auto": measured, recorded
        record_evaluation(
            model,
            {
                "base_accuracy": best["base_accuracy"],
                "resmem_accuracy": best["accuracy"],
                "tpr": best["tpr"],
                "fpr": best["fpr"],
                "gain": best["gain"],
                "num_examples": len(cache),
                **on_chosen_index,  # the chosen index's own numbers (the grid's row is exact search's)
            },
            dataset=val_dataset,
            split=split,
            source=f"tune ({objective})",
        )
    return result


__all__ = [
    "AUTO_SIGMA_MULTIPLES",
    "RELATIVE_AUTO_SIGMA",
    "NeighbourCache",
    "OBJECTIVES",
    "TuneResult",
    "collect_neighbours",
    "grid_predictions",
    "select_best",
    "summarise",
    "tune",
    "validate_grid",
]
