"""Hyperparameter search for a causal-LM ResMem: `k`, `sigma` (and the mixture weight) from ONE base pass.

Which hyperparameters are tunable without a rebuild:

- `k` and `sigma`: yes. The neighbours are searched once at the largest `k` of the grid and every
  `(k, sigma)` is scored from them ([`resmem.evaluation_lm.evaluate_lm`], which this module reuses:
  there is one grid implementation for LMs).
- `mixture_lambda` (`config.distribution = "mixture"`): yes, it only mixes two distributions already
  computed; the best is the lowest validation perplexity of the mixture at the chosen `(k, sigma)`.
- the distribution mode (`config.distribution`): at the chosen `(k, sigma)`, `tune` sets whichever of
  `"clamp"` and `"mixture"` (at its best `lam`) has the lower validation perplexity, so the saved model's
  `logits` are the better distribution (clamped scores alone are often several times worse than the base).
- the kNN-LM (`config.distribution = "knn-lm"`, [`resmem.knn_lm`]): `knn_temperature` and its `lam` (the weight of
  `p_kNN`) from the same neighbours, at the chosen `k`; it is set when its validation perplexity is the lowest
  of the three modes. Opt-in (`knn_temperature=[...]` or `"sigma"`), because the kNN-LM's argmax replaces
  ResMem's when it is chosen (by perplexity, not by the accuracy `tune` optimises), and so that `tune`'s default
  stays what it was; a model already in the `"knn-lm"` mode keeps it in the running by default. `"sigma"` reuses
  the `sigma` grid: both divide the same plain L2 distances, so the same scale fits (`sigma="auto"` gives
  multiples of `model.sigma_scale()`), while the two are tuned separately (ResMem's `sigma` by accuracy, the
  kNN-LM's temperature by perplexity).
- the adaptive mixture (`config.distribution = "adaptive"`, [`resmem.adaptive_mixture`]): `adaptive_lambda_max` and
  `adaptive_tau` from the same neighbours (the nearest distance), at the chosen `(k, sigma)`; set when its validation
  perplexity is the lowest of the modes. On by default (lam_max grid `DEFAULT_ADAPTIVE_LAMBDAS`, tau grid = the
  `sigma` grid: both divide the same plain L2 distances); `adaptive_lambda_max=[]` turns it off, and so does
  `mixture_lambda=[]` unless an adaptive grid is given. Gate shapes (`adaptive_gate=["exp", "logistic"]`, default the
  config's only) and the logistic midpoints (`adaptive_d0=[...]`, default the config's only) join the same grid and
  the same perplexity criterion. `adaptive_prediction=["mixture", "resmem"]` (default the config's only) then picks,
  at the chosen gate, the prediction with the higher validation accuracy (perplexity does not depend on it; ties
  keep the first listed).
- `temperature` `T`: **no**. The memory stores sparse top-m residuals computed at the build temperature,
  so another `T` needs other residuals. Build one memory per temperature from a single base pass with
  `model.build_memories(data, temperatures)` and pass them to `evaluate_lm(..., memories=...)`.

Selection follows the image tuner: [`resmem.tuning.select_best`] with `objective="accuracy"` or
`"conservative"` (max TPR subject to FPR < `max_fpr`), next-token positions counting as examples.
"""

from __future__ import annotations

import math
import numbers

from .evaluation_lm import DEFAULT_LAMBDAS, adaptive_entries, evaluate_lm
from .tuning import TuneResult, _check_objective, _grid, auto_sigma, mark_sigma_scale, select_best, validate_grid


def _lambda_grid(values) -> list[float]:
    """The mixture weights to try: `None` = `DEFAULT_LAMBDAS`; `[]` = none (the clamp distribution only)."""
    if values is None:
        values = list(DEFAULT_LAMBDAS)
    elif isinstance(values, (list, tuple)) and len(values) == 0:
        return []
    values = _grid(values, "mixture_lambda", None)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"Every mixture_lambda of the grid must be a number in [0, 1]; got {v!r}.")
    return sorted({float(v) for v in values})


def _knn_temperature_grid(values, sigmas) -> list[float]:
    """The kNN-LM temperatures to try: `"sigma"` = the `sigma` grid (same distance units); `None` or `[]` = none."""
    if isinstance(values, str) and values == "sigma":
        return sorted({float(s) for s in sigmas})
    if values is None or (isinstance(values, (list, tuple)) and len(values) == 0):
        return []
    from .knn_lm import check_knn_temperature

    values = _grid(values, "knn_temperature", None)
    for v in values:
        check_knn_temperature(v)
    return sorted({float(v) for v in values})


