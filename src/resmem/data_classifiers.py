"""Batches for text and audio classifiers: texts through a tokenizer, audio through a feature extractor, or
the model-ready columns (`input_ids`; `input_values` / `input_features`) a `dataset.map(...)` produced.

The image reader is `resmem.data.image_batches`; these yield the same three things (the base model's inputs,
labels, row numbers), so memory building, `tune` and `evaluate` read any classifier's data the same way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .data import row_keys

AUDIO_INPUT_COLUMNS = ("input_values", "input_features")


@dataclass
class InputBatch:
    """One batch of a text or audio classifier.

    Args:
        inputs: the base model's keyword inputs, e.g. `input_ids` `(B, L)` int64 and `attention_mask` `(B, L)`,
            or `input_values` `(B, S)` / `(B, frames, bins)` float32.
        labels: `(B,)` int64 class ids.
        example_ids: `(B,)` int64 row numbers in the dataset.
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    example_ids: torch.Tensor


def refuse_arguments(given: dict, model_kind: str, fix: str) -> None:
    """Raise a `ValueError` naming `fix` when any argument of another kind of model was passed (not `None`)."""
    wrong = sorted(name for name, value in given.items() if value is not None)
    if wrong:
        raise ValueError(f"{', '.join(wrong)} do not apply to {model_kind}: {fix}")


def _check_label_column(columns: list[str] | None, label_column: str) -> None:
    if columns is not None and label_column not in columns:
        raise ValueError(
            f"The dataset has no label column {label_column!r} (columns: {columns}). "
            "Pass `label_column=` naming the column that holds the class ids."
        )


def _batches(rows, batch_size: int, label_column: str, to_inputs: Callable[[dict], dict]) -> Iterator[InputBatch]:
    """Iterate `rows` in batches of `batch_size`, turning each batch dict into model inputs with `to_inputs`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    offset = 0
    for batch in rows.iter(batch_size=batch_size):
        labels = torch.as_tensor(batch[label_column]).long().reshape(-1)  # (B,)
        n = labels.shape[0]
        yield InputBatch(to_inputs(batch), labels, torch.arange(offset, offset + n))
        offset += n
    if offset == 0:
        raise ValueError("The dataset is empty: the memory needs at least one example.")


def _pad(sequences: list, pad_value, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D sequences: `(values (B, L), attention_mask (B, L) int64)`."""
    tensors = [torch.as_tensor(np.asarray(s), dtype=dtype).reshape(-1) for s in sequences]
    lengths = torch.tensor([t.shape[0] for t in tensors])  # (B,)
    values = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=pad_value)  # (B, L)
    mask = (torch.arange(values.shape[1])[None, :] < lengths[:, None]).long()  # (B, L)
    return values, mask


