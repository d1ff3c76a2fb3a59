"""Token sequences and sliding windows for causal-LM memories and evaluation.

Every token position `t` of a text that has a next token is one entry (key = phi at `t`, label =
token `t + 1`). Texts longer than `window` are cut into windows of `window` tokens advancing by
`stride`: the first window stores all its positions, later windows only their last `stride`
positions, so every entry after the first window sees at least `window - stride` tokens of context.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


@dataclass
class TokenBatch:
    """A batch of windows, right-padded to the longest.

    Attributes:
        input_ids: `(B, T)` int64.  attention_mask: `(B, T)` int64.
        store_mask: `(B, T)` bool, positions that are entries (stored or evaluated).
        labels: `(B, T)` int64 next token at stored positions, -100 elsewhere.
        positions: `(B, T)` int64 position of each token inside its example.
        example_ids: `(B,)` int64 source example of each window.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    store_mask: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    example_ids: torch.Tensor


def check_window(window: int, stride: int, max_positions: int | None) -> None:
    """Raise a `ValueError` naming the fix for an unusable window/stride pair."""
    if not isinstance(window, int) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"window and stride must be integers >= 1, got window={window!r}, stride={stride!r}.")
    if window <= stride:
        raise ValueError(
            f"window ({window}) must be larger than stride ({stride}): each window after the first gives its last "
            f"`stride` tokens `window - stride` tokens of context (paper: window=256, stride=192)."
        )
    if max_positions is not None and window > max_positions:
        raise ValueError(
            f"window ({window}) is larger than the model's maximum positions ({max_positions}); "
            f"use window <= {max_positions} (and stride < window)."
        )


