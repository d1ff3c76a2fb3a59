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


def neighbour_weights(distances: torch.Tensor, sigma: float, sigma_mode: str = "absolute") -> torch.Tensor:
    """Soft-kNN weights `w_i = exp(-d_i / sigma) / sum_j exp(-d_j / sigma)` over the k neighbours.

    Args:
        distances: `(B, k)` plain (not squared) L2 distances.
        sigma_mode: `"absolute"` (the paper) or `"relative"`: `sigma` is multiplied by each query's k-th (largest
            finite) distance `d_k(x)`, see `resmem.key_variants.kth_distance`.
    Returns:
        `(B, k)` weights summing to 1 per row (a softmax, so large `d / sigma` cannot underflow to 0/0).
    """
    if sigma_mode == "relative":
        from .key_variants import kth_distance

        return torch.softmax(-distances.float() / (sigma * kth_distance(distances)), dim=-1)  # (B, k)
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


def scores_to_logits(scores: torch.Tensor, floor: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """`log(renormalise(clamp(scores, floor)))`: a proper log-distribution with the scores' argmax.

    Args:
        scores: `(..., C)`.
        out: optional float32 tensor of the same shape to write the result into (may be `scores`
            itself); by default a new tensor.
    Returns:
        `(..., C)` log-probabilities. Computed in place in one buffer (clamp, then log, then minus
        the log of the clamped sum): the same values as the out-of-place expression.
    """
    clamped = scores.clamp_min(floor) if out is None else torch.clamp(scores, min=floor, out=out)  # (..., C)
    log_total = clamped.sum(dim=-1, keepdim=True).log()  # (..., 1)
    return clamped.log_().sub_(log_total)


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
    weights: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor | None,
    num_columns: int,
    out: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """`r_kNN(x) = sum_i w_i r_i` for neighbours whose residuals are stored sparse.

    Args:
        weights: `(B, k)` neighbour weights.
        values: `(B, k, m)` stored residual values of each query's neighbours (`m = V` when dense).
        indices: `(B, k, m)` their vocabulary columns, or `None` when the rows are dense.
        num_columns: `V`, the width of the dense result.
        out: optional `(n, V)` float32 tensor the residuals are ADDED into, in place (pass zeros to get
            the residual itself): saves the `(B, V)` temporary and the copy into a larger buffer.
        rows: `(B,)` int64 rows of `out` that receive the `B` residuals (default: rows `0..B-1`).
    Returns:
        `(B, V)` float32 residual (a scatter-add of the weighted values into zeros), or `out` when given.
        Each entry is summed in the order of the `k * m` stored values whether or not `out` is given,
        so `out=zeros` gives bitwise the same residual.
    """
    weighted = weights.float().unsqueeze(-1) * values.float()  # (B, k, m)
    b = weighted.shape[0]
    if out is None:
        if indices is None:
            return weighted.sum(dim=1)  # (B, V)
        out = torch.zeros(b, num_columns, dtype=torch.float32, device=weighted.device)  # (B, V)
        return out.scatter_add_(1, indices.reshape(b, -1).long(), weighted.reshape(b, -1))
    if rows is None and b != out.shape[0]:
        raise ValueError(f"sparse_weighted_residual: {b} residuals for an `out` of {out.shape[0]} rows; pass `rows`.")
    if indices is None:
        dense = weighted.sum(dim=1)  # (B, V)
        return out.add_(dense) if rows is None else out.index_add_(0, rows.to(out.device), dense)
    if rows is None:
        return out.scatter_add_(1, indices.reshape(b, -1).long(), weighted.reshape(b, -1))  # (n, V)
    # Scatter into the flat view at row * V + column: one pass, contributions in the same order.
    flat = (rows.to(out.device).unsqueeze(1) * out.shape[1] + indices.reshape(b, -1).long()).reshape(-1)  # (B*k*m,)
    out.view(-1).scatter_add_(0, flat, weighted.reshape(-1))
    return out


def mixture_log_probs(
    scores: torch.Tensor,
    base_logits: torch.Tensor | None,
    lam: float,
    eps: float = 1e-30,
    weighted_base: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`log((1 - lam) * renormalise(clamp(scores, 0)) + lam * softmax(base_logits))`.

    A proper distribution built from the ResMem scores (kNN-LM style interpolation with the base
    model at temperature 1): its log-probabilities stay finite for every token when `lam > 0`.

    Args:
        scores: `(..., V)` ResMem scores; base_logits: `(..., V)`; lam: weight of the base model in `[0, 1]`.
        weighted_base: `lam * softmax(base_logits)` `(..., V)` if already computed (then `base_logits`
            may be `None`), e.g. from `softmax(base_logits / T)` when `T = 1`: saves a softmax.
        out: optional float32 tensor of the same shape for the result (may be `scores` itself).
    Returns:
        `(..., V)` log-probabilities, computed in place in one buffer (same values as the plain expression).
    """
    if out is None and torch.is_grad_enabled() and (scores.requires_grad or getattr(base_logits, "requires_grad", False)):
        # Autograd cannot go through the in-place steps below (softmax's output is needed for its gradient).
        positive = scores.float().clamp_min(0)  # (..., V)
        positive = positive / positive.sum(dim=-1, keepdim=True).clamp_min(eps)
        base = weighted_base if weighted_base is not None else torch.softmax(base_logits.float(), dim=-1) * lam
        return (positive * (1.0 - lam) + base).clamp_min(eps).log()
    positive = scores.float().clamp_min(0) if out is None else torch.clamp(scores, min=0, out=out)  # (..., V)
    positive.div_(positive.sum(dim=-1, keepdim=True).clamp_min(eps))  # (..., V) renormalised
    if weighted_base is None:
        weighted_base = torch.softmax(base_logits.float(), dim=-1).mul_(lam)  # (..., V)
    mixed = positive.mul_(1.0 - lam).add_(weighted_base)  # (..., V)
    return mixed.clamp_min_(eps).log_()


def resmem_scores_and_logits(
    base_logits: torch.Tensor,
    weights: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor | None,
    temperature: float,
    distribution: str = "clamp",
    floor: float = 1e-8,
    lam: float = 0.0,
    eps: float = 1e-30,
    chunk_rows: int | None = None,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (paper eq. 3) and their log-distribution for `n` positions, straight from the sparse neighbours.

    The same values as `resmem_scores(base_logits, sparse_weighted_residual(...), T)` followed by
    `scores_to_logits` (`distribution="clamp"`) or `mixture_log_probs` (`"mixture"`), up to float32
    summation order: each weighted stored value is scatter-added straight into `softmax(f(x) / T)`, so a
    token hit by several neighbours gets its contributions added one by one to `p` instead of to `0`
    first (differences of a few float32 ulps of the scores, ~1e-7).

    Why it is built this way: every step over the vocabulary is memory-bound on CPU (a `(n, V)` float32
    tensor is 100 MB for 512 positions of a 49k vocabulary). The rows are processed in chunks of
    `chunk_rows` (default: ~3 MiB of float32 per chunk) so that the softmax, the scatter, the clamp, the
    sum, the log and the subtraction of one chunk all run on cache-resident data; the only `(n, V)`
    tensors are the two outputs, each written once.

    Args:
        base_logits: `(n, V)` base model logits.
        weights: `(n, k)` neighbour weights (rows of zeros for positions without a search).
        values: `(n, k, m)` stored residual values of the neighbours (`m = V` when dense).
        indices: `(n, k, m)` their vocabulary columns, or `None` for dense residuals.
        temperature: `T` of `softmax(f(x) / T)`.
        distribution: `"clamp"` -> `log(renormalise(clamp(scores, floor)))`; `"mixture"` ->
            `log((1 - lam) * renormalise(clamp(scores, 0)) + lam * softmax(f(x)))` clamped at `eps`.
        residual: optional `(n, V)` float32 tensor that receives the dense residual `sum_i w_i r_i`
            (overwritten chunk by chunk: zeros plus the scatter, bitwise `sparse_weighted_residual`'s).
    Returns:
        `(scores, logits)`, each `(n, V)` float32.
    """
    n, v = base_logits.shape
    if distribution not in ("clamp", "mixture"):
        raise ValueError(f"distribution must be 'clamp' or 'mixture', got {distribution!r}.")
    if chunk_rows is None:
        chunk_rows = max(1, (3 << 20) // (4 * max(v, 1)))  # 16 rows at V = 49,152: best of 5/16/64/all on 1-2 threads
    scores = torch.empty(n, v, dtype=torch.float32, device=base_logits.device)  # (n, V)
    logits = torch.empty_like(scores)  # (n, V)
    weights = weights.float()
    for s in range(0, n, chunk_rows):
        c = slice(s, min(s + chunk_rows, n))
        rows = c.stop - c.start
        x = base_logits[c].float()  # (c, V)
        p = torch.softmax(x if temperature == 1.0 else x / temperature, dim=-1)  # (c, V)
        if distribution == "mixture":  # lam * softmax(f(x)) at T = 1 (at T = 1 it is p before the scatter)
            base = p * lam if temperature == 1.0 else torch.softmax(x, dim=-1).mul_(lam)  # (c, V)
        weighted = weights[c].unsqueeze(-1) * values[c].float()  # (c, k, m)
        if indices is None:
            dense = weighted.sum(dim=1)  # (c, V)
            p.add_(dense)
            if residual is not None:
                residual[c] = dense
        else:
            columns, contributions = indices[c].reshape(rows, -1).long(), weighted.reshape(rows, -1)  # (c, k*m)
            p.scatter_add_(1, columns, contributions)  # (c, V)
            if residual is not None:
                residual[c].zero_().scatter_add_(1, columns, contributions)  # (c, V) cache-resident rows
        scores[c] = p
        out = logits[c]  # (c, V) view
        if distribution == "clamp":
            torch.clamp(p, min=floor, out=out)
            log_total = out.sum(dim=-1, keepdim=True).log()  # (c, 1)
            out.log_().sub_(log_total)
        else:
            torch.clamp(p, min=0, out=out)
            out.div_(out.sum(dim=-1, keepdim=True).clamp_min(eps))  # renormalised
            out.mul_(1.0 - lam).add_(base).clamp_min_(eps).log_()
    return scores, logits