DEFAULT_ADAPTIVE_LAMBDAS = (0.25, 0.5, 0.75, 1.0)


def _adaptive_grid(lambdas_max, taus, sigmas, mixture_lambdas, gates=("exp",), d0s=(0.0,)) -> list[tuple]:
    """The `(adaptive_lambda_max, adaptive_tau, gate, d0)` settings to try (module docstring for the defaults; d0 is 0
    for the "exp" gate, which ignores it)."""
    from .adaptive_mixture import check_adaptive_d0, check_adaptive_gate, check_adaptive_lambda_max, check_adaptive_tau

    if lambdas_max is None and not mixture_lambdas:
        return []
    if lambdas_max is None:
        lambdas_max = list(DEFAULT_ADAPTIVE_LAMBDAS)
    elif isinstance(lambdas_max, (list, tuple)) and len(lambdas_max) == 0:
        return []
    if taus is None or (isinstance(taus, str) and taus == "sigma"):
        taus = list(sigmas)
    lambdas_max, taus = _grid(lambdas_max, "adaptive_lambda_max", None), _grid(taus, "adaptive_tau", None)
    for v in lambdas_max:
        check_adaptive_lambda_max(v)
    for v in taus:
        check_adaptive_tau(v)
    gates = _grid([gates] if isinstance(gates, str) else gates, "adaptive_gate", None)
    d0s = _grid(d0s, "adaptive_d0", None)
    for v in gates:
        check_adaptive_gate(v)
    for v in d0s:
        check_adaptive_d0(v)
    keys = set()
    for gate in gates:
        for lm in lambdas_max:
            for tau in taus:
                keys.update((float(lm), float(tau), gate, float(d0) if gate != "exp" else 0.0) for d0 in d0s)
    return sorted(keys)


def _prediction_grid(values, config) -> list[str]:
    """The `adaptive_prediction` values to try: `None` = the config's only."""
    from .adaptive_mixture import check_adaptive_prediction

    values = [values] if isinstance(values, str) else values
    values = [config.adaptive_prediction] if values is None else _grid(values, "adaptive_prediction", None)
    for v in values:
        check_adaptive_prediction(v)
    return list(dict.fromkeys(values))


def _choose_adaptive(best: dict, predictions=("mixture",)) -> None:
    """Set the adaptive mixture as `best`'s distribution if its best `(lam_max, tau, gate, d0)` has a lower validation
    perplexity than the mode chosen so far; its prediction (of `predictions`, the most accurate on validation) then is
    the model's (ResMem's rates kept as `resmem_scores_*`)."""
    (lm, tau, gate, d0), row = min(adaptive_entries(best), key=lambda item: item[1]["ppl"])
    prefix = {"mixture": "", "resmem": "gated_"}
    prediction = max(predictions, key=lambda p: row[prefix[p] + "accuracy"])  # ties: the first listed
    chosen = {"adaptive_lambda_max": lm, "adaptive_tau": tau, "adaptive_gate": gate, "adaptive_d0": d0,
              "adaptive_prediction": prediction}
    best["adaptive_best"] = {**chosen, **row}
    if row["ppl"] < best["ppl"]:
        for key in ("accuracy", "tpr", "fpr", "gain"):
            best[f"resmem_scores_{key}"] = best[key]
            best[key] = row[prefix[prediction] + key]
        best.update(distribution="adaptive", ppl=row["ppl"], **chosen)


