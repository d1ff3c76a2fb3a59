"""Hyperparameter search for a causal-LM ResMem: `k`, `sigma` (and the mixture weight) from ONE base pass.

Which hyperparameters are tunable without a rebuild (issue 5):

- `k` and `sigma`: yes. The neighbours are searched once at the largest `k` of the grid and every
  `(k, sigma)` is scored from them ([`resmem.evaluation_lm.evaluate_lm`], which this module reuses:
  there is one grid implementation for LMs).
- `mixture_lambda` (`config.distribution = "mixture"`): yes, it only mixes two distributions already
  computed; the best is the lowest validation perplexity of the mixture at the chosen `(k, sigma)`.
- `temperature` `T`: **no**. The memory stores sparse top-m residuals computed at the build temperature,
  so another `T` needs other residuals. Build one memory per temperature from a single base pass with
  `model.build_memories(data, temperatures)` and pass them to `evaluate_lm(..., memories=...)`.

Selection follows the image tuner: [`resmem.tuning.select_best`] with `objective="accuracy"` or
`"conservative"` (max TPR subject to FPR < `max_fpr`), next-token positions counting as examples.
"""

from __future__ import annotations

import math
import numbers

from .evaluation_lm import evaluate_lm
from .tuning import TuneResult, _check_objective, _grid, select_best, validate_grid


def _lambda_grid(values) -> list[float] | None:
    if values is None:
        return None
    values = _grid(values, "mixture_lambda", None)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"Every mixture_lambda of the grid must be a number in [0, 1]; got {v!r}.")
    return sorted({float(v) for v in values})


def _check_temperatures(temps: list[float], build_temperature: float) -> None:
    if any(not math.isclose(t, build_temperature, rel_tol=1e-6) for t in temps):
        raise ValueError(
            f"The temperature cannot be tuned from a built causal-LM memory: its sparse residuals were computed at "
            f"T={build_temperature:g}, and the grid asks for {temps}. Build one memory per temperature from a single "
            "base pass with `model.build_memories(data, temperatures)` and compare them with "
            "`resmem.evaluation_lm.evaluate_lm(model, val_data, memories=...)`, then `build_memory` at the chosen T; "
            "or leave `temperature` out of the grid."
        )


def tune_lm(
    model,
    val_data,
    tokenizer=None,
    k=None,
    sigma=None,
    mixture_lambda=None,
    objective: str = "accuracy",
    max_fpr: float = 0.05,
    temperature=None,
    text_column: str = "text",
    batch_size: int = 8,
    window: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    set_best: bool = True,
    split: str | None = None,
) -> TuneResult:
    """Grid-search `k`, `sigma` (and `mixture_lambda`) of a [`ResMemForCausalLM`] on validation text.

    Args:
        model: a `ResMemForCausalLM` with a built (or loaded) memory.
        val_data, tokenizer, text_column: as in `build_memory` (text with a tokenizer, or token ids).
        k, sigma: lists of values (a scalar or `None` = the current config value only).
        mixture_lambda: list of mixture weights of the base distribution, or `None` to leave
            `config.mixture_lambda` alone; the best is the lowest mixture perplexity at the chosen `(k, sigma)`.
        objective: `"accuracy"` (next-token accuracy) or `"conservative"` (max TPR with FPR < `max_fpr`).
        temperature: only `None` or the build temperature (see the module docstring).
        window, stride, batch_size, max_tokens: as in [`evaluate_lm`].
        set_best: write the best `k`, `sigma` (and `mixture_lambda`) to `model.config` and record the
            evaluation as the model's latest (shown in its model card). `config.distribution` is not changed.
        split: name of the validation split, recorded with the evaluation.
    Returns:
        [`TuneResult`]: one row per `(k, sigma)` (accuracy, TPR/FPR/Gain, perplexities), `best`,
        JSON via `to_dict()`; `num_examples` counts evaluated token positions.
    """
    _check_objective(objective, max_fpr)
    model._check_ready()
    config = model.config
    build_t = float(model.memory.temperature if model.memory.temperature is not None else config.residual_temperature)
    grid = validate_grid(k, sigma, temperature, len(model.memory), config)
    _check_temperatures(grid["temperature"], build_t)
    grid["temperature"] = [build_t]
    lambdas = _lambda_grid(mixture_lambda)
    results = evaluate_lm(
        model,
        val_data,
        tokenizer,
        text_column,
        ks=grid["k"],
        sigmas=grid["sigma"],
        lambdas=lambdas,
        batch_size=batch_size,
        window=window,
        stride=stride,
        max_tokens=max_tokens,
    )  # grid order: k, then sigma, each ascending (one temperature)
    if not results or results[0]["positions"] == 0:
        raise ValueError("The validation data has no token position with a next token: pass texts of 2+ tokens.")
    rows = []
    for r in results:
        row = dict(r)
        row["temperature"] = build_t
        row["feasible"] = r["fpr"] < max_fpr
        if lambdas is not None:  # evaluate_lm also reports config.mixture_lambda: keep the grid's only
            row["ppl_mixture"] = {str(lam): r["ppl_mixture"][str(lam)] for lam in lambdas}
        rows.append(row)
    best = select_best(rows, objective, max_fpr)
    if lambdas is not None:
        best["mixture_lambda"] = float(min(best["ppl_mixture"].items(), key=lambda item: item[1])[0])
        grid["mixture_lambda"] = lambdas
    result = TuneResult(
        table=rows,
        best=best,
        objective=objective,
        max_fpr=float(max_fpr),
        grid=grid,
        num_examples=int(best["positions"]),
        base_accuracy=rows[0]["base_accuracy"],
    )
    if set_best:
        config.k, config.sigma = best["k"], best["sigma"]
        if lambdas is not None:
            config.mixture_lambda = best["mixture_lambda"]
        from .analysis import record_evaluation

        metrics = {
            "base_accuracy": best["base_accuracy"],
            "resmem_accuracy": best["accuracy"],
            "tpr": best["tpr"],
            "fpr": best["fpr"],
            "gain": best["gain"],
            "num_examples": int(best["positions"]),
            "unit": "token positions",
            "base_ppl": best["base_ppl"],
            "ppl_clamp": best["ppl_clamp"],
        }
        if lambdas is not None:
            metrics["mixture_lambda"] = best["mixture_lambda"]
            metrics["ppl_mixture"] = best["ppl_mixture"][str(best["mixture_lambda"])]
        record_evaluation(model, metrics, dataset=val_data, split=split, source=f"tune ({objective})")
    return result


__all__ = ["tune_lm"]
