"""Distance-adaptive mixture of a causal-LM ResMem with its base model (`config.distribution = "adaptive"`).

A fixed mixture weight tuned on in-domain text is too large where the memory does not match the text (another
domain): the neighbours are far, their residuals are noise, and the mixture then costs perplexity. As in adaptive
retrieval LMs (e.g. He et al. 2021, "Efficient Nearest Neighbor Language Models"; Drozdov et al. 2022), the
memory's weight here depends on each position's distance to its nearest key:

```
d_1   = min_i ||phi(x) - z_i||_2                                   # plain L2, as the memory's search returns
w(x)  = adaptive_lambda_max * exp(-d_1 / adaptive_tau)             # memory weight, in [0, lam_max]
q(v)  = max(s_v, 0) / sum_u max(s_u, 0)                           # s = ResMem scores (the "mixture" mode's q)
p(v)  = w(x) * q(v) + (1 - w(x)) * softmax(f(x))_v                 # base at temperature 1
```

`scores = p` (its argmax is the prediction, so far from the memory the prediction is the base's), `logits =
log(max(p, 1e-30))`, `residual = p - softmax(f(x))`. Positions without a search (padding) and positions whose
nearest key is far (`d_1 / adaptive_tau` large) get the base distribution: `w -> 0`.

Note the direction: `adaptive_lambda_max` is the weight of the *memory* side (in `"mixture"`, `mixture_lambda`
is the base's weight).
"""

from __future__ import annotations

import math
import numbers

import torch

ADAPTIVE_EPS = 1e-30  # log(p) floor, as in the "mixture" mode


def adaptive_weight(d1: torch.Tensor, lam_max: float, tau: float) -> torch.Tensor:
    """Memory weight `lam_max * exp(-d_1 / tau)` `(n,)` float32 from nearest distances `d_1` `(n,)` (inf -> 0)."""
    return torch.exp(-d1.float() / float(tau)) * float(lam_max)


def adaptive_outputs(scores: torch.Tensor, base_logits: torch.Tensor, d1: torch.Tensor, lam_max: float, tau: float,
                     output_residual: bool = True):
    """`(scores, logits, residual)` `(n, V)` of the adaptive mixture (module docstring).

    Args:
        scores: `(n, V)` ResMem scores `softmax(f(x) / T) + r_kNN(x)`.
        base_logits: `(n, V)` base logits.
        d1: `(n,)` plain L2 distance of each position to its nearest key (`inf` where nothing was searched).
        lam_max, tau: `adaptive_lambda_max`, `adaptive_tau`.
    Returns:
        `p`, `log(max(p, 1e-30))`, `p - softmax(f(x))` (or `None`), each `(n, V)` float32.
    """
    p_lm = torch.softmax(base_logits.float(), dim=-1)  # (n, V)
    q = scores.float().clamp_min(0)  # (n, V)
    q = q / q.sum(dim=-1, keepdim=True).clamp_min(ADAPTIVE_EPS)  # (n, V) renormalised, as in "mixture"
    w = adaptive_weight(d1, lam_max, tau).to(p_lm.device).unsqueeze(1)  # (n, 1)
    p = w * q + (1.0 - w) * p_lm  # (n, V)
    logits = p.clamp_min(ADAPTIVE_EPS).log()  # (n, V)
    return p, logits, (p - p_lm) if output_residual else None


def check_adaptive_lambda_max(value) -> None:
    """`adaptive_lambda_max`: the largest memory weight, a finite number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(
            f"adaptive_lambda_max must be a number in [0, 1] (the memory's weight at distance 0), got {value!r}. "
            "Set e.g. `model.config.adaptive_lambda_max = 0.5`, or tune it with `model.tune(val, adaptive_lambda_max=[...])`."
        )


def check_adaptive_tau(value) -> None:
    """`adaptive_tau`: the distance scale of `exp(-d_1 / adaptive_tau)`, a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"adaptive_tau must be a finite number > 0 (the memory weight is adaptive_lambda_max * exp(-d_1 / adaptive_tau)), "
            f"got {value!r}. Set e.g. `model.config.adaptive_tau = 1.0`, or tune it with `model.tune(val, adaptive_tau=[...])`."
        )


__all__ = ["adaptive_outputs", "adaptive_weight", "check_adaptive_lambda_max", "check_adaptive_tau"]
