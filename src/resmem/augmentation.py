"""Memory variants for image classifiers: out-of-sample residuals and horizontally flipped copies.

Out-of-sample residuals (`model.build_memory(train, residual_model=other)`): the memory's keys come from the
wrapped base as always, but the stored logits, hence the residuals `onehot(y_i) - softmax(g(x_i) / T)`, come
from another model `g` with the same classes, e.g. an earlier checkpoint of the base or a model fitted on the
other half of the data. A base that fitted its training set has residuals near 0 on it; `g` did not (or less),
so its residuals say more about what the base gets wrong on *unseen* points. What `g` was is recorded on
`config.memory_dataset["residual_model"]` (class, name_or_path, weights fingerprint) and shown in the model
card; `add_to_memory` refuses to add entries unless the same `g` is passed again.

Augmented memory (`model.build_memory(train, augment="hflip")`, `config.memory_augmentation`): every
training image gives two entries, its own and that of its horizontally flipped copy (keys and logits of the
base, or of `residual_model`, on `torch.flip(pixel_values, [-1])`; same label). Both entries carry the
source example's id, so `remove_from_memory([i])` forgets both and `explain` points the flipped entry at its
source row; the memory then allows each id twice (`views_per_example`), recorded in the memory file.

Query-time augmentation (`config.query_augmentation = "hflip"`): the residual is the mean of the residuals of
the query and of its flipped copy, `r(x) = (r_kNN(x) + r_kNN(flip(x))) / 2`, from ONE search of the `2B`
queries; the base probability `softmax(f(x) / T)` is the unflipped query's only.
"""

from __future__ import annotations

import torch

AUGMENTATIONS = ("none", "hflip")
# Entries one source example gives in a memory built with each augmentation.
VIEWS_PER_EXAMPLE = {"none": 1, "hflip": 2}


def check_augmentation(value, name: str, task: str | None = None) -> None:
    """`ValueError` naming the fix unless `value` is one of `AUGMENTATIONS` (and the task has pixels to flip)."""
    if value not in AUGMENTATIONS:
        raise ValueError(f"{name} must be one of {AUGMENTATIONS}, got {value!r}. Use e.g. `{name}=\"hflip\"` or \"none\".")
    if value != "none" and task is not None and task != "image-classification":
        raise ValueError(
            f"{name}={value!r} flips pixel_values, so it applies to image classifiers only (this model's task is "
            f"{task!r}): set it to \"none\"."
        )


def views_per_example(augmentation: str | None) -> int:
    """How many memory entries may share one source example id under `augmentation`."""
    return VIEWS_PER_EXAMPLE.get(augmentation or "none", 1)