def _choose_knn_lm(best: dict) -> None:
    """Set the kNN-LM as `best`'s distribution if its best `(knn_temperature, lam)` at `best`'s `k` has a lower
    validation perplexity than the mode chosen so far. The kNN-LM's argmax then is the prediction, so `best`'s
    accuracy, TPR, FPR and Gain become the kNN-LM's (ResMem's are kept as `resmem_scores_*`)."""
    (tau, lam), knn = min(
        (((float(tau), float(lam)), row) for tau, by_lam in best["knn_lm"].items() for lam, row in by_lam.items()),
        key=lambda item: item[1]["ppl"],
    )
    best["knn_lm_best"] = {"knn_temperature": tau, "mixture_lambda": lam, **knn}
    if knn["ppl"] < best["ppl"]:
        for key in ("accuracy", "tpr", "fpr", "gain"):
            best.setdefault(f"resmem_scores_{key}", best[key])  # ResMem's scores' rates (kept if "adaptive" set them)
            best[key] = knn[key]
        best.update(distribution="knn-lm", ppl=knn["ppl"], mixture_lambda=lam, knn_temperature=tau)


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
    progress: bool = True,
    knn_temperature=None,
    adaptive_lambda_max=None,
    adaptive_tau=None,
    adaptive_gate=None,
    adaptive_d0=None,
    adaptive_prediction=None,
) -> TuneResult:
    """Grid-search `k`, `sigma`, the mixture weight and the distribution mode of a [`ResMemForCausalLM`].

    `(k, sigma)` is chosen by `objective` (next-token accuracy); then, at that `(k, sigma)`, the distribution
    mode with the lower validation perplexity: `"clamp"` (clamped, renormalised scores) or `"mixture"` with
    the best `mixture_lambda` of the grid.

    Args:
        model: a `ResMemForCausalLM` with a built (or loaded) memory.
        val_data, tokenizer, text_column: as in `build_memory` (text with a tokenizer, or token ids).
        k, sigma: lists of values (a scalar or `None` = the current config value only). A `k` larger than
            the memory is clamped to its size with the forward pass's warning. `sigma="auto"`:
            `model.sigma_scale(val_data) * (0.25, 0.5, 1, 2, 4)` (one extra base pass over the validation text).
        mixture_lambda: mixture weights of the base distribution to try (default `None` =
            `resmem.evaluation_lm.DEFAULT_LAMBDAS`); `[]` tries none, so the clamp distribution is chosen. The
            kNN-LM tries the same values as its weight of `p_kNN`.
        knn_temperature: kNN-LM temperatures to try (a list, or `"sigma"` = the `sigma` grid); `None` (default) =
            none, unless `config.distribution == "knn-lm"`, then the `sigma` grid; `[]` = none.
        adaptive_lambda_max, adaptive_tau: the adaptive mixture's grid (module docstring; defaults
            `DEFAULT_ADAPTIVE_LAMBDAS` and the `sigma` grid; `adaptive_lambda_max=[]` = none).
        adaptive_gate, adaptive_d0, adaptive_prediction: the gate shapes, logistic midpoints and predictions to try
            (module docstring; default: the config's value only, so the default search is unchanged).
        objective: `"accuracy"` (next-token accuracy) or `"conservative"` (max TPR with FPR < `max_fpr`).
        temperature: only `None` or the build temperature (see the module docstring).
        window, stride, batch_size, max_tokens: as in [`evaluate_lm`].
        set_best: write the best `k`, `sigma`, `distribution` (and `mixture_lambda` when it is `"mixture"` or
            `"knn-lm"`, `knn_temperature` when it is `"knn-lm"`) to
            `model.config` and record the evaluation (with the chosen distribution's perplexity as `ppl`) as the
            model's latest (shown in its model card).
        split: name of the validation split, recorded with the evaluation.
        progress: show progress bars (also hidden by `transformers.utils.logging.disable_progress_bar()`).
    Returns:
        [`TuneResult`]: one row per `(k, sigma)` (accuracy, TPR/FPR/Gain, perplexities), `best` (with
        `distribution`, `ppl` = its perplexity, and `mixture_lambda` when a grid was tried), JSON via
        `to_dict()`; `num_examples` counts evaluated token positions.
    """
    _check_objective(objective, max_fpr)
    model._check_ready()
    config = model.config
    build_t = float(model.memory.temperature if model.memory.temperature is not None else config.residual_temperature)
    read = dict(tokenizer=tokenizer, text_column=text_column, batch_size=batch_size, window=window, stride=stride)
    sigma, scale = auto_sigma(model, val_data, sigma, max_tokens=max_tokens, progress=progress, **read)
    grid = validate_grid(k, sigma, temperature, len(model.memory), config, model.memory)
    _check_temperatures(grid["temperature"], build_t)
    grid["temperature"] = [build_t]
    lambdas = _lambda_grid(mixture_lambda)
    if knn_temperature is None and config.distribution == "knn-lm":
        knn_temperature = "sigma"
    knn_temps = _knn_temperature_grid(knn_temperature, grid["sigma"]) if lambdas else []
    adaptive = _adaptive_grid(
        adaptive_lambda_max, adaptive_tau, grid["sigma"], lambdas,
        [config.adaptive_gate] if adaptive_gate is None else adaptive_gate,
        [config.adaptive_d0] if adaptive_d0 is None else adaptive_d0,
    )
    predictions = _prediction_grid(adaptive_prediction, config)
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
        progress=progress,
        knn_temperatures=knn_temps,
        adaptive=adaptive,
    )  # grid order: k, then sigma, each ascending (one temperature)
    if not results or results[0]["positions"] == 0:
        raise ValueError("The validation data has no token position with a next token: pass texts of 2+ tokens.")
    rows = []
    for r in results:
        row = dict(r)
        row["temperature"] = build_t
        row["feasible"] = r["fpr"] < max_fpr
        # evaluate_lm also reports DEFAULT_LAMBDAS and config.mixture_lambda: keep the grid's only
        row["ppl_mixture"] = {str(lam): r["ppl_mixture"][str(lam)] for lam in lambdas}
        if knn_temps:
            row["knn_lm"] = {tau: {str(lam): r["knn_lm"][tau][str(lam)] for lam in lambdas} for tau in r["knn_lm"]}
        rows.append(row)
    mark_sigma_scale(rows, grid, scale)
    best = select_best(rows, objective, max_fpr)
    grid["mixture_lambda"] = lambdas
    best["distribution"], best["ppl"] = "clamp", best["ppl_clamp"]
    if lambdas:
        best["mixture_lambda"] = float(min(best["ppl_mixture"].items(), key=lambda item: item[1])[0])
        mixture_ppl = best["ppl_mixture"][str(best["mixture_lambda"])]
        if mixture_ppl < best["ppl_clamp"]:
            best["distribution"], best["ppl"] = "mixture", mixture_ppl
    grid["adaptive"] = [list(key) for key in adaptive]
    grid["adaptive_prediction"] = predictions
    if adaptive:
        _choose_adaptive(best, predictions)
    grid["knn_temperature"] = knn_temps
    if knn_temps:
        _choose_knn_lm(best)
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
        if best["distribution"] == "mixture":
            config.mixture_lambda = best["mixture_lambda"]
        if best["distribution"] == "knn-lm":
            config.mixture_lambda, config.knn_temperature = best["mixture_lambda"], best["knn_temperature"]
        if best["distribution"] == "adaptive":
            config.adaptive_lambda_max, config.adaptive_tau = best["adaptive_lambda_max"], best["adaptive_tau"]
            config.adaptive_gate, config.adaptive_prediction = best["adaptive_gate"], best["adaptive_prediction"]
            if best["adaptive_gate"] != "exp":  # "exp" ignores d0: keep the config's
                config.adaptive_d0 = best["adaptive_d0"]
            if "mixture_lambda" in best:  # unused by "adaptive"; kept so that distribution="mixture" is the tuned one
                config.mixture_lambda = best["mixture_lambda"]
        config.distribution = best["distribution"]
        from .records import record_evaluation

        metrics = {
            "base_accuracy": best["base_accuracy"],
            "resmem_accuracy": best["accuracy"],
            "tpr": best["tpr"],
            "fpr": best["fpr"],
            "gain": best["gain"],
            "num_examples": int(best["positions"]),
            "unit": "token positions",
            "base_ppl": best["base_ppl"],
            "ppl": best["ppl"],  # of the distribution set on the config
            "distribution": best["distribution"],
            "ppl_clamp": best["ppl_clamp"],
        }
        if best["distribution"] == "mixture":
            metrics["mixture_lambda"] = best["mixture_lambda"]
            metrics["ppl_mixture"] = best["ppl"]
        if best["distribution"] == "knn-lm":  # the kNN-LM's argmax is the model's prediction now
            metrics.update(resmem_accuracy=best["accuracy"], mixture_lambda=best["mixture_lambda"],
                           knn_temperature=best["knn_temperature"])
        if best["distribution"] == "adaptive":  # the adaptive mixture's argmax is the model's prediction now
            metrics.update(adaptive_lambda_max=best["adaptive_lambda_max"], adaptive_tau=best["adaptive_tau"])
            if best["adaptive_gate"] != "exp" or best["adaptive_prediction"] != "mixture":  # as records name them
                metrics.update(adaptive_gate=best["adaptive_gate"], adaptive_prediction=best["adaptive_prediction"])
                if best["adaptive_gate"] != "exp":
                    metrics["adaptive_d0"] = best["adaptive_d0"]
        record_evaluation(model, metrics, dataset=val_data, split=split, source=f"tune ({objective})")
    return result
