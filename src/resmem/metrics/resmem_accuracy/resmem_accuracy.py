"""ResMem accuracy with the paper's TPR / FPR / Gain decomposition, as an offline `evaluate` metric.

Load it by path (no Hub access): `evaluate.load(resmem.metrics.metric_path("resmem_accuracy"))`.
Every import below is on its own line: `evaluate` parses this file's imports.
"""

import datasets
import evaluate

_DESCRIPTION = """
Accuracy of ResMem predictions and, given the base model's predictions, the decomposition of
Yang et al. (sec. 4.2): TPR = share of examples the base model gets wrong and ResMem right,
FPR = share the base model gets right and ResMem wrong, gain = TPR - FPR
= ResMem accuracy - base accuracy. All rates are shares of all examples.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): ResMem class ids (argmax of the scores).
    references (`list[int]`): true class ids.
    base_predictions (`list[int]`, optional keyword of `compute`): the base model's class ids.
Returns:
    accuracy; with `base_predictions` also base_accuracy, tpr, fpr, gain.
Example:
    >>> metric = evaluate.load(resmem.metrics.metric_path("resmem_accuracy"))
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 0, 1], base_predictions=[1, 0, 1])
    {'accuracy': 0.666..., 'base_accuracy': 0.666..., 'tpr': 0.333..., 'fpr': 0.333..., 'gain': 0.0, 'num_examples': 3}
"""

_CITATION = """
@inproceedings{yang2023resmem,
  title={ResMem: Learn what you can and memorize the rest},
  author={Yang, Zitong and Lukasik, Michal and Nagarajan, Vaishnavh and Li, Zonglin and Rawat, Ankit Singh and Zaheer, Manzil and Menon, Aditya Krishna and Kumar, Sanjiv},
  booktitle={NeurIPS},
  year={2023}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ResmemAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, base_predictions=None):
        n = len(references)
        if n == 0:
            raise ValueError("resmem_accuracy needs at least one example.")
        resmem_ok = [int(p) == int(r) for p, r in zip(predictions, references)]
        result = {"accuracy": sum(resmem_ok) / n}
        if base_predictions is not None:
            if len(base_predictions) != n:
                raise ValueError(f"base_predictions has {len(base_predictions)} entries but there are {n} references.")
            base_ok = [int(p) == int(r) for p, r in zip(base_predictions, references)]
            fixed = sum(1 for b, m in zip(base_ok, resmem_ok) if m and not b)
            broken = sum(1 for b, m in zip(base_ok, resmem_ok) if b and not m)
            result.update(base_accuracy=sum(base_ok) / n, tpr=fixed / n, fpr=broken / n, gain=(fixed - broken) / n)
        result["num_examples"] = n
        return result
