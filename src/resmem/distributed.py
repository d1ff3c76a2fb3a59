"""Multi-process helpers (Accelerate): the same-data check, contiguous shards, an order-preserving gather,
and a guard that keeps every process of a build in step, so that no input leaves a process waiting.

Each rank embeds a contiguous slice of the dataset; gathering the slices in rank order then gives
exactly the single-process order. Slices may differ in length (by one row, or a rank may get none):
rows are padded before `accelerate.utils.gather` (which aborts on unequal shapes) and trimmed after.

Every distributed build runs inside a [`DistributedBuild`]:

```python
>>> with DistributedBuild(process_info(accelerator), dataset, what="memory build") as build:
...     shard, first_row = build.shard(dataset)         # after the collective same-data check
...     parts = ...                                     # local work on this rank's shard
...     keys = gather_rows(parts, build.info, build)   # exchanges ok/error flags, then gathers
```

Rules that make a hang impossible for any exception raised by Python code on one rank:
1. the collective steps of a build are the same sequence on every rank (the same-data check
   guarantees the same number of rows, hence of chunks and gathers);
2. each collective step starts with an exchange of `(status, step name, payload)`
   (`DistributedBuild.sync`), where status is "ok" or this rank's error;
3. a rank that raises between steps reports its error in exactly one exchange (`__exit__`), which
   meets whatever step the other ranks are waiting in; every rank that sees an error raises too and
   performs no further collective.
A rank killed outright (out of memory, a signal) cannot report: `torchrun` / `accelerate launch`
then stop the other ranks, and the process group timeout (`InitProcessGroupKwargs(timeout=...)`,
default 30 min for gloo, 10 min for NCCL) is the last resort.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from .data import dataset_length

# Rows hashed by `data_signature`: evenly spaced over the dataset, first and last included.
SIGNATURE_POSITIONS = 64


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
    if isinstance(accelerator, ProcessInfo):
        return accelerator
    if accelerator is None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return ProcessInfo()
        from accelerate import PartialState

        accelerator = PartialState()
    return ProcessInfo(accelerator.num_processes, accelerator.process_index)


# ---------------------------------------------------------------------------------------------- same data
_NOT_SHARDABLE = (
    "A distributed build or evaluation needs a map-style `datasets.Dataset`, a list or a tensor (it is split into "
    "contiguous shards so that the merged result keeps the dataset's order); convert the IterableDataset first."
)


def data_signature(data, attention_mask: torch.Tensor | None = None, positions: int = SIGNATURE_POSITIONS) -> tuple[int, str]:
    """`(length, digest)` of a dataset, list or tensor: SHA-256 over the length and the contents of up to
    `positions` rows at evenly spaced positions (first and last included).

    Two ranks that load the same rows in the same order get the same signature, however the data were
    loaded; a different length, a rank-dependent shuffle or a per-rank split changes it (except in the
    unlikely case that every sampled row is a duplicate of the row it replaced). `datasets`'s own
    `_fingerprint` would not do: it hashes how a dataset was made, not its rows, so it is random for
    in-memory datasets (`Dataset.from_dict` in each process gives each its own) and missing for lists
    and tensors.
    """
    length = dataset_length(data)
    if length is None:
        raise ValueError(_NOT_SHARDABLE)
    h = hashlib.sha256(f"rows={length}".encode())
    if length:
        count = min(positions, length)
        rows = sorted({round(i * (length - 1) / max(1, count - 1)) for i in range(count)})  # 0 and length - 1 included
        if hasattr(data, "with_format") and hasattr(data, "column_names"):  # datasets.Dataset: hash arrow buffers
            table = data.with_format("arrow")[rows]  # pyarrow.Table, decoded nothing (images stay bytes)
            for name in sorted(table.column_names):
                h.update(name.encode())
                _hash_arrow(h, table.column(name).combine_chunks())
        else:
            for r in rows:
                _hash_value(h, data[r])
        if attention_mask is not None:
            for r in rows:
                _hash_value(h, attention_mask[r])
    return length, h.hexdigest()


def _hash_arrow(h, array) -> None:
    """Hash a pyarrow array's values (not its memory layout, which depends on how the data were loaded)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    h.update(f"{kind}|{len(array)}|".encode())
    h.update(np.packbits(array.is_null().to_numpy(zero_copy_only=False)).tobytes())
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        h.update(pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
        _hash_arrow(h, array.flatten())  # flatten() applies the slice offset
    elif pa.types.is_struct(kind):
        for i, child in enumerate(array.flatten()):
            h.update(kind.field(i).name.encode())
            _hash_arrow(h, child)
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        h.update(np.ascontiguousarray(array.to_numpy(zero_copy_only=False)).tobytes())
    else:  # strings, binary (encoded images), dates, ...: few rows, so a Python loop is cheap
        for value in array.to_pylist():
            _hash_value(h, value)


def _hash_value(h, value) -> None:
    """Hash a Python / numpy / torch value by content."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        h.update(f"nd{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (bytes, bytearray)):
        h.update(b"b%d|" % len(value))
        h.update(value)
    elif isinstance(value, str):
        h.update(b"s%d|" % len(value))
        h.update(value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, dict):
        h.update(b"d")
        for key in sorted(value, key=str):
            _hash_value(h, str(key))
            _hash_value(h, value[key])
    elif isinstance(value, (list, tuple)):
        if value and all(type(v) is int for v in value):  # token ids: one numpy buffer
            _hash_value(h, np.asarray(value, dtype=np.int64))
        else:
            h.update(b"l%d|" % len(value))
            for v in value:
                _hash_value(h, v)
    else:
        h.update(f"{type(value).__name__}:{value!r}|".encode())


# ---------------------------------------------------------------------------------------------- the guard
class DistributedBuild:
    """Context manager that keeps the processes of one build in step (see the module docstring).

    On entry (several processes, `data` given) every rank checks collectively that all ranks see the same
    data (`data_signature`): on a mismatch every rank raises the same `ValueError`, before any work.
    Inside, `sync(payload)` starts each collective step; on exit every rank meets once more, so an
    exception raised on one rank between two steps (or after the last) reaches every rank. In a single
    process everything is a no-op.

    Args:
        info: from `process_info(accelerator)`.
        data: the dataset (or list, or tensor) every rank must agree on; `None` skips the check.
        attention_mask: `(B, T)` mask that goes with a tensor of input ids (part of the check).
        what: names the job in error messages ("memory build").
        settings: arguments that must also agree across ranks (e.g. `{"chunk_rows": 4}`: another number of
            chunks per rank would put the ranks out of step; another `residual_top_m`, rows of another width).
    """

    def __init__(
        self, info: ProcessInfo, data=None, attention_mask: torch.Tensor | None = None, what: str = "memory build",
        settings: dict | None = None,
    ):
        self.info, self.data, self.attention_mask, self.what = info, data, attention_mask, what
        self.settings = settings

    # -- collective primitives
    def sync(self, payload=None, step: str = "step") -> list:
        """Exchange `payload` (picklable) with every rank; returns every rank's payload in rank order.

        Raises on every rank if any rank reported an error, or if the ranks are at different steps.
        """
        if not self.info.distributed:
            return [payload]
        return self._exchange(("ok", step, payload))

    def _exchange(self, entry) -> list:
        from accelerate.utils import gather_object

        entries = gather_object([entry])  # one small object per rank, in rank order
        failed = [(rank, e) for rank, e in enumerate(entries) if e[0] == "error"]
        if failed:
            rank, (_, type_name, message) = failed[0]
            cls = ValueError if type_name == "ValueError" else RuntimeError
            raise _synced(cls(
                f"Process {rank} of {self.info.num_processes} failed during the {self.what}, so every process stops "
                f"(none is left waiting): {type_name}: {message}"
            ))
        steps = [e[1] for e in entries]
        if len(set(steps)) > 1:
            raise _synced(RuntimeError(
                f"The processes are out of step in the {self.what} (steps by rank: {steps}); this is a bug in resmem, "
                "please report it."
            ))
        return [e[2] for e in entries]

    def report(self, exc: BaseException) -> None:
        """Tell the other ranks that this one failed (once per exception); they raise at their current step."""
        if not self.info.distributed or getattr(exc, "_resmem_synced", False) or not isinstance(exc, Exception):
            return
        try:
            self._exchange(("error", type(exc).__name__, str(exc)))
        except Exception:  # another rank failed in the same step: our own exception stays the one raised here
            pass
        _synced(exc)

    # -- context
    def __enter__(self) -> DistributedBuild:
        if self.info.distributed and self.data is not None:
            try:
                signature = data_signature(self.data, self.attention_mask)
            except Exception as exc:
                self.report(exc)
                raise
            every = self.sync((signature, repr(self.settings)), step="same data")
            signatures = [sig for sig, _ in every]
            if len({settings for _, settings in every}) > 1:
                described = "; ".join(f"process {rank}: {settings}" for rank, (_, settings) in enumerate(every))
                raise _synced(ValueError(
                    f"The processes pass different arguments to the {self.what} ({described}); pass the same "
                    "arguments on every process."
                ))
            if len(set(signatures)) > 1:
                described = "; ".join(
                    f"process {rank}: {n} rows (rows digest {digest[:12]})" for rank, (n, digest) in enumerate(signatures)
                )
                raise _synced(ValueError(
                    f"The processes do not see the same dataset ({described}). A distributed {self.what} splits ONE "
                    "dataset into contiguous shards itself, so every process must pass the same rows in the same "
                    "order: load the same data on every process, shuffle it with the same seed on every process "
                    "(not `seed=rank`), and do not split it per process yourself (no `split_dataset_by_node`, "
                    "`dataset.shard` or `accelerator.split_between_processes`)."
                ))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.info.distributed:
            return False
        if exc is None:
            self.sync(step=f"end of {self.what}")  # raises here if another rank failed after the last step
        else:
            self.report(exc)
        return False

    def shard(self, data, attention_mask: torch.Tensor | None = None):
        """`(shard, first_row, mask_shard)`: this rank's contiguous shard of `data` (see `shard_rows`), the row
        it starts at, and the matching rows of `attention_mask` (`None` without one)."""
        shard, first_row = shard_rows(data, self.info)
        if attention_mask is not None and self.info.distributed:
            attention_mask = attention_mask[first_row : first_row + dataset_length(shard)]
        return shard, first_row, attention_mask


def _synced(exc: BaseException) -> BaseException:
    """Mark an exception that every rank already knows about (no further exchange for it)."""
    try:
        exc._resmem_synced = True
    except AttributeError:  # exceptions without a __dict__
        pass
    return exc


# ---------------------------------------------------------------------------------------------- shards
def shard_bounds(length: int, num_shards: int, index: int) -> tuple[int, int]:
    """`[start, stop)` of contiguous shard `index` (sizes differ by at most one, larger shards first).

    The bounds of `datasets.Dataset.shard(num_shards, index, contiguous=True)`, which shards a `Dataset`
    (`shard_rows`); this function serves the first row number, which `Dataset.shard` does not return, and
    lists and tensors, which `datasets` cannot shard.
    """
    size, extra = divmod(length, num_shards)
    start = size * index + min(index, extra)
    return start, start + size + (1 if index < extra else 0)


def shard_rows(data, info: ProcessInfo):
    """This rank's contiguous slice of a `datasets.Dataset`, list or `(B, T)` tensor, and its first row.

    A shard may be empty (fewer rows than processes). In a single process: `(data, 0)`. An
    `IterableDataset` has no length to split contiguously, so it is refused (`ValueError`).
    """
    if not info.distributed:
        return data, 0
    length = dataset_length(data)
    if length is None:
        raise ValueError(_NOT_SHARDABLE)
    start, stop = shard_bounds(length, info.num_processes, info.process_index)
    if hasattr(data, "shard") and hasattr(data, "column_names"):
        # `Dataset.shard` raises IndexError for an empty shard at the end (fewer rows than processes).
        shard = data.shard(info.num_processes, info.process_index, contiguous=True) if stop > start else data.select([])
        return shard, start
    return data[start:stop], start


def shard_dataset(dataset, info: ProcessInfo):
    """This rank's contiguous slice of a map-style dataset and the row number it starts at (see `shard_rows`)."""
    return shard_rows(dataset, info)


def gather_rows(
    tensor: torch.Tensor | None, info: ProcessInfo, build: DistributedBuild | None = None, step: str = "gather"
) -> torch.Tensor:
    """Concatenate every rank's `(n_rank, ...)` tensor in rank order; every rank gets the result.

    Args:
        tensor: this rank's rows, or `None` when the rank had no rows (then the trailing shape and
            dtype come from the other ranks).
        build: the [`DistributedBuild`] this gather belongs to; its `sync` carries the shapes and the
            ranks' ok/error flags (without it, a plain `gather_object`).
    """
    if not info.distributed:
        return tensor
    from accelerate.utils import gather, gather_object, pad_across_processes

    meta = None if tensor is None else (tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""))
    metas = build.sync(meta, step=step) if build is not None else gather_object([meta])  # one shape per rank
    known = [m for m in metas if m is not None]
    if not known:
        raise _synced(ValueError("No process produced any rows: the dataset is empty."))
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


