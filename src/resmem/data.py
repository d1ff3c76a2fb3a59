"""Turn a `datasets.Dataset` (or `IterableDataset`) into model-ready batches, checking it on the way."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass
class ImageBatch:
    """One batch: `pixel_values` `(B, C, H, W)`, `labels` `(B,)` int64 (regressors: `(B, C)` float32), `example_ids` `(B,)` int64."""

    pixel_values: torch.Tensor
    labels: torch.Tensor
    example_ids: torch.Tensor


def _column_names(dataset) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    return list(names) if names is not None else None


def _is_transformed(dataset) -> bool:
    """Whether rows come out of a `with_transform` / `set_transform` function (keys unrelated to the columns)."""
    fmt = getattr(dataset, "format", None)
    return isinstance(fmt, dict) and fmt.get("type") == "custom"


def row_keys(dataset) -> list[str] | None:
    """The keys the rows of `dataset` actually yield (`None` if unknown).

    `column_names` are the stored (arrow) columns, but a `with_transform` dataset yields whatever its
    transform returns (the HF image-classification tutorial's transform turns `image` into
    `pixel_values`), and a streaming dataset may not know its columns: then one row is read to see.
    """
    columns = _column_names(dataset)
    if columns is not None and not _is_transformed(dataset):
        return columns
    try:
        if hasattr(dataset, "take") and not hasattr(dataset, "select"):  # a streaming dataset
            first = next(iter(dataset.take(1)), None)
        else:
            first = dataset[:1] if dataset_length(dataset) else None
    except (TypeError, KeyError, IndexError):
        return columns
    return list(first.keys()) if isinstance(first, dict) else columns


def _find_image_column(dataset, keys: list[str] | None) -> str | None:
    if not _is_transformed(dataset):
        features = getattr(dataset, "features", None) or {}
        for name, feature in features.items():
            if type(feature).__name__ == "Image":
                return name
    for name in ("image", "img"):
        if name in (keys or []):
            return name
    return None


def image_batches(
    dataset,
    batch_size: int,
    label_column: str = "label",
    image_column: str | None = None,
    image_processor: Callable | None = None,
    transform: Callable | None = None,
    float_labels: bool = False,
) -> Iterator[ImageBatch]:
    """Yield `ImageBatch`es from a dataset holding `pixel_values`, or images plus a processor/transform.

    Args:
        dataset: `datasets.Dataset` / `IterableDataset` with a `label_column` and either a
            `pixel_values` column (arrays `(C, H, W)`) or an image column; what counts is what its rows
            yield, so a `with_transform` dataset whose transform returns `pixel_values` is read as such.
        image_processor: an HF image processor (called as `image_processor(images=..., return_tensors="pt")`).
        transform: alternatively, a callable mapping a list of images to a `(B, C, H, W)` tensor.
        float_labels: read the labels as float targets `(B, C)` (regressors: one number or a list of C per row)
            instead of `(B,)` int64 class ids.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    columns = row_keys(dataset)  # what rows yield: a with_transform dataset's keys differ from its columns
    transformed = _is_transformed(dataset)
    if columns is not None and label_column not in columns:
        raise ValueError(
            f"The dataset has no label column {label_column!r} (columns: {columns}). "
            "Pass `label_column=` naming the column that holds the class ids."
        )
    use_pixels = columns is not None and "pixel_values" in columns and image_processor is None and transform is None
    if not use_pixels:
        image_column = image_column or _find_image_column(dataset, columns)
        if image_column is None:
            raise ValueError(
                f"The dataset has neither a 'pixel_values' column nor an image column (columns: {columns}). "
                "Add pixel_values with `dataset.map(...)`, or pass `image_column=` with `image_processor=` or `transform=`."
            )
        if image_processor is None and transform is None:
            raise ValueError(
                f"The dataset holds raw images in {image_column!r}: pass `image_processor=` (e.g. "
                "AutoImageProcessor.from_pretrained(...)) or `transform=` (list of images -> (B, C, H, W) tensor)."
            )

    if transformed:  # its keys are not stored columns: read the rows the transform returns
        rows = dataset
    elif use_pixels:
        rows = dataset.select_columns(["pixel_values", label_column]).with_format("torch")
    else:
        rows = dataset.select_columns([image_column, label_column])

    offset = 0
    for batch in rows.iter(batch_size=batch_size):
        if label_column not in batch:
            raise ValueError(f"The dataset has no label column {label_column!r}; pass `label_column=`.")
        if use_pixels:
            pixel_values = batch["pixel_values"]
            if not isinstance(pixel_values, torch.Tensor):
                pixel_values = torch.stack([torch.as_tensor(p) for p in pixel_values])
        elif image_processor is not None:
            pixel_values = image_processor(images=batch[image_column], return_tensors="pt")["pixel_values"]
        else:
            pixel_values = transform(batch[image_column])
        labels = torch.as_tensor(batch[label_column])
        labels = labels.float().reshape(labels.shape[0], -1) if float_labels else labels.long().reshape(-1)
        n = labels.shape[0]
        yield ImageBatch(pixel_values.float(), labels, torch.arange(offset, offset + n))
        offset += n
    if offset == 0:
        raise ValueError("The dataset is empty: the memory needs at least one example.")


def dataset_length(dataset) -> int | None:
    """Number of rows if known (`None` for streaming datasets)."""
    try:
        return len(dataset)
    except TypeError:
        return None
