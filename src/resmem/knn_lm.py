"""kNN-LM (Khandelwal et al. 2020, "Generalization through Memorization") from a ResMem causal-LM memory.

The token memory already stores, for every entry, its key `phi(x_t)` and its next token `y = x_{t+1}`
(`labels`), which is all a kNN-LM datastore holds. `config.distribution = "knn-lm"` turns a
[`ResMemForCausalLM`] into a kNN-LM over the same memory, so one memory serves both methods:

```
d_i      = ||phi(x) - z_i||_2                                  # plain L2, as the memory's search returns
w_i      = softmax_i(-d_i / knn_temperature)                    # over the k nearest entries
p_kNN(v) = sum_{i : y_i = v} w_i                                # (V,), sums to 1
p(v)     = lam * p_kNN(v) + (1 - lam) * softmax(f(x))_v         # lam = config.mixture_lambda
```

`logits = log(p)` (clamped at 1e-30 only where `p` underflows), `scores = p` (so the predicted token is
`argmax p`), `residual = p - softmax(f(x))`. Khandelwal et al. use the negative *squared* L2 distance as
the logit; the memory's search returns plain L2 distances (the same `d_i` ResMem's weights use), so the
kernel here is `exp(-d_i / knn_temperature)`: with one temperature per model this is a different (flatter)
kernel than theirs, and `knn_temperature` is in the same units as `sigma` (tune it, see `tuning_lm`).

Evaluation ([`knn_lm_chunk`]) scores a whole grid of `(k, knn_temperature, lam)` from one neighbour search
at the largest `k` without materialising `p` over the vocabulary: only the (at most `k`) neighbour tokens
change relative to `(1 - lam) * softmax(f(x))`, so the argmax is the best of those against the best
untouched base probability, and the label's probability needs one gather.
"""

from __future__ import annotations

import math
import numbers

import torch

from .residuals import neighbour_weights

KNN_EPS = 1e-30  # log(p) floor: p underflows only far in the tail (lam = 0 or 1 and a zero base/kNN probability)


