"""Multi-process helpers (Accelerate): contiguous shards per rank and an order-preserving gather.

Each rank embeds a contiguous slice of the dataset; gathering the slices in rank order then gives
exactly the single-process order. Slices may differ in length (by one row, or a rank may get none):
rows are padded before `accelerate.utils.gather` (which aborts on unequal shapes) and trimmed after.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .data import dataset_length


@dataclass
class ProcessInfo:
    num_processes: int = 1
    process_index: int = 0

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1


def process_info(accelerator=None) -> ProcessInfo:
    """Ranks from an `Accelerator` / `PartialState`, else from an initialised `torch.distributed` group.

    Without either, the job is one process (even if other processes are running it too).
    """
    if accelerator is None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return ProcessInfo()
        from accelerate import PartialState

        accelerator = PartialState()
    return ProcessInfo(accelerator.num_processes, accelerator.process_index)


def shard_bounds(length: int, num_shards: int, index: int) -> tuple[int, int]:
    """`[start, stop)` of contiguous shard `index` (sizes differ by at most one, larger shards first)."""
    size, extra = divmod(length, num_shards)
    start = size * index + min(index, extra)
    return start, start + size + (1 if index < extra else 0)


def shard_dataset(dataset, info: ProcessInfo):
    """This rank's contiguous slice of a map-style dataset and the row number it starts at."""
    if not info.distributed:
        return dataset, 0
    try:
        length = len(dataset)
    except TypeError:
        raise ValueError(
            "A distributed build or evaluation needs a map-style `datasets.Dataset` (it is split into contiguous "
            "shards so that the merged result keeps the dataset's order); convert the IterableDataset first."
        ) from None
    start, stop = shard_bounds(length, info.num_processes, info.process_index)
    return dataset.select(range(start, stop)), start


def gather_rows(tensor: torch.Tensor | None, info: ProcessInfo, trailing_shape=None, dtype=None) -> torch.Tensor:
    """Concatenate every rank's `(n_rank, ...)` tensor in rank order; every rank gets the result.

    Args:
        tensor: this rank's rows, or `None` when the rank had no rows (then `trailing_shape` and
            `dtype` come from the other ranks).
    """
    if not info.distributed:
        return tensor
    from accelerate.utils import gather, gather_object, pad_across_processes

    meta = None if tensor is None else (tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""))
    metas = gather_object([meta])  # small: one shape per rank
    known = [m for m in metas if m is not None]
    if not known:
        raise ValueError("No process produced any rows: the dataset is empty.")
    trailing, dtype_name = known[0][0][1:], known[0][1]
    sizes = [m[0][0] if m is not None else 0 for m in metas]
    from accelerate import PartialState

    device = PartialState().device  # NCCL gathers CUDA tensors only; gloo gathers CPU tensors
    if tensor is None:
        tensor = torch.empty((0, *trailing), dtype=getattr(torch, dtype_name))
    tensor = tensor.to(device)
    padded = pad_across_processes(tensor.contiguous(), dim=0)  # (max_rows, ...)
    full = gather(padded)  # (num_processes * max_rows, ...)
    rows = padded.shape[0]
    return torch.cat([full[r * rows : r * rows + n] for r, n in enumerate(sizes)])


def shard_batches(
    dataset, info: ProcessInfo, make_batches: Callable[[object], Iterable], batch_size: int, desc: str,
    progress: bool = True,
) -> tuple[Iterable, int]:
    """This rank's batches of `dataset` (with a progress bar on the main process) and its shard's first row.

    Args:
        make_batches: turns a dataset (this rank's contiguous shard) into an iterable of batches of
            `batch_size` rows, e.g. a `functools.partial` of `resmem.data.image_batches`.
        progress: show the bar (also hidden by `transformers.utils.logging.disable_progress_bar()`).
    Returns:
        `(batches, first_row)`. A rank whose shard is empty (fewer rows than processes) gets no batches
        but must still join `gather_parts`.
    """
    from transformers.utils.logging import is_progress_bar_enabled, tqdm

    shard, first_row = shard_dataset(dataset, info)
    length = dataset_length(shard)  # None for a streaming dataset (one process only)
    batches = () if length == 0 else make_batches(shard)
    total = math.ceil(length / batch_size) if length else None
    disable = not (progress and is_progress_bar_enabled() and info.is_main_process)
    return tqdm(batches, total=total, desc=desc, unit="batch", disable=disable), first_row


def gather_parts(parts: list[list[torch.Tensor]], info: ProcessInfo) -> list[torch.Tensor | None]:
    """Concatenate each list of per-batch tensors `(B, ...)` and, under several processes, gather the rows
    of every rank in rank order (see `gather_rows`): `[(N, ...)]`, `None` for a list that stayed empty
    in a single process."""
    joined = [torch.cat(p) if p else None for p in parts]
    if info.distributed:
        joined = [gather_rows(p, info) for p in joined]
    return joined


__all__ = ["ProcessInfo", "gather_parts", "gather_rows", "process_info", "shard_batches", "shard_bounds", "shard_dataset"]
