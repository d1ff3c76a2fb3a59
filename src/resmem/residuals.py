"""The ResMem equations as pure tensor code (no model, no index).

Notation: B queries, N memory entries, k neighbours, C classes (or vocabulary items).
"""

from __future__ import annotations

import torch


def residuals(base_logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Training residuals `r_i = onehot(y_i) - softmax(f(x_i) / T)`.

    Args:
        base_logits: `(N, C)` base model logits of the memory entries.
        labels: `(N,)` int64 class ids in `[0, C)`.
        temperature: `T > 0`.
    Returns:
        `(N, C)` float32 residuals.
    """
    r = -torch.softmax(base_logits.float() / temperature, dim=-1)  # (N, C)
    r.scatter_add_(1, labels.long().unsqueeze(1), torch.ones_like(r[:, :1]))
    return r


def neighbour_weights(distances: torch.Tensor, sigma: float) -> torch.Tensor:
    """Soft-kNN weights `w_i = exp(-d_i / sigma) / sum_j exp(-d_j / sigma)` over the k neighbours.

    Args:
        distances: `(B, k)` plain (not squared) L2 distances.
    Returns:
        `(B, k)` weights summing to 1 per row (a softmax, so large `d / sigma` cannot underflow to 0/0).
    """
    return torch.softmax(-distances.float() / sigma, dim=-1)


def weighted_residual(weights: torch.Tensor, neighbour_residuals: torch.Tensor) -> torch.Tensor:
    """`r_kNN(x) = sum_i w_i r_i`.

    Args:
        weights: `(B, k)`.
        neighbour_residuals: `(B, k, C)` residuals of each query's neighbours.
    Returns:
        `(B, C)`.
    """
    return torch.einsum("bk,bkc->bc", weights, neighbour_residuals)


def resmem_scores(base_logits: torch.Tensor, residual: torch.Tensor, temperature: float) -> torch.Tensor:
    """Paper eq. 3: `scores(x) = softmax(f(x) / T) + r_kNN(x)`.

    Args:
        base_logits: `(..., C)`; residual: `(..., C)`.
    Returns:
        `(..., C)` float32 scores (sum to 1 for dense residuals, may be negative).
    """
    return torch.softmax(base_logits.float() / temperature, dim=-1) + residual


def scores_to_logits(scores: torch.Tensor, floor: float) -> torch.Tensor:
    """`log(renormalise(clamp(scores, floor)))`: a proper log-distribution with the scores' argmax.

    Args:
        scores: `(..., C)`.
    Returns:
        `(..., C)` log-probabilities.
    """
    clamped = scores.clamp_min(floor)
    return clamped.log() - clamped.sum(dim=-1, keepdim=True).log()


def top_m_by_magnitude(dense: torch.Tensor, m: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keep the `m` entries of largest magnitude of each row (the paper's sparse LM residuals).

    Args:
        dense: `(N, V)` residuals.
        m: entries kept per row, `1 <= m <= V`; `None` keeps the dense rows.
    Returns:
        `(values, indices)`: `(N, m)` values (same dtype as `dense`) and `(N, m)` int64 column
        indices, or `(dense, None)` when `m` is `None`.
    """
    if m is None:
        return dense, None
    _, indices = dense.abs().topk(m, dim=-1)  # (N, m)
    return dense.gather(1, indices), indices


def sparse_weighted_residual(
    weights: torch.Tensor, values: torch.Tensor, indices: torch.Tensor | None, num_columns: int
) -> torch.Tensor:
    """`r_kNN(x) = sum_i w_i r_i` for neighbours whose residuals are stored sparse.

    Args:
        weights: `(B, k)` neighbour weights.
        values: `(B, k, m)` stored residual values of each query's neighbours (`m = V` when dense).
        indices: `(B, k, m)` their vocabulary columns, or `None` when the rows are dense.
        num_columns: `V`, the width of the dense result.
    Returns:
        `(B, V)` float32 residual (a scatter-add of the weighted values into zeros).
    """
    weighted = weights.float().unsqueeze(-1) * values.float()  # (B, k, m)
    if indices is None:
        return weighted.sum(dim=1)  # (B, V)
    b = weighted.shape[0]
    out = torch.zeros(b, num_columns, dtype=torch.float32, device=weighted.device)  # (B, V)
    return out.scatter_add_(1, indices.reshape(b, -1).long(), weighted.reshape(b, -1))


def mixture_log_probs(scores: torch.Tensor, base_logits: torch.Tensor, lam: float, eps: float = 1e-30) -> torch.Tensor:
    """`log((1 - lam) * renormalise(clamp(scores, 0)) + lam * softmax(base_logits))`.

    A proper distribution built from the ResMem scores (kNN-LM style interpolation with the base
    model at temperature 1): its log-probabilities stay finite for every token when `lam > 0`.

    Args:
        scores: `(..., V)` ResMem scores; base_logits: `(..., V)`; lam: weight of the base model in `[0, 1]`.
    Returns:
        `(..., V)` log-probabilities.
    """
    positive = scores.float().clamp_min(0)  # (..., V)
    resmem = positive / positive.sum(dim=-1, keepdim=True).clamp_min(eps)  # (..., V)
    mixed = (1.0 - lam) * resmem + lam * torch.softmax(base_logits.float(), dim=-1)  # (..., V)
    return mixed.clamp_min(eps).log()