def knn_distribution(weights: torch.Tensor, neighbour_labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`p_kNN(v) = sum_{i: y_i = v} w_i`: weights `(n, k)` scattered onto their next tokens `(n, k)` -> `(n, V)` float32."""
    out = torch.zeros(weights.shape[0], vocab_size, dtype=torch.float32, device=weights.device)  # (n, V)
    return out.scatter_add_(1, neighbour_labels.long(), weights.float())


def knn_lm_outputs(memory, config, base_logits: torch.Tensor, queries: torch.Tensor, rows: torch.Tensor | None, output_residual: bool = True):
    """`(scores, logits, residual)` `(n, V)` of the kNN-LM distribution (module docstring) for `n` positions.

    Args:
        memory: a token memory (`labels` per entry, `search`).
        config: the [`ResMemConfig`]: `k`, `knn_temperature`, `mixture_lambda` (= lam), `index`, `index_params`.
        base_logits: `(n, V)` base model logits.
        queries: `(n', D)` keys of the searched positions (`rows` `(n',)` their rows; `None`: all `n`).
            Positions not searched (padding) get the base distribution `softmax(f(x))`.
        output_residual: also return `residual = p - softmax(f(x))` `(n, V)`, else `None`.
    Returns:
        `scores = p`, `logits = log(max(p, 1e-30))`, `residual`; each `(n, V)` float32.
    """
    n, v = base_logits.shape
    device = base_logits.device
    lam = float(config.mixture_lambda)
    with memory._lock:  # search and gather see the same memory even if another thread edits it
        k = memory.effective_k(config.k) if queries.shape[0] else 1
        weights = torch.zeros(n, k, dtype=torch.float32, device=device)  # (n, k)
        labels = torch.zeros(n, k, dtype=torch.long, device=device)  # (n, k)
        searched = torch.zeros(n, 1, dtype=torch.float32, device=device)  # (n, 1) 1 = has neighbours
        if queries.shape[0]:
            distances, found = memory.search(queries, k, config.index, config.index_params)  # (n', k)
            w = neighbour_weights(distances, config.knn_temperature).to(device)  # (n', k)
            y = memory.field_rows("labels", found.reshape(-1)).view(found.shape).to(device)  # (n', k) next tokens
            if rows is None:
                weights, labels, searched[:] = w, y, 1.0
            else:
                r = rows.to(device)
                weights[r], labels[r], searched[r] = w, y, 1.0
    p_lm = torch.softmax(base_logits.float(), dim=-1)  # (n, V) the base at temperature 1
    p_knn = knn_distribution(weights, labels, v)  # (n, V); rows of zeros where not searched
    # Same float32 operations as knn_lm_chunk (Python-float lam and 1 - lam), so evaluation reproduces it bit for bit.
    p = lam * p_knn + (1.0 - lam) * p_lm  # (n, V)
    if rows is not None or not queries.shape[0]:
        p = torch.where(searched.bool(), p, p_lm)  # positions without neighbours (padding): the base distribution
    logits = p.clamp_min(KNN_EPS).log()  # (n, V)
    residual = p - p_lm if output_residual else None
    return p, logits, residual


@torch.no_grad()
def knn_lm_chunk(base_logits, labels, distances, neighbour_labels, ks, knn_temperatures, lambdas):
    """Correctness and label log-probability of the kNN-LM for every `(k, knn_temperature, lam)` of a grid.

    Per setting the cost is O(n * k^2) (duplicate-token detection among the k neighbours) plus O(n * k), not
    O(n * V): untouched tokens keep `(1 - lam) * p_LM(v)`, whose best value is found once per chunk.
    Touched probabilities are computed exactly as [`knn_lm_outputs`] computes them (same float32 operations in
    the same order: the weights of equal tokens added from 0 in neighbour order), so the argmax (ties to the
    smaller token id, as `argmax` does) and the label's probability equal the forward's.

    Args:
        base_logits: `(n, V)` float32 base logits; labels: `(n,)` next tokens.
        distances: `(n, kmax)` plain L2 distances, ascending; neighbour_labels: `(n, kmax)` their next tokens.
        ks, knn_temperatures, lambdas: the grid (`k <= kmax`; lam = weight of `p_kNN`).
    Returns:
        `{(k, knn_temperature, lam): (ok (n,) bool, logp_y (n,) float32)}`.
    """
    n, v = base_logits.shape
    device = base_logits.device
    p_lm = torch.softmax(base_logits.float(), dim=-1)  # (n, V)
    p_lm_y = p_lm.gather(1, labels[:, None]).squeeze(1)  # (n,)
    kmax = neighbour_labels.shape[1]
    nb = neighbour_labels.long()  # (n, kmax)
    p_nb = p_lm.gather(1, nb)  # (n, kmax) base probability of each neighbour's token
    # At most k distinct neighbour tokens, so among the k+1 most probable base tokens one is untouched.
    top_v, top_i = p_lm.topk(min(kmax + 1, v), dim=1)  # (n, kmax+1), descending
    out = {}
    for k in ks:
        nbk = nb[:, :k]  # (n, k)
        same = nbk[:, :, None] == nbk[:, None, :]  # (n, k, k)
        first = same.int().argmax(-1)  # (n, k) first slot holding the same token
        is_first = first == torch.arange(k, device=device)  # (n, k)
        hit = (nbk == labels[:, None]) & is_first  # (n, k) the label's (first) slot
        has_label = hit.any(1)  # (n,)
        label_slot = hit.int().argmax(1, keepdim=True)  # (n, 1)
        # Best untouched base token: the first of the top-(k+1) base tokens that no neighbour carries
        # (topk orders equal values arbitrarily; exact float ties in p_LM are the only case this can differ).
        member = (top_i[:, : k + 1, None] == nbk[:, None, :]).any(-1)  # (n, k+1)
        free = (~member).int().argmax(1, keepdim=True)  # (n, 1)
        rest_v = top_v[:, : k + 1].gather(1, free).squeeze(1)  # (n,)
        rest_tok = top_i[:, : k + 1].gather(1, free).squeeze(1)  # (n,)
        for tau in knn_temperatures:
            w = neighbour_weights(distances[:, :k], tau)  # (n, k)
            p_knn = torch.zeros(n, k, dtype=torch.float32, device=device).scatter_add_(1, first, w)  # (n, k) per distinct token
            p_knn_y = torch.where(has_label, p_knn.gather(1, label_slot).squeeze(1), torch.zeros_like(p_lm_y))  # (n,)
            for lam in lambdas:
                lam = float(lam)
                p_t = (lam * p_knn + (1.0 - lam) * p_nb[:, :k]).masked_fill_(~is_first, float("-inf"))  # (n, k)
                best_t = p_t.max(dim=1, keepdim=True).values  # (n, 1)
                best_tok = nbk.masked_fill(p_t != best_t, v).min(dim=1).values  # (n,) ties: smallest id
                best_t = best_t.squeeze(1)
                best_rest = (1.0 - lam) * rest_v  # (n,) = lam * 0 + (1 - lam) * p_LM, the dense value
                wins = (best_t > best_rest) | ((best_t == best_rest) & (best_tok < rest_tok))
                ok = torch.where(wins, best_tok, rest_tok) == labels
                p_y = lam * p_knn_y + (1.0 - lam) * p_lm_y  # (n,)
                out[k, float(tau), lam] = (ok, p_y.clamp_min(KNN_EPS).log())
    return out


def check_knn_temperature(value) -> None:
    """`knn_temperature` divides plain L2 distances in the kNN-LM kernel: a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"knn_temperature must be a finite number > 0 (the kNN-LM weights are softmax(-d / knn_temperature)), "
            f"got {value!r}. Set e.g. `model.config.knn_temperature = 1.0`, or tune it with "
            "`model.tune(val, knn_temperature=[...])`."
        )


__all__ = ["check_knn_temperature", "knn_distribution", "knn_lm_chunk", "knn_lm_outputs"]