def text_batches(
    dataset,
    batch_size: int,
    label_column: str = "label",
    tokenizer=None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    max_length: int | None = None,
    pad_token_id: int = 0,
) -> Iterator[InputBatch]:
    """Yield `InputBatch`es of a text classifier from texts (with `tokenizer`) or `input_ids` columns.

    Args:
        dataset: `datasets.Dataset` / `IterableDataset` (or a `with_transform` one) with `label_column` and either
            texts in `text_column` (plus `text_pair_column` for sentence pairs) or token ids in `input_ids`
            (lists of ints, any lengths; `attention_mask` / `token_type_ids` columns are used when present).
        tokenizer: the base model's tokenizer (`tokenizer(texts, padding=True, truncation=True)`); without one
            the `input_ids` column is read and right-padded with `pad_token_id`.
        max_length: truncation length of the tokenizer (default: the tokenizer's own limit).
    """
    columns = row_keys(dataset)
    _check_label_column(columns, label_column)
    have = columns or []
    use_text = tokenizer is not None and text_column in have
    if not use_text and "input_ids" not in have:
        if text_column in have:
            raise ValueError(
                f"The dataset holds texts in {text_column!r}: pass `tokenizer=` (the base model's tokenizer, e.g. "
                "AutoTokenizer.from_pretrained(...)) to read them, or add input_ids with `dataset.map(...)`."
            )
        audio = [name for name in ("audio", *AUDIO_INPUT_COLUMNS) if name in have]
        hint = (f" It holds audio ({audio[0]!r}): use an audio classifier (ResMemForAudioClassification) for audio."
                if audio else "")
        raise ValueError(
            f"The dataset has neither a text column {text_column!r} nor 'input_ids' (columns: {columns}). Pass "
            f"`text_column=` naming the text column (with `tokenizer=`), or add input_ids with `dataset.map(...)`.{hint}"
        )
    if use_text:
        names = [text_column, label_column] + ([text_pair_column] if text_pair_column else [])
        if text_pair_column and text_pair_column not in have:
            raise ValueError(f"The dataset has no column {text_pair_column!r} (text_pair_column; columns: {columns}).")
    else:
        names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in have] + [label_column]
    rows = dataset if getattr(dataset, "format", {}).get("type") == "custom" else dataset.select_columns(names)

    def to_inputs(batch: dict) -> dict:
        if use_text:
            texts = batch[text_column]
            if not all(isinstance(t, str) for t in texts):
                kinds = sorted({type(t).__name__ for t in texts if not isinstance(t, str)})
                raise ValueError(f"Column {text_column!r} holds {kinds}, not text: pass `text_column=` naming the texts.")
            pairs = (batch[text_pair_column],) if text_pair_column else ()
            encoded = tokenizer(texts, *pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            return dict(encoded)
        if tokenizer is not None:  # pads as the model expects (side, pad id)
            return dict(tokenizer.pad({k: batch[k] for k in names if k != label_column}, return_tensors="pt"))
        input_ids, mask = _pad(batch["input_ids"], pad_token_id, torch.long)  # (B, L) each
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in batch:
            inputs["token_type_ids"] = _pad(batch["token_type_ids"], 0, torch.long)[0]
        return inputs

    return _batches(rows, batch_size, label_column, to_inputs)


def _waveform(value, column: str) -> tuple[np.ndarray, int | None]:
    """`(samples (S,) float32, sampling rate or None)` of one audio cell: a decoded `datasets.Audio` value (a
    dict or torchcodec decoder with "array" / "sampling_rate") or a plain array."""
    rate = None
    if isinstance(value, dict) or (hasattr(value, "__getitem__") and not isinstance(value, (list, np.ndarray, str))):
        try:
            samples, rate = value["array"], value["sampling_rate"]
        except (KeyError, TypeError, IndexError) as err:
            raise ValueError(
                f"Column {column!r} holds {type(value).__name__} values without 'array' / 'sampling_rate': cast it "
                "with `dataset.cast_column(column, datasets.Audio(sampling_rate=...))`, or store 1-D sample arrays."
            ) from err
    elif isinstance(value, str):
        raise ValueError(
            f"Column {column!r} holds text, not audio: an audio classifier reads waveforms (a `datasets.Audio` column "
            "or 1-D sample arrays) with `feature_extractor=`; texts go to a text classifier (ResMemForSequenceClassification)."
        )
    else:
        samples = value
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(
            f"Column {column!r} holds audio of shape {samples.shape}, not 1-D mono samples: cast it with "
            "`datasets.Audio(sampling_rate=..., mono=True)` or average the channels first."
        )
    return samples, None if rate is None else int(rate)


def audio_batches(
    dataset,
    batch_size: int,
    label_column: str = "label",
    feature_extractor=None,
    audio_column: str | None = None,
) -> Iterator[InputBatch]:
    """Yield `InputBatch`es of an audio classifier from audio (with `feature_extractor`) or model-ready columns.

    Args:
        dataset: `datasets.Dataset` / `IterableDataset` with `label_column` and either audio in `audio_column`
            (default `"audio"`: decoded `datasets.Audio` values, or 1-D sample arrays at the feature extractor's
            sampling rate) or the feature extractor's output in `input_values` / `input_features` (equal shapes,
            or any lengths when `feature_extractor` is given to pad them).
        feature_extractor: the base model's feature extractor, called as
            `feature_extractor(arrays, sampling_rate=..., padding=True, return_tensors="pt")`.
    """
    columns = row_keys(dataset)
    _check_label_column(columns, label_column)
    have = columns or []
    ready = [name for name in AUDIO_INPUT_COLUMNS if name in have]
    audio_column = audio_column or "audio"
    use_audio = feature_extractor is not None and audio_column in have
    if not use_audio and not ready:
        if audio_column in have:
            raise ValueError(
                f"The dataset holds audio in {audio_column!r}: pass `feature_extractor=` (the base model's, e.g. "
                "AutoFeatureExtractor.from_pretrained(...)), or add input_values with `dataset.map(...)`."
            )
        text = [name for name in ("text", "sentence", "input_ids") if name in have]
        hint = (f" It holds text ({text[0]!r}): an audio classifier cannot read it; use a text classifier "
                "(ResMemForSequenceClassification) for text." if text else "")
        raise ValueError(
            f"The dataset has neither an audio column {audio_column!r} nor {' / '.join(AUDIO_INPUT_COLUMNS)} (columns: "
            f"{columns}). Pass `audio_column=` naming the audio (with `feature_extractor=`).{hint}"
        )
    names = [audio_column if use_audio else ready[0], label_column]
    if not use_audio and "attention_mask" in have:
        names.insert(1, "attention_mask")
    rows = dataset if getattr(dataset, "format", {}).get("type") == "custom" else dataset.select_columns(names)
    rate = getattr(feature_extractor, "sampling_rate", None)
    # Pad a batch of different lengths where the extractor would not (Wav2Vec2's default `padding=False`); keep
    # the extractor's own padding otherwise (Whisper pads to 30 s, AST to `max_length` frames, as the model expects).
    padding = inspect.signature(feature_extractor.__call__).parameters.get("padding") if use_audio else None
    pad_kwargs = {"padding": True} if padding is not None and padding.default is False else {}

    def to_inputs(batch: dict) -> dict:
        if not use_audio:
            values = batch[ready[0]]
            shapes = {np.shape(v) for v in values}
            if len(shapes) == 1:
                inputs = {ready[0]: torch.as_tensor(np.stack([np.asarray(v, dtype=np.float32) for v in values]))}
                if "attention_mask" in batch:
                    inputs["attention_mask"] = torch.as_tensor(np.stack([np.asarray(m) for m in batch["attention_mask"]]))
                return inputs
            if feature_extractor is None:
                raise ValueError(
                    f"Column {ready[0]!r} holds inputs of different shapes {sorted(shapes)[:3]}: pass `feature_extractor=` "
                    "to pad them, or pad them when you compute them (`feature_extractor(..., padding=...)`)."
                )
            return dict(feature_extractor.pad({ready[0]: list(values)}, return_tensors="pt"))
        waves = [_waveform(v, audio_column) for v in batch[audio_column]]
        rates = {r for _, r in waves if r is not None}
        if rate is not None and rates - {rate}:
            raise ValueError(
                f"Audio in {audio_column!r} is sampled at {sorted(rates)} Hz but the feature extractor expects {rate} Hz: "
                f"resample it, e.g. `dataset.cast_column({audio_column!r}, datasets.Audio(sampling_rate={rate}))`."
            )
        arrays = [w for w, _ in waves]
        kwargs = {"sampling_rate": rate} if rate is not None else {}
        return dict(feature_extractor(arrays, return_tensors="pt", **kwargs, **pad_kwargs))

    return _batches(rows, batch_size, label_column, to_inputs)


__all__ = ["AUDIO_INPUT_COLUMNS", "InputBatch", "audio_batches", "refuse_arguments", "text_batches"]
