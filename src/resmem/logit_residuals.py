"""Logit-space residuals (`config.residual_space = "logit"`): ResMem whose output is always a proper distribution.

The paper (Yang et al., sec. 6) leaves residuals in logit space as future work. Definition used here, for a
classifier with `C` classes, temperature `T` and label smoothing `eps` in (0, 1):

    target      t(y)   = log((1 - eps) * onehot(y) + eps / C)               (C,) log of a smoothed one-hot
    residual    r_i    = t(y_i) - log_softmax(f(x_i) / T)                    (C,) a log-likelihood ratio
    r_kNN(x)           = sum_i w_i r_i                                        same neighbours and weights as ResMem
    logits(x)          = log_softmax(log_softmax(f(x) / T) + r_kNN(x))        log-probabilities
    scores(x)          = exp(logits(x)) = softmax(f(x) / T + r_kNN(x))        a distribution: no clamp, no floor

Why this definition:

- It is eq. 3 of the paper moved to the log domain: the probability-space residual `onehot(y) - p_T(x_i)` is the
  gap between the target and the model's distribution; here it is the gap between their logarithms. The
  prediction is `p(x) ∝ p_T(x) * prod_i (p~(y_i) / p_T(x_i)) ** w_i`: the base distribution multiplied by the
  neighbours' weighted geometric mean of target / model likelihood ratios (a product of experts).
- `softmax` of any real vector is a distribution, so `scores` are never negative and the log-likelihood of every
  class is finite: nothing to clamp (the probability-space `logits` clamp at `score_floor`, and a true class
  with a negative score gets log(1e-8)).
- Softmax is invariant to adding a constant to every class, and the weights sum to 1, so the result does not
  depend on the offset of `f(x_i)` (logits are defined only up to one) nor on that of `t(y)`; `log_softmax`
  just picks one representative of each.
- The smoothing is needed because `log onehot(y)` is `-inf` off the label. It bounds the confidence memory can
  add: at a training point with `k = 1` and a tiny `sigma` the prediction is exactly the smoothed label
  `p~(y_i)` (argmax `y_i`: the paper's Remark 3.2 still holds), never a one-hot. Smaller `eps` means larger
  residuals (stronger memory); it is tuned with `k`, `sigma`, `T` (`model.tune(..., label_smoothing=[...])`).

The classifier memory stores each entry's base logits and label, so these residuals are computed from the same
stored entries as the probability-space ones, at any `T` and `eps`, without a rebuild.

Causal LMs are not supported: their memory stores each entry's residual as the top-m entries of the dense
probability residual, computed at build time (no base logits). A logit residual `t(y) - log_softmax(f / T)` is
large on every token the model ranks low (tens of thousands of entries), so keeping m of them and treating the
rest as 0 is not a sparse approximation of it; supporting it needs a memory that stores the base logits (or
log-partition and top logits) of every token, a different memory format.
"""

from __future__ import annotations

import math
import numbers

import torch

from .residuals import neighbour_weights

RESIDUAL_SPACES = ("probability", "logit")
DEFAULT_LABEL_SMOOTHING = 0.1


def check_residual_space(space, task: str | None = None) -> None:
    """Raise a `ValueError` naming the fix for an unknown space, or `"logit"` on a causal LM."""
    if space not in RESIDUAL_SPACES:
        raise ValueError(f"residual_space must be one of {RESIDUAL_SPACES}, got {space!r}.")
    if space == "logit" and task == "causal-lm":
        raise ValueError(
            "residual_space='logit' is supported for classifiers only: a causal-LM memory stores sparse top-m "
            "probability residuals computed at build time, and a logit-space residual is dense over the vocabulary "
            "(no sparse form). For a proper next-token distribution use config.distribution = 'mixture'."
        )


