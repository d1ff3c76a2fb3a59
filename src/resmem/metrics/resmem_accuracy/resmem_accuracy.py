"""ResMem accuracy with the paper's TPR / FPR / Gain decomposition, as an offline `evaluate` metric.

Load it by path (no Hub access): `evaluate.load(resmem.metrics.metric_path("resmem_accuracy"))`.
Every import below is on its own line: `evaluate` parses this file's imports.
"""

import datasets
import evaluate
from resmem.scoring import decompose

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
        if base_predictions is None:  # accuracy only: the base side is ResMem itself (no TPR / FPR to report)
            rates = decompose(predictions, predictions, references)
            return {"accuracy": rates["resmem_accuracy"], "num_examples": n}
        if len(base_predictions) != n:
            raise ValueError(f"base_predictions has {len(base_predictions)} entries but there are {n} references.")
        rates = decompose(base_predictions, predictions, references)  # resmem.scoring: the one implementation
        return {
            "accuracy": rates["resmem_accuracy"],
            "base_accuracy": rates["base_accuracy"],
            "tpr": rates["tpr"],
            "fpr": rates["fpr"],
            "gain": rates["gain"],
            "num_examples": n,
        }