def hflip(pixel_values: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of `(B, C, H, W)` pixels (the width axis, the last one): `torch.flip(x, [-1])`.

    Applied to the preprocessed tensor; equal to flipping the image first whenever preprocessing commutes with a
    horizontal flip (resize, centre crop, per-channel normalisation do).
    """
    if pixel_values.dim() != 4:
        raise ValueError(f"hflip expects pixel_values of shape (B, C, H, W), got {tuple(pixel_values.shape)}.")
    return torch.flip(pixel_values, dims=[-1])


# ------------------------------------------------------------------ residual models
def check_residual_model(residual_model, base) -> None:
    """A `ValueError` naming the fix unless `residual_model` is a model with the base's number of labels."""
    if not isinstance(residual_model, torch.nn.Module):
        raise ValueError(
            f"residual_model must be a classifier (a torch module returning `.logits`), got {type(residual_model).__name__}: "
            "pass e.g. `AutoModelForImageClassification.from_pretrained(earlier_checkpoint)`."
        )
    if getattr(getattr(residual_model, "config", None), "model_type", None) == "resmem":  # its logits hold a memory's
        raise ValueError("residual_model is a ResMem model: pass a plain classifier (e.g. `other_resmem_model.base`).")
    theirs = getattr(getattr(residual_model, "config", None), "num_labels", None)
    ours = base.config.num_labels
    if theirs is not None and theirs != ours:
        raise ValueError(
            f"residual_model has {theirs} labels but the base model has {ours}: its logits must score the same classes "
            "(e.g. an earlier checkpoint of the same base)."
        )


def describe_residual_model(residual_model) -> dict:
    """What identifies a residual model, JSON-safe: class, name_or_path and the weights fingerprint."""
    from .hub import base_fingerprint

    name = getattr(residual_model, "name_or_path", None) or getattr(getattr(residual_model, "config", None), "_name_or_path", None)
    return {"class": type(residual_model).__name__, "name_or_path": name or "", "fingerprint": base_fingerprint(residual_model)}


def residual_models(residual_model, residual_fold, base) -> list | None:
    """`residual_model` as a checked list (`None` when absent); several models need `residual_fold` (a column name).

    One model gives every row's residual; a list `[g_0, g_1, ...]` cross-fits: row r gets `g_{fold[r]}`'s logits,
    `fold` the integer column `residual_fold` of the data (e.g. 0 for the rows `g_1` was fitted on, 1 for `g_0`'s).
    """
    if residual_model is None:
        if residual_fold is not None:
            raise ValueError("residual_fold names the fold column of a cross-fitted residual_model=[model_a, model_b]: "
                             "pass the models too, or drop residual_fold.")
        return None
    models = list(residual_model) if isinstance(residual_model, (list, tuple)) else [residual_model]
    if not models:
        raise ValueError("residual_model=[] holds no model: pass one model, a list of models with residual_fold=, or None.")
    for model in models:
        check_residual_model(model, base)
    if len(models) > 1 and not isinstance(residual_fold, str):
        raise ValueError(
            f"residual_model holds {len(models)} models (cross-fitting): name the data's integer column that says which "
            "model each row's residual comes from, e.g. `residual_fold=\"fold\"` (values 0.."
            f"{len(models) - 1})."
        )
    if len(models) == 1 and residual_fold is not None:
        raise ValueError("residual_fold applies to a list of several residual models (cross-fitting); with one "
                         "residual_model drop residual_fold.")
    return models


def read_folds(dataset, column: str, num_models: int) -> torch.Tensor:
    """`(N,)` int64 fold of every row of a map-style `dataset` (column `column`), each in `[0, num_models)`."""
    names = getattr(dataset, "column_names", None)
    if names is None or not hasattr(dataset, "with_format"):
        raise ValueError("Cross-fitted residuals read the fold of every row up front: pass a map-style "
                         "`datasets.Dataset` (not a stream), or one residual_model.")
    if column not in names:
        raise ValueError(f"residual_fold={column!r} is not a column of the data (columns: {names}): add the fold of "
                         "every row, e.g. `dataset.add_column(\"fold\", folds)`.")
    folds = torch.as_tensor(dataset.with_format("numpy", columns=[column])[:][column])
    if folds.is_floating_point() or folds.dim() != 1:
        raise ValueError(f"Column {column!r} must hold one integer fold per row, got dtype {folds.dtype}, shape "
                         f"{tuple(folds.shape)}.")
    folds = folds.long()
    bad = (folds < 0) | (folds >= num_models)
    if bad.any():
        raise ValueError(f"Column {column!r} has folds {folds[bad][:5].tolist()} outside [0, {num_models}): fold f takes "
                         f"residual_model[f] (there are {num_models} models).")
    return folds


def other_model_logits(models: list, folds: torch.Tensor | None, inputs: dict, rows: torch.Tensor) -> torch.Tensor:
    """`(B, C)` logits of the residual model(s) on a batch: one model's, or row r's `models[folds[rows[r]]]`'s.

    Args:
        inputs: the base's keyword inputs for the batch; rows: `(B,)` the batch's row numbers in the data.
    """
    if len(models) == 1:
        return residual_logits(models[0], inputs)
    every = [residual_logits(model, inputs) for model in models]  # each (B, C); every model sees the whole batch
    every = torch.stack([logits.to(every[0].device) for logits in every])  # (M, B, C)
    fold = folds[rows.cpu()].to(every.device)  # (B,)
    return every.gather(0, fold.view(1, -1, 1).expand(1, *every.shape[1:])).squeeze(0)  # (B, C)


def describe_residual_models(models: list, residual_fold: str | None) -> dict:
    """The record of `config.memory_dataset["residual_model"]`: one model's description, or cross-fitted ones."""
    if len(models) == 1:
        return describe_residual_model(models[0])
    return {"cross_fitted": [describe_residual_model(model) for model in models], "fold_column": residual_fold}


def check_residual_model_for_add(memory_dataset: dict | None, residual_model, residual_fold: str | None = None) -> None:
    """`add_to_memory` must compute residuals as the memory's were: with the same residual model(s), or with none.

    Raises:
        ValueError: naming the fix, when the memory's residuals came from a residual model and `residual_model`
            is missing or has other weights, or when the memory's came from the base and one is passed.
    """
    from .hub import fingerprint_matches

    recorded = (memory_dataset or {}).get("residual_model")
    if isinstance(recorded, dict) and "cross_fitted" in recorded:
        expected = recorded["cross_fitted"]
        given = list(residual_model) if isinstance(residual_model, (list, tuple)) else [residual_model]
        if (residual_model is None or len(given) != len(expected) or residual_fold != recorded.get("fold_column")
                or not all(fingerprint_matches(m, e.get("fingerprint")) for m, e in zip(given, expected))):
            raise ValueError(
                f"The memory's residuals are cross-fitted over {len(expected)} models ({', '.join(e.get('class', '?') for e in expected)}) "
                f"by the column {recorded.get('fold_column')!r}: pass the same models in the same order and the fold "
                f"column, `model.add_to_memory(dataset, residual_model=[...], residual_fold={recorded.get('fold_column')!r})`, "
                "or rebuild the memory."
            )
        return
    if recorded is None:
        if residual_model is not None:
            raise ValueError(
                "The memory's residuals come from the base model itself, but a residual_model was passed: new entries "
                "would mix two kinds of residuals. Drop residual_model=, or rebuild the whole memory with "
                "`model.build_memory(dataset, residual_model=...)`."
            )
        return
    what = f"{recorded.get('class')} {recorded.get('name_or_path') or ''}".strip()
    if isinstance(residual_model, (list, tuple)):  # one model given as a list of one
        residual_model = residual_model[0] if len(residual_model) == 1 else residual_model
    if isinstance(residual_model, (list, tuple)) or residual_fold is not None:
        raise ValueError(f"The memory's residuals come from one model ({what}), not cross-fitted ones: pass that model "
                         "alone as residual_model=, without residual_fold, or rebuild the memory.")
    if residual_model is None:
        raise ValueError(
            f"The memory's residuals come from another model ({what}, recorded in config.memory_dataset['residual_model']): "
            "pass the same model again, `model.add_to_memory(dataset, residual_model=that_model)`, or rebuild the memory."
        )
    if not fingerprint_matches(residual_model, recorded.get("fingerprint")):
        raise ValueError(
            f"residual_model's weights differ from those the memory's residuals came from ({what}): pass that same "
            "model (its weights fingerprint is in config.memory_dataset['residual_model']), or rebuild the memory."
        )


@torch.inference_mode()
def residual_logits(residual_model, inputs: dict) -> torch.Tensor:
    """`(B, C)` float32 logits of `residual_model` on the base's inputs `inputs` (moved to its device and dtype).

    The model runs in eval mode (BatchNorm running statistics, no dropout) and is put back in its former mode.
    """
    parameter = next(residual_model.parameters(), None)
    device = parameter.device if parameter is not None else None
    dtype = parameter.dtype if parameter is not None else None
    moved = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device) if device is not None else value
            if value.is_floating_point() and dtype is not None:
                value = value.to(dtype)
        moved[name] = value
    was_training = residual_model.training
    residual_model.eval()
    try:
        logits = residual_model(**moved).logits
    finally:
        residual_model.train(was_training)
    return logits.float()


# ------------------------------------------------------------------ tune with query-time flips
def flipped_batch(batch):
    """The same `ImageBatch` with horizontally flipped `pixel_values` (labels and ids unchanged)."""
    import dataclasses

    return dataclasses.replace(batch, pixel_values=hflip(batch.pixel_values))


def check_tune_query_augmentation(config) -> None:
    """`tune` scores query-time flips for probability-space residuals only."""
    if config.residual_space != "probability":
        raise ValueError(
            "tune scores query_augmentation='hflip' with residual_space='probability' only: "
            "set model.config.query_augmentation = 'none' to tune this model."
        )


__all__ = [
    "AUGMENTATIONS",
    "check_augmentation",
    "check_residual_model",
    "check_residual_model_for_add",
    "describe_residual_model",
    "describe_residual_models",
    "flipped_batch",
    "hflip",
    "other_model_logits",
    "read_folds",
    "residual_logits",
    "residual_models",
    "views_per_example",
]