def check_label_smoothing(eps) -> None:
    """`0 < eps < 1`: `eps = 0` makes the target log-probabilities `-inf`, `eps = 1` removes the label."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and 0.0 < eps < 1.0):
        raise ValueError(
            f"label_smoothing must lie strictly between 0 and 1 (the target is log((1 - eps) * onehot + eps / C)), "
            f"got {eps!r}. Set e.g. `model.config.label_smoothing = 0.1`."
        )


def target_log_probs(labels: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    """`t(y) = log((1 - eps) * onehot(y) + eps / C)`.

    Args:
        labels: `(...)` int64 class ids in `[0, C)`.
    Returns:
        `(..., C)` float32.
    """
    off = math.log(eps / num_classes)
    on = math.log(1.0 - eps + eps / num_classes)
    t = torch.full((*labels.shape, num_classes), off, dtype=torch.float32, device=labels.device)  # (..., C)
    return t.scatter_(-1, labels.long().unsqueeze(-1), on)


def logit_residuals(base_logits: torch.Tensor, labels: torch.Tensor, temperature: float, eps: float) -> torch.Tensor:
    """`r_i = t(y_i) - log_softmax(f(x_i) / T)`.

    Args:
        base_logits: `(..., C)` base logits of memory entries; labels: `(...)` int64.
    Returns:
        `(..., C)` float32 residuals.
    """
    c = base_logits.shape[-1]
    return target_log_probs(labels, c, eps) - torch.log_softmax(base_logits.float() / temperature, dim=-1)


def logit_space_logits(base_logits: torch.Tensor, residual: torch.Tensor, temperature: float) -> torch.Tensor:
    """`log_softmax(log_softmax(f(x) / T) + r_kNN(x))`: `(..., C)` log-probabilities of the prediction."""
    return torch.log_softmax(torch.log_softmax(base_logits.float() / temperature, dim=-1) + residual, dim=-1)


def logit_residual_for(memory, queries: torch.Tensor, config) -> torch.Tensor:
    """`r_kNN(x) = sum_i w_i r_i` in logit space over the `config.k` nearest entries of a classifier memory.

    Args:
        memory: a classifier memory (stored `base_logits` and `labels`; in RAM or on disk).
        queries: `(B, D)` key embeddings.
    Returns:
        `(B, C)` float32 on the queries' device.
    """
    with memory._lock:  # the same lock as the probability-space residual_for (edits from other threads)
        distances, ids = memory.search(queries, config.k, config.index, config.index_params)  # (B, k) each
        b, k = ids.shape
        flat = ids.reshape(-1)
        logits, labels = memory.field_rows("base_logits", flat), memory.field_rows("labels", flat)  # (B*k, C), (B*k,)
    weights = torch.nan_to_num(neighbour_weights(distances, config.sigma), nan=0.0)  # (B, k); no neighbour: no residual
    res = logit_residuals(logits, labels, config.residual_temperature, config.label_smoothing).view(b, k, -1)  # (B, k, C)
    return torch.einsum("bk,bkc->bc", weights, res.to(weights.device)).to(queries.device)  # (B, C)


def logit_outputs(memory, queries: torch.Tensor, base_logits: torch.Tensor, config):
    """The forward's `(residual, scores, logits)` in logit space, each `(B, C)` float32.

    `scores = exp(logits)` is a distribution (non-negative, sums to 1) with the logits' argmax.
    """
    residual = logit_residual_for(memory, queries, config)  # (B, C)
    logits = logit_space_logits(base_logits, residual, config.residual_temperature)  # (B, C)
    return residual, logits.exp(), logits


# ------------------------------------------------------------------ tuning: every (eps, T, sigma, k) from one search
def grid_log_probs_chunks(cache, ks, sigmas, temperatures, smoothings, memory_logits, memory_labels, chunk_elements=1 << 24):
    """Yield `(start, e, t, log_probs)` for chunks of validation points: `log_probs` `(v, S*K, C)` in logit space.

    Same weights as `resmem.tuning.grid_predictions` (`resmem.tuning.grid_weights`: prefix mask over the `k_max`
    cached neighbours, softmax of `-d / sigma` shifted by the nearest distance). The Python loops run over grid
    values and chunks only.
    """
    from .tuning import grid_weights  # tuning imports the config, which imports this module

    v_total, k_max = cache.distances.shape
    k_max = min(k_max, max(ks))
    device = cache.distances.device
    c = cache.base_logits.shape[1]
    k_t = torch.tensor(ks, device=device)
    sigma_t = torch.tensor(sigmas, device=device, dtype=torch.float32)
    n_s, n_k = len(sigmas), len(ks)
    prefix = (torch.arange(k_max, device=device)[None, :] < k_t[:, None]).float()  # (K, k_max)
    chunk = max(1, min(v_total, chunk_elements // max(n_s * n_k * max(k_max, c), k_max * c)))
    for start in range(0, v_total, chunk):
        d = cache.distances[start : start + chunk, :k_max].float()  # (v, k_max)
        ids = cache.ids[start : start + chunk, :k_max]  # (v, k_max)
        weights = grid_weights(d, k_t, sigma_t, prefix)  # (v, S*K, k_max), the forward's absolute kernel
        nb_logits, nb_labels = memory_logits[ids].float(), memory_labels[ids].long()  # (v, k_max, C), (v, k_max)
        logits = cache.base_logits[start : start + chunk].float()  # (v, C)
        for t, temperature in enumerate(temperatures):
            base = torch.log_softmax(logits / temperature, dim=-1)[:, None, :]  # (v, 1, C)
            model_part = torch.bmm(weights, torch.log_softmax(nb_logits / temperature, dim=-1))  # (v, S*K, C)
            for e, eps in enumerate(smoothings):
                target = torch.bmm(weights, target_log_probs(nb_labels, c, eps))  # (v, S*K, C)
                yield start, e, t, torch.log_softmax(base + target - model_part, dim=-1)


def logit_grid(cache, grid: dict, memory_logits, memory_labels, num_bins: int = 15):
    """Predictions, NLL and ECE of every `(eps, T, sigma, k)` of a grid from a `NeighbourCache`.

    Returns:
        `(predictions (E, T, S, K, V) int32, nll (E, T, S, K) float, ece (E, T, S, K) float)`.
    """
    from .scoring import calibration_bin_sums

    ks, sigmas, temps, eps = grid["k"], grid["sigma"], grid["temperature"], grid["label_smoothing"]
    v_total = len(cache)
    n_s, n_k = len(sigmas), len(ks)
    device = cache.distances.device
    preds = torch.empty(len(eps), len(temps), n_s, n_k, v_total, dtype=torch.int32, device=device)
    nll = torch.zeros(len(eps), len(temps), n_s * n_k, dtype=torch.float64, device=device)
    gap = torch.zeros(len(eps), len(temps), n_s * n_k, num_bins, dtype=torch.float64, device=device)
    for start, e, t, log_probs in grid_log_probs_chunks(cache, ks, sigmas, temps, eps, memory_logits, memory_labels):
        v = log_probs.shape[0]
        labels = cache.labels[start : start + v].long()  # (v,)
        top, pred = log_probs.max(dim=-1)  # (v, S*K) each
        preds[e, t, :, :, start : start + v] = pred.T.reshape(n_s, n_k, v).to(torch.int32)
        true = log_probs.gather(2, labels[:, None, None].expand(v, n_s * n_k, 1)).squeeze(2)  # (v, S*K)
        nll[e, t] -= true.double().sum(dim=0)
        gap[e, t] += calibration_bin_sums(top.exp().T, (pred == labels[:, None]).T, num_bins)  # (S*K, bins)
    shape = (len(eps), len(temps), n_s, n_k)
    return preds, (nll / v_total).reshape(shape).cpu(), (gap.abs().sum(-1) / v_total).reshape(shape).cpu()


def tune_logit_space(model, cache, grid: dict, max_fpr: float):
    """Rows of the tuning table in logit space (grid order k, sigma, T, label_smoothing) and the predictions.

    Every row has the probability-space tuner's keys plus `label_smoothing`, `nll` and `ece` (validation).
    Returns:
        `(rows, predictions (E, T, S, K, V) int32)`.
    """
    from .tuning import summarise

    preds, nll, ece = logit_grid(cache, grid, model.memory.base_logits, model.memory.labels)
    base_predictions = cache.base_logits.argmax(dim=-1)  # (V,)
    per_eps = [summarise(preds[e], base_predictions, cache.labels, grid, max_fpr) for e in range(len(grid["label_smoothing"]))]
    rows = []
    for j in range(len(grid["k"])):
        for s in range(len(grid["sigma"])):
            for t in range(len(grid["temperature"])):
                i = (j * len(grid["sigma"]) + s) * len(grid["temperature"]) + t  # summarise's row order
                for e, eps in enumerate(grid["label_smoothing"]):
                    row = dict(per_eps[e][i], label_smoothing=eps, nll=float(nll[e, t, s, j]), ece=float(ece[e, t, s, j]))
                    rows.append(row)
    return rows, preds


def smoothing_grid(values, current) -> list[float]:
    """The sorted, de-duplicated label-smoothing grid (`None`: the configured value), each checked."""
    if values is None:
        values = [current]
    elif isinstance(values, (numbers.Number, torch.Tensor)):
        values = [values]
    values = [v.item() if isinstance(v, torch.Tensor) else v for v in values]
    if not values:
        raise ValueError("The label_smoothing grid is empty: pass at least one value in (0, 1), or None to keep it.")
    for v in values:
        check_label_smoothing(v)
    return sorted({float(v) for v in values})


__all__ = [
    "DEFAULT_LABEL_SMOOTHING",
    "RESIDUAL_SPACES",
    "logit_grid",
    "logit_outputs",
    "logit_residual_for",
    "logit_residuals",
    "logit_space_logits",
    "target_log_probs",
    "tune_logit_space",
]
