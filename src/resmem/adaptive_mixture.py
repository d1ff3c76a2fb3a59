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

Gate shapes (`config.adaptive_gate`): `"exp"` (default, above) or `"logistic"`,

```
w(x)  = adaptive_lambda_max * sigmoid((adaptive_d0 - d_1) / adaptive_tau)
```

a step of width ~`adaptive_tau` at `d_1 = adaptive_d0`: near-constant weight inside the in-domain distance range and
near zero beyond it, where `exp(-d_1 / tau)` decays by the same factor over every `tau` (the in- and out-of-domain
`d_1` overlap, so a slow decay keeps weight on far text). Call `g = w / adaptive_lambda_max` the gate value.

Prediction (`config.adaptive_prediction`): `"mixture"` (default): `scores = p`, its argmax is the prediction.
`"resmem"`: `scores` = ResMem's own scores where the gate is open (`g >= 1/2`: `d_1 <= adaptive_d0` for the
logistic gate, `d_1 <= adaptive_tau * ln 2` for "exp") and `p` elsewhere, so the prediction is the paper's argmax
(eq. 3) near the memory and the mixture's (about the base's) far from it; `logits` (hence perplexity) are
`log p` in both.
"""

from __future__ import annotations

import math
import numbers

import torch

ADAPTIVE_EPS = 1e-30  # log(p) floor, as in the "mixture" mode
ADAPTIVE_GATES = ("exp", "logistic")
ADAPTIVE_PREDICTIONS = ("mixture", "resmem")


def gate_value(d1: torch.Tensor, tau: float, gate: str = "exp", d0: float = 0.0) -> torch.Tensor:
    """Gate value `g` `(n,)` float32 in [0, 1] from nearest distances `d_1` `(n,)` (inf -> 0; module docstring)."""
    if gate == "logistic":
        return torch.sigmoid((float(d0) - d1.float()) / float(tau))
    return torch.exp(-d1.float() / float(tau))


def adaptive_weight(d1: torch.Tensor, lam_max: float, tau: float, gate: str = "exp", d0: float = 0.0) -> torch.Tensor:
    """Memory weight `lam_max * g` `(n,)` float32 (`g` = `gate_value`; "exp": `lam_max * exp(-d_1 / tau)`)."""
    return gate_value(d1, tau, gate, d0) * float(lam_max)


def gate_open(d1: torch.Tensor, tau: float, gate: str = "exp", d0: float = 0.0) -> torch.Tensor:
    """`(n,)` bool: where `adaptive_prediction="resmem"` takes ResMem's argmax (gate value `g >= 1/2`)."""
    return gate_value(d1, tau, gate, d0) >= 0.5


def adaptive_outputs(scores: torch.Tensor, base_logits: torch.Tensor, d1: torch.Tensor, lam_max: float, tau: float,
                     output_residual: bool = True, gate: str = "exp", d0: float = 0.0, prediction: str = "mixture"):
    """`(scores, logits, residual)` `(n, V)` of the adaptive mixture (module docstring).

    Args:
        scores: `(n, V)` ResMem scores `softmax(f(x) / T) + r_kNN(x)`.
        base_logits: `(n, V)` base logits.
        d1: `(n,)` plain L2 distance of each position to its nearest key (`inf` where nothing was searched).
        lam_max, tau: `adaptive_lambda_max`, `adaptive_tau`.
        gate, d0, prediction: `adaptive_gate`, `adaptive_d0`, `adaptive_prediction` (module docstring).
    Returns:
        `p` (with `prediction="resmem"`: ResMem's `scores` on open rows), `log(max(p, 1e-30))`,
        `p - softmax(f(x))` (or `None`), each `(n, V)` float32.
    """
    p_lm = torch.softmax(base_logits.float(), dim=-1)  # (n, V)
    q = scores.float().clamp_min(0)  # (n, V)
    q = q / q.sum(dim=-1, keepdim=True).clamp_min(ADAPTIVE_EPS)  # (n, V) renormalised, as in "mixture"
    w = adaptive_weight(d1, lam_max, tau, gate, d0).to(p_lm.device).unsqueeze(1)  # (n, 1)
    p = w * q + (1.0 - w) * p_lm  # (n, V)
    logits = p.clamp_min(ADAPTIVE_EPS).log()  # (n, V)
    out = p
    if prediction == "resmem":  # the paper's argmax where the gate is open, the mixture's elsewhere
        out = torch.where(gate_open(d1, tau, gate, d0).to(p.device).unsqueeze(1), scores.float(), p)  # (n, V)
    return out, logits, (p - p_lm) if output_residual else None


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


def check_adaptive_gate(value) -> None:
    """`adaptive_gate`: one of `ADAPTIVE_GATES`."""
    if not isinstance(value, str) or value not in ADAPTIVE_GATES:
        raise ValueError(
            f"adaptive_gate must be one of {ADAPTIVE_GATES} (the memory weight's shape over d_1), got {value!r}. "
            "Set e.g. `model.config.adaptive_gate = \"logistic\"` (with `adaptive_d0`), or tune it with "
            "`model.tune(val, adaptive_gate=[\"exp\", \"logistic\"], adaptive_d0=[...])`."
        )


def check_adaptive_d0(value) -> None:
    """`adaptive_d0`: the logistic gate's midpoint distance, a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"adaptive_d0 must be a finite number >= 0 (the distance d_1 where the logistic gate is half open, in the "
            f"units of sigma), got {value!r}. Set e.g. `model.config.adaptive_d0 = 4.0` (near the in-domain upper "
            "quantile of d_1), or tune it with `model.tune(val, adaptive_gate=[\"logistic\"], adaptive_d0=[...])`."
        )


def check_adaptive_prediction(value) -> None:
    """`adaptive_prediction`: one of `ADAPTIVE_PREDICTIONS`."""
    if not isinstance(value, str) or value not in ADAPTIVE_PREDICTIONS:
        raise ValueError(
            f"adaptive_prediction must be one of {ADAPTIVE_PREDICTIONS} (\"resmem\": ResMem's argmax where the gate is "
            f"open), got {value!r}. Set e.g. `model.config.adaptive_prediction = \"resmem\"`, or tune it with "
            "`model.tune(val, adaptive_prediction=[\"mixture\", \"resmem\"])`."
        )


__all__ = [
    "ADAPTIVE_GATES", "ADAPTIVE_PREDICTIONS", "adaptive_outputs", "adaptive_weight", "check_adaptive_d0",
    "check_adaptive_gate", "check_adaptive_lambda_max", "check_adaptive_prediction", "check_adaptive_tau", "gate_open",
    "gate_value",
]
