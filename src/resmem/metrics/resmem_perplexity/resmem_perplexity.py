"""Perplexity from per-token log-probabilities, as an offline `evaluate` metric (no model download).

Unlike the Hub's `perplexity` metric (which downloads a model and runs it), this one takes the
log-probability each model assigned to the true next token, so it scores any ResMem mode
(clamped scores, mixture with the base, ...) and the base model side by side.
Load it by path: `evaluate.load(resmem.metrics.metric_path("resmem_perplexity"))`.
Every import below is on its own line: `evaluate` parses this file's imports.
"""

import math

import datasets
import evaluate
from resmem.scoring import decompose
from resmem.scoring import perplexity

_DESCRIPTION = """
Perplexity exp(-mean log p(true token)) over all scored tokens, and next-token accuracy when the
predicted token ids are given.
"""

_KWARGS_DESCRIPTION = """
Args:
    log_probs (`list[float]`): natural-log probability of the true next token, one per scored position.
    base_log_probs (`list[float]`, optional keyword of `compute`): the same under the base model.
    predicted_ids, target_ids (`list[int]`, optional keywords of `compute`): predicted and true token ids.
Returns:
    perplexity, mean_log_prob, num_tokens; base_perplexity with `base_log_probs`;
    accuracy (next-token) with `predicted_ids` and `target_ids`.
Example:
    >>> metric = evaluate.load(resmem.metrics.metric_path("resmem_perplexity"))
    >>> metric.compute(log_probs=[math.log(0.5), math.log(0.25)])["perplexity"]   # 2 ** 1.5
    2.828...
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ResmemPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"log_probs": datasets.Value("float64")}),
        )

    def _compute(self, log_probs, base_log_probs=None, predicted_ids=None, target_ids=None):
        n = len(log_probs)
        if n == 0:
            raise ValueError("resmem_perplexity needs at least one scored token.")
        if any(lp > 1e-9 or math.isnan(lp) for lp in log_probs):
            raise ValueError("log_probs must be natural-log probabilities (<= 0, not NaN).")
        total = sum(log_probs)
        result = {"perplexity": perplexity(-total, n), "mean_log_prob": total / n, "num_tokens": n}
        if base_log_probs is not None:
            if len(base_log_probs) != n:
                raise ValueError(f"base_log_probs has {len(base_log_probs)} entries but log_probs has {n}.")
            result["base_perplexity"] = perplexity(-sum(base_log_probs), n)
        if predicted_ids is not None and target_ids is not None:
            if not len(predicted_ids) == len(target_ids) > 0:
                raise ValueError("predicted_ids and target_ids must be non-empty and of the same length.")
            result["accuracy"] = decompose(predicted_ids, predicted_ids, target_ids)["resmem_accuracy"]
        return result