def plan_windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of `length` tokens: `(start, end, store_from)` with entries `[store_from, end)`.

    Only positions with a next token (`t < length - 1`) are entries; windows that would add none are skipped.
    """
    spans = []
    start, store_from = 0, 0
    while True:
        end = min(start + window, length)
        spans.append((start, end, store_from))
        if end >= length - 1:
            return spans
        store_from, start = end, start + stride


def token_sequences(
    data,
    tokenizer=None,
    text_column: str = "text",
    attention_mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    add_special_tokens: bool = True,
    tokenize_batch_size: int = 1000,
    first_id: int = 0,
) -> Iterator[tuple[int, list[int]]]:
    """Yield `(example_id, token ids)` for every example (padding removed), in dataset order.

    Args:
        data: a `datasets.Dataset`/`IterableDataset` with a `text_column` (needs `tokenizer`) or an
            `input_ids` column (optionally `attention_mask`); a list of strings; a list of token-id lists;
            or a `(B, T)` tensor of `input_ids` (with `attention_mask` for padded rows).
        tokenizer: tokenizes text; its vocabulary must fit the model's (`vocab_size`).
        first_id: example id of the first row (a process's shard starts at its first row in the whole dataset,
            so that ids, and the ids in error messages, are those of the whole dataset).
    """
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise ValueError(f"input_ids must be a (batch, seq) tensor, got shape {tuple(data.shape)}.")
        mask = attention_mask if attention_mask is not None else torch.ones_like(data)
        for i in range(data.shape[0]):
            yield first_id + i, _checked(data[i][mask[i].bool()].tolist(), vocab_size, first_id + i)
        return
    if isinstance(data, Sequence) and not hasattr(data, "column_names"):
        if not data:  # e.g. a process's empty shard: nothing to tokenize (and no tokenizer needed)
            return
        if all(isinstance(x, str) for x in data):
            yield from _tokenize_texts(
                enumerate(data, first_id), tokenizer, vocab_size, add_special_tokens, tokenize_batch_size
            )
        else:
            for i, ids in enumerate(data, first_id):
                yield i, _checked(list(ids), vocab_size, i)
        return
    columns = list(getattr(data, "column_names", None) or [])
    if not columns and hasattr(data, "take"):  # a streaming dataset's columns are unknown until its first row is read
        columns = list(next(iter(data.take(1)), {}).keys())
    if "input_ids" in columns:
        offset = first_id
        for batch in data.iter(batch_size=tokenize_batch_size):
            masks = batch.get("attention_mask")
            for j, ids in enumerate(batch["input_ids"]):
                ids = list(ids)
                if masks is not None:
                    ids = [t for t, m in zip(ids, masks[j]) if m]
                yield offset + j, _checked(ids, vocab_size, offset + j)
            offset += len(batch["input_ids"])
        return
    if text_column not in columns:
        raise ValueError(
            f"The dataset has neither an 'input_ids' column nor a text column {text_column!r} (columns: {columns}). "
            "Pass `text_column=` naming the text column, or tokenize the dataset first."
        )

    def rows():
        offset = first_id
        for batch in data.select_columns([text_column]).iter(batch_size=tokenize_batch_size):
            for j, text in enumerate(batch[text_column]):
                yield offset + j, text
            offset += len(batch[text_column])

    yield from _tokenize_texts(rows(), tokenizer, vocab_size, add_special_tokens, tokenize_batch_size)


def _tokenize_texts(rows, tokenizer, vocab_size, add_special_tokens, batch_size):
    if tokenizer is None:
        raise ValueError("The data holds text: pass `tokenizer=` (e.g. AutoTokenizer.from_pretrained(<base model>)).")
    chunk: list[tuple[int, str]] = []

    def flush():
        encoded = tokenizer([t for _, t in chunk], add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
        for (i, _), ids in zip(chunk, encoded):
            yield i, _checked(ids, vocab_size, i)

    for row in rows:
        chunk.append(row)
        if len(chunk) == batch_size:
            yield from flush()
            chunk = []
    if chunk:
        yield from flush()


def _checked(ids: list[int], vocab_size: int | None, example_id: int) -> list[int]:
    if vocab_size is not None and ids and (max(ids) >= vocab_size or min(ids) < 0):
        raise ValueError(
            f"Example {example_id} has token ids outside [0, {vocab_size}) (max {max(ids)}): the tokenizer or "
            "input_ids do not belong to this model's vocabulary. Use the base model's own tokenizer."
        )
    return ids


def window_batches(
    sequences: Iterator[tuple[int, list[int]]],
    window: int,
    stride: int,
    batch_size: int,
    pad_token_id: int | None,
    stats: dict | None = None,
) -> Iterator[TokenBatch]:
    """Cut sequences into windows (see `plan_windows`) and yield right-padded `TokenBatch`es of `batch_size` windows.

    Sequences shorter than 2 tokens have no entry: they are skipped and counted in `stats["skipped"]`.
    `stats["examples"]` counts the sequences read so far (for a progress bar over examples).
    Raises a `ValueError` when windows of different lengths must share a batch and `pad_token_id` is None.
    """
    stats = stats if stats is not None else {}
    stats.setdefault("skipped", 0)
    stats.setdefault("windows", 0)
    stats.setdefault("tokens_forward", 0)
    stats.setdefault("examples", 0)
    pending: list[tuple[int, list[int], int, int, int]] = []
    for example_id, ids in sequences:
        stats["examples"] += 1
        if len(ids) < 2:
            stats["skipped"] += 1
            continue
        for start, end, store_from in plan_windows(len(ids), window, stride):
            pending.append((example_id, ids, start, end, store_from))
            if len(pending) == batch_size:
                yield _collate(pending, pad_token_id, stats)
                pending = []
    if pending:
        yield _collate(pending, pad_token_id, stats)


def _collate(windows, pad_token_id, stats) -> TokenBatch:
    lengths = [end - start for _, _, start, end, _ in windows]
    width = max(lengths)
    if pad_token_id is None and min(lengths) != width:
        raise ValueError(
            "Windows of different lengths must be padded into one batch, but there is no pad token: set "
            "`tokenizer.pad_token = tokenizer.eos_token` (or pass `pad_token_id=`), or use batch_size=1."
        )
    b = len(windows)
    input_ids = torch.full((b, width), pad_token_id if pad_token_id is not None else 0, dtype=torch.long)
    attention_mask = torch.zeros(b, width, dtype=torch.long)
    store_mask = torch.zeros(b, width, dtype=torch.bool)
    labels = torch.full((b, width), -100, dtype=torch.long)
    positions = torch.zeros(b, width, dtype=torch.long)
    example_ids = torch.empty(b, dtype=torch.long)
    for row, (example_id, ids, start, end, store_from) in enumerate(windows):
        n = end - start
        tokens = torch.as_tensor(ids[start : min(end + 1, len(ids))], dtype=torch.long)  # window + its next token
        input_ids[row, :n] = tokens[:n]
        attention_mask[row, :n] = 1
        positions[row, :n] = torch.arange(start, end)
        keep = slice(store_from - start, min(n, len(ids) - 1 - start))  # entries need a next token
        store_mask[row, keep] = True
        labels[row, keep] = tokens[keep.start + 1 : keep.stop + 1]
        example_ids[row] = example_id
    stats["windows"] += b
    stats["tokens_forward"] += sum(lengths)
    return TokenBatch(input_ids, attention_mask, store_mask, labels, positions, example_ids)
