"""`evaluate` metrics shipped with resmem-hf, loadable offline by path.

>>> import evaluate
>>> from resmem.metrics import metric_path
>>> accuracy = evaluate.load(metric_path("resmem_accuracy"))   # no Hub access
>>> perplexity = evaluate.load(metric_path("resmem_perplexity"))
"""

from __future__ import annotations

import os

METRICS = ("resmem_accuracy", "resmem_perplexity")


def metric_path(name: str) -> str:
    """Folder of a bundled metric, to pass to `evaluate.load` (works with `HF_HUB_OFFLINE=1`)."""
    if name not in METRICS:
        raise ValueError(f"Unknown resmem metric {name!r}; available: {METRICS}.")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


def load(name: str, **kwargs):
    """`evaluate.load(metric_path(name), **kwargs)` (imports `evaluate`, about 4 s, only when called)."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)


__all__ = ["METRICS", "load", "metric_path"]
