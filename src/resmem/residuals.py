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
