"""Evaluation helpers for ResMem classifiers: batched predictions and the paper's TPR/FPR/Gain split.

Paper sec. 4.2 (Yang et al.): on a test set, TPR is the share of examples the base model gets
wrong and ResMem gets right, FPR the share the base model gets right and ResMem wrong, and
`gain = tpr - fpr = resmem_accuracy - base_accuracy`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .data import image_batches
from .distributed import gather_parts, process_info, shard_batches
from .validation import check_batch_size


@dataclass
class Predictions:
    """Class ids predicted for every example of a dataset, in dataset order.

    Args:
        base: `(N,)` int64, argmax of the base model's logits.
        resmem: `(N,)` int64, argmax of the ResMem scores (paper eq. 3).
        labels: `(N,)` int64, the dataset's labels.
    """

    base: torch.Tensor
    resmem: torch.Tensor
    labels: torch.Tensor


def decompose(base_pred: torch.Tensor, resmem_pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracies and the paper's TPR / FPR / Gain decomposition (sec. 4.2).

    Args:
        base_pred: `(N,)` class ids predicted by the base model.
        resmem_pred: `(N,)` class ids predicted by ResMem.
        labels: `(N,)` true class ids.
    Returns:
        `{"base_accuracy", "resmem_accuracy", "tpr", "fpr", "gain", "num_examples"}`; every rate is a
        share of all N examples, so `gain == resmem_accuracy - base_accuracy` (up to rounding).

    Example:

    ```python
    >>> import torch
    >>> from resmem.evaluation import decompose
    >>> d = decompose(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 0]))
    >>> d["tpr"], d["fpr"], d["gain"]
    (0.25, 0.25, 0.0)
    ```
    """
    base_pred, resmem_pred, labels = (torch.as_tensor(t).reshape(-1) for t in (base_pred, resmem_pred, labels))
    if not (base_pred.shape == resmem_pred.shape == labels.shape):
        raise ValueError(
            f"base_pred, resmem_pred and labels must have the same length, got {base_pred.numel()}, "
            f"{resmem_pred.numel()} and {labels.numel()}."
        )
    n = labels.numel()
    if n == 0:
        raise ValueError("Cannot evaluate on zero examples: pass a non-empty evaluation set.")
    resmem_pred, labels = resmem_pred.to(base_pred.device), labels.to(base_pred.device)
    base_ok = base_pred == labels  # (N,) bool
    resmem_ok = resmem_pred == labels  # (N,) bool
    tpr = (~base_ok & resmem_ok).sum().item() / n
    fpr = (base_ok & ~resmem_ok).sum().item() / n
    return {
        "base_accuracy": base_ok.sum().item() / n,
        "resmem_accuracy": resmem_ok.sum().item() / n,
        "tpr": tpr,
        "fpr": fpr,
        "gain": tpr - fpr,
        "num_examples": n,
    }


def predict(
    model,
    dataset,
    batch_size: int = 256,
    label_column: str = "label",
    image_column: str | None = None,
    image_processor=None,
    transform=None,
    progress: bool = True,
    progress_desc: str = "Evaluating ResMem",
    accelerator=None,
) -> Predictions:
    """Run a ResMem classifier over a dataset in batches; return base and ResMem predictions with the labels.

    Runs in eval mode under `torch.inference_mode()` (the model's train/eval mode is restored
    afterwards); the memory is used as configured on `model.config` (`k`, `sigma`, `temperature`).

    Args:
        model: a [`ResMemForImageClassification`] whose memory has been built or loaded.
        dataset: `datasets.Dataset` / `IterableDataset` with `label_column` and either `pixel_values`
            `(C, H, W)` or images plus `image_processor` / `transform` (as in `build_memory`).
        batch_size: examples per forward pass.
        accelerator: an `accelerate.Accelerator` (or `PartialState`) to split the dataset over its
            processes (detected from `torch.distributed` when omitted): each rank predicts a contiguous
            shard with the full memory, and every rank gets all N predictions in dataset order.
        progress: show a progress bar (also hidden by `transformers.utils.logging.disable_progress_bar()`).
    Returns:
        [`Predictions`] with `base`, `resmem` and `labels`, each `(N,)` int64 on the CPU.

    Example:

    ```python
    >>> from resmem.evaluation import decompose, predict
    >>> preds = predict(model, test_dataset, batch_size=256)
    >>> decompose(preds.base, preds.resmem, preds.labels)["gain"]
    ```
    """
    check_batch_size(batch_size)
    info = process_info(accelerator)
    make_batches = functools.partial(
        image_batches, batch_size=batch_size, label_column=label_column, image_column=image_column,
        image_processor=image_processor, transform=transform,
    )
    from .distributed import DistributedBuild

    base, resmem, labels = [], [], []
    was_training = model.training
    model.eval()
    # Same data on every process (checked first); the gathers exchange ok/error flags, so none is left waiting.
    with DistributedBuild(info, dataset, what="evaluation") as build:
        try:
            with torch.inference_mode():
                batches, _ = shard_batches(dataset, info, make_batches, batch_size, progress_desc, progress)
                for batch in batches:
                    out = model(pixel_values=batch.pixel_values.to(model.device, model.dtype))
                    base.append(out.base_logits.argmax(dim=-1).cpu())  # (B,)
                    resmem.append(out.scores.argmax(dim=-1).cpu())  # (B,)
                    labels.append(batch.labels)  # (B,)
        finally:
            model.train(was_training)
        parts = [None if p is None else p.cpu() for p in gather_parts([base, resmem, labels], info, build)]
    return Predictions(*parts)



def results_markdown(title: str, rows: list[tuple[str, dict]], paper: dict | None = None) -> str:
    """A markdown table of `decompose` results, one row per split, optionally with the paper's row.

    Args:
        rows: `(name, decompose(...) dict)` pairs.
        paper: `{"dataset", "model", "base_accuracy", "resmem_accuracy"}` of the published result.
    """
    lines = [f"### {title}", "", "| split | DeepNet acc | ResMem acc | TPR | FPR | Gain |", "|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['base_accuracy']:.2%} | {r['resmem_accuracy']:.2%} | {r['tpr']:.2%} | "
            f"{r['fpr']:.2%} | {r['gain']:+.2%} |"
        )
    if paper:
        lines.append(
            f"| paper ({paper['dataset']}, {paper['model']}) | {paper['base_accuracy']:.2%} | "
            f"{paper['resmem_accuracy']:.2%} | - | - | {paper['resmem_accuracy'] - paper['base_accuracy']:+.2%} |"
        )
    return "\n".join(lines) + "\n"

__all__ = ["Predictions", "decompose", "predict", "results_markdown"]