def progress_bar(iterable=None, total: int | None = None, desc: str = "", unit: str = "batch",
                 info: ProcessInfo | None = None, progress: bool = True):
    """A `transformers` tqdm bar, shown on the main process only (and hidden by
    `transformers.utils.logging.disable_progress_bar()`); with `total`, it shows an ETA."""
    from transformers.utils.logging import is_progress_bar_enabled, tqdm

    main = info is None or info.is_main_process
    disable = not (progress and is_progress_bar_enabled() and main)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable)


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
    shard, first_row = shard_dataset(dataset, info)
    length = dataset_length(shard)  # None for a streaming dataset (one process only)
    batches = () if length == 0 else make_batches(shard)
    total = math.ceil(length / batch_size) if length else None
    return progress_bar(batches, total, desc, "batch", info, progress), first_row


def gather_chunks(chunks: list[torch.Tensor], info: ProcessInfo, build: DistributedBuild | None = None,
                  step: str = "gather") -> torch.Tensor | None:
    """`torch.cat` of this rank's `(n_i, ...)` chunks, `(n, ...)`; under several processes, every rank's rows in
    rank order (see `gather_rows`). `None` for no chunks in a single process."""
    joined = torch.cat(chunks) if chunks else None
    return gather_rows(joined, info, build, step=step) if info.distributed else joined


def gather_parts(
    parts: list[list[torch.Tensor]], info: ProcessInfo, build: DistributedBuild | None = None
) -> list[torch.Tensor | None]:
    """Concatenate each list of per-batch tensors `(B, ...)` and, under several processes, gather the rows
    of every rank in rank order (see `gather_rows`): `[(N, ...)]`, `None` for a list that stayed empty
    in a single process."""
    return [gather_chunks(p, info, build, step=f"gather {i}") for i, p in enumerate(parts)]


def sum_stats(stats: dict, build: DistributedBuild) -> dict:
    """Add up every rank's numeric counters (e.g. skipped texts, windows); every rank gets the totals."""
    every = build.sync(dict(stats), step="stats")
    return {key: sum(s.get(key, 0) for s in every) for key in stats}


__all__ = [
    "DistributedBuild", "ProcessInfo", "data_signature", "gather_chunks", "gather_parts", "gather_rows", "process_info",
    "progress_bar", "shard_batches", "shard_bounds", "shard_dataset", "shard_rows", "sum_stats",
]
