"""The memory store: what every ResMem memory shares, and the classifier memory `ResidualMemory`.

One design for every task (see docs/design.md, "The memory store"):

- `MemoryStore`: size, key dimension, search index and kNN `search`, the entry check
  `_check_entries`; in RAM or on disk (`resmem.memory_disk.OnDiskMemory`).
- `EditableMemory(MemoryStore)`: entries as tensors in RAM; `add`, `remove`, `save`, `load`.
- the task's payload, a [`MemorySchema`] plus a mixin that turns neighbours into a residual:
  `ClassifierResiduals` here (dense base logits + labels, residuals at any temperature) and
  `resmem.memory_lm.TokenResiduals` (sparse top-m residuals fixed at the build temperature).

`ResidualMemory = ClassifierResiduals + EditableMemory`; `TokenResidualMemory = TokenResiduals +
EditableMemory`; the on-disk memories combine the same mixins with the sharded store.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .augmentation import views_per_example
from .index import FaissIndex, NeighbourIndex, build_index, index_record, resolve_spec
from .residuals import neighbour_weights, residuals, weighted_residual
from .validation import ADD_FIX, ADD_SOURCE, FILE_FIX, check_classifier_entries, id_tensor, verify_index_file

MEMORY_FORMAT = "resmem-memory"
MEMORY_FORMAT_VERSION = "1"


class MemoryFileError(ValueError):
    """A memory file is missing, truncated, or belongs to another base model."""


def open_memory_file(path: str, fmt: str, rebuild_hint: str, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a memory safetensors file whose metadata says `format == fmt`.

    Raises `MemoryFileError` naming the fix when the file is missing, truncated or corrupt, or of
    another format (e.g. an image memory handed to a causal LM). The caller checks the tensors.
    """
    if not os.path.isfile(path):
        raise MemoryFileError(
            f"The memory file {path} is missing. Copy it next to the weights again, or {rebuild_hint} and save the model."
        )
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated headers/data
        raise MemoryFileError(
            f"The memory file {path} cannot be read ({err}); it is truncated or corrupt. Download or save the model again."
        ) from err
    if metadata.get("format") != fmt:
        raise MemoryFileError(
            f"{path} is not {kind} (format {metadata.get('format')!r}, metadata {json.dumps(metadata)[:200]}); "
            f"it may belong to another kind of model: {rebuild_hint}."
        )
    return tensors, metadata


def _as_id_tensor(ids) -> torch.Tensor:
    if isinstance(ids, range):
        ids = list(ids)
    return id_tensor(ids)  # refuses float ids: remove([3.9]) must not remove id 3


def _locked(method):
    """Run a memory method under the memory's lock (edits vs. forwards from other threads)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


@dataclass(frozen=True)
class MemorySchema:
    """The task-specific part of a memory: which per-entry tensors it stores and how its files are tagged.

    Attributes:
        name: `"classifier"` or `"token"`.
        format, format_version: the `format` / `format_version` metadata of its files (single file and shards).
        fields: `(name, dtype, ndim)` of every per-entry tensor, `keys` first, in file order; row `i` of
            each belongs to entry `i`.
        optional: fields that may be stored empty (`(0, 0)`), e.g. `indices` of a dense LM memory.
        one_entry_per_example: a classifier stores one entry per example (ids unique); an LM one per
            token (ids repeat within an example).
        metadata: names of the task's string metadata (besides fingerprint, layer, num_entries).
        kind, rebuild_hint: for error messages.
    """

    name: str
    format: str
    format_version: str
    fields: tuple[tuple[str, torch.dtype, int], ...]
    optional: frozenset = frozenset()
    one_entry_per_example: bool = True
    metadata: tuple[str, ...] = ()
    kind: str = "a ResMem memory file"
    rebuild_hint: str = "rebuild the memory with `model.build_memory(dataset)`"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.fields)

    def dtype(self, name: str) -> torch.dtype:
        return next(dtype for n, dtype, _ in self.fields if n == name)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(name for name in self.names if name not in self.optional)


CLASSIFIER_SCHEMA = MemorySchema(
    name="classifier",
    format=MEMORY_FORMAT,
    format_version=MEMORY_FORMAT_VERSION,
    fields=(("keys", torch.float32, 2), ("base_logits", torch.float32, 2), ("labels", torch.long, 1), ("example_ids", torch.long, 1)),
)


class MemoryStore(nn.Module):
    """What every memory shares, in RAM or on disk: size, key dimension, the search index and kNN search.

    A store holds, per entry, a key `(D,)` and the task's payload (see [`MemorySchema`]); the
    task-specific subclasses add how neighbours' payloads become a residual (`residual_for`). The
    store never sees the model: the wrapper embeds data and hands the store tensors.

    Subclasses implement `__len__`, `dim`, `keys_device` and `field_rows`.
    """

    schema: MemorySchema = CLASSIFIER_SCHEMA
    # "hflip": every source example gave 2 entries sharing its id (resmem.augmentation); saved in the file metadata.
    augmentation: str = "none"

    def __init__(self):
        super().__init__()
        # Held by every edit and by the whole read path of a forward (search + neighbour residuals), so that
        # threads sharing the model see the memory before or after an edit, never in between. Reentrant:
        # `add` calls `add_entries_dict`, `residual_for` calls `search`. Not copied by deepcopy/pickle.
        self._lock = threading.RLock()
        self.fingerprint: str | None = None
        self.layer: str | None = None
        self._index: NeighbourIndex | None = None
        self._index_key: tuple | None = None
        self._index_params: dict | None = None

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_lock", None)  # a lock cannot be copied or pickled; each copy gets its own
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.RLock()

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def dim(self) -> int:
        raise NotImplementedError

    @property
    def keys_device(self) -> torch.device:
        """Device of the stored keys (and of the ids `search` returns)."""
        raise NotImplementedError

    def field_rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` `(M,)` of the per-entry tensor `name` -> `(M, ...)`."""
        raise NotImplementedError

    def _stored(self, name: str) -> bool:
        """Whether field `name` holds data (an optional field may be stored empty or left out)."""
        raise NotImplementedError

    def attach(self, owner) -> None:
        """Kept for callers written before the store stopped pointing at its model: does nothing.

        The store holds no reference to the wrapper; `model.add_to_memory(data)` embeds and hands it tensors.
        """

    # ------------------------------------------------------------------ checks
    def _check_entries(
        self, tensors: dict, source: str, error: type[Exception] = ValueError, append: bool = False, check_content: bool = True
    ) -> int:
        """The one place where a batch of entries, loaded from a file or about to be stored, is checked.

        Checks that every required field of the schema is there with its rank, that all have the same
        number of rows, that example ids are unique where the schema stores one entry per example, and
        (`append=True`) that key and payload widths match the stored entries.

        Args:
            tensors: field name -> tensor `(n, ...)` (optional fields may be missing, None or empty).
            source: what the tensors come from, for the message (a file path, "add", "set_entries").
            error: exception type to raise (`MemoryFileError` for files).
            check_content: also check the values (`_check_content`); off only for tensors already checked.
        Returns:
            n, the number of entries.
        """
        schema = self.schema
        missing = [name for name in schema.required if tensors.get(name) is None]
        if missing:
            raise error(f"{source}: the entries lack {missing}; a {schema.name} memory stores {list(schema.names)}.")
        shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
        present = [name for name in schema.names if tensors.get(name) is not None and not (name in schema.optional and tensors[name].numel() == 0)]
        n = shapes["keys"][0] if len(shapes["keys"]) else 0
        for name, _, ndim in schema.fields:
            if name in present and (len(shapes[name]) != ndim or shapes[name][0] != n):
                raise error(
                    f"{source}: {', '.join(schema.names)} must have the same number of rows ({n} keys), and "
                    f"{name} must be {ndim}-D; got shapes {shapes}."
                )
        if append and len(self):
            for name in schema.optional:  # e.g. sparse entries (with `indices`) into a dense memory
                if self._stored(name) != (name in present):
                    raise error(
                        f"{source}: the memory {'stores' if self._stored(name) else 'has no'} {name!r} but the new entries "
                        f"{'lack it' if self._stored(name) else 'have it'} (dense vs sparse residuals): build them with the "
                        "memory's own settings."
                    )
            widths = {name: shapes[name][1] for name in present if len(shapes[name]) == 2}
            stored = self._widths()
            bad = {name: (w, stored[name]) for name, w in widths.items() if name in stored and stored[name] != w}
            if bad:
                what = ", ".join(f"{'keys of dimension' if name == 'keys' else name + ' of width'} {w} (memory: {s})" for name, (w, s) in bad.items())
                raise error(
                    f"{source}: new entries have {what}. Embed them with the same model, layer and settings as the memory."
                )
        ids = tensors.get("example_ids")
        views = views_per_example(self.augmentation)
        if schema.one_entry_per_example and ids is not None and ids.numel() and torch.unique(ids).numel() != ids.numel():
            counts = torch.unique(ids, return_counts=True)[1]
            if views == 1 or int(counts.max()) > views:
                raise error(f"{source}: `example_ids` must be unique: each memory entry names one source example"
                            + (f" (at most {views} entries per example in a {self.augmentation!r}-augmented memory)." if views > 1 else "."))
        if check_content:
            self._check_content(tensors, source, error, append and len(self) > 0)
        return n

    def _check_content(self, tensors: dict, source: str, error: type[Exception], joining: bool) -> None:
        """The task's value checks (dtypes, finite, labels in range: `resmem.validation`); `joining`: the
        entries are appended to this non-empty memory, so they must match its widths."""

    @classmethod
    def _check_file_content(cls, tensors: dict, metadata: dict, source: str) -> None:
        """The task's value checks of a memory file's tensors and metadata (raise `MemoryFileError`)."""

    def _widths(self) -> dict[str, int]:
        """Width of each stored 2-D field (`keys`: D, payloads: C or m)."""
        return {"keys": self.dim}

    # ------------------------------------------------------------------ search
    # `(spec, params)` that `"auto"` resolves to: the model's measured choice (`resmem.index_choice.sync_index_choice`,
    # from `config.index_choice`), or None for the size rule of `resolve_spec`.
    auto_index: tuple[str, dict] | None = None

    @_locked
    def index(self, spec: str, params: dict | None = None) -> NeighbourIndex:
        """The search index over the keys, built on first use and rebuilt when `spec` or the device changes.

        `params` (`nprobe`, `efSearch`, ...) are applied whenever they differ from the last call.
        """
        if spec == "auto" and self.auto_index is not None:  # the measured choice (resmem.index_choice), user params on top
            spec, params = self.auto_index[0], {**self.auto_index[1], **(params or {})}
        key = (resolve_spec(spec, len(self)), self.keys_device, len(self))
        if self._index is None or self._index_key != key:
            self._index = self._make_index(key[0])
            self._index_key = key
            self._index_params = None
        params = dict(params or {})
        if params != self._index_params:
            self._index.set_params(params)
            self._index_params = params
        return self._index

    def _make_index(self, factory: str) -> NeighbourIndex:
        raise NotImplementedError

    def effective_k(self, k: int) -> int:
        """`k` clamped to the memory size (documented behaviour; warns once per call site)."""
        if k > len(self):
            warnings.warn(
                f"k={k} is larger than the memory ({len(self)} entries); using k={len(self)}. "
                "Lower `model.config.k` to silence this warning.",
                stacklevel=3,
            )
            return len(self)
        return k

    def gather_keys(self, ids: torch.Tensor) -> torch.Tensor:
        """Stored keys of entry ids `(...)` -> `(..., D)`."""
        return self.field_rows("keys", ids.reshape(-1)).view(*ids.shape, -1)

    @_locked
    def search(
        self, queries: torch.Tensor, k: int, index_spec: str = "auto", index_params: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k nearest entries of each query.

        The index only selects candidates: with `index_params["rerank_factor"] = f` it returns
        `f * k` of them (useful for IVF-PQ), and the k nearest by exact distance are kept.

        Args:
            queries: `(B, D)` float32.
        Returns:
            `(distances, ids)`, each `(B, k)`: plain L2 distances, nearest first, and int64 entry ids.
            Distances are recomputed from the stored keys for exact search and for compressed indexes
            (PQ, SQ) or re-ranking; IVF-Flat / HNSW-Flat distances come from faiss's float32 keys as they are. Slots the index could not fill (an IVF probing
            too few lists) have distance `inf` and id 0, so they get zero weight.
        """
        k = self.effective_k(k)
        if index_spec == "auto" and self.auto_index is not None:  # the measured choice may re-rank
            index_params = {**self.auto_index[1], **(index_params or {})}
        factor = int((index_params or {}).get("rerank_factor", 1))
        index = self.index(index_spec, index_params)
        candidates = min(len(self), k * max(1, factor)) if not index.exact else k
        index_distances, ids = index.search(queries, candidates)  # (B, candidates)
        if self._numpy_tail and self.keys_device.type == "cpu" and ids.device.type == "cpu" and queries.device.type == "cpu":
            return self._finish_search_numpy(queries, index, index_distances, ids, k, candidates)
        ids = ids.to(self.keys_device)
        valid = ids >= 0  # (B, candidates)
        ids = ids.clamp_min(0)
        if index.exact or not index.full_precision or candidates != k:
            neighbours = self.gather_keys(ids)  # (B, candidates, D)
            queries = queries.to(neighbours.device, torch.float32)
            distances = (neighbours - queries.unsqueeze(1)).norm(dim=-1)  # (B, candidates)
        else:  # IVF-Flat / HNSW-Flat computed them from the float32 keys already: skip the gather
            distances = index_distances.to(ids.device, torch.float32)
        distances = distances.masked_fill(~valid, float("inf"))
        distances, order = torch.topk(distances, k, dim=1, largest=False)  # (B, k), nearest first
        return distances, ids.gather(1, order)

    # CPU searches finish in numpy (`_finish_search_numpy`); benchmarks switch this off to time the torch tail.
    _numpy_tail = True

    def _gather_keys_numpy(self, ids: np.ndarray) -> np.ndarray:
        """Stored keys of entry ids `(B, c)` int64 (all valid) -> `(B, c, D)` float32 numpy."""
        keys = getattr(self, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.device.type == "cpu" and keys.dtype == torch.float32:
            return keys.numpy()[ids]  # numpy fancy indexing: one thread, no OpenMP region
        return self.gather_keys(torch.from_numpy(ids)).to(torch.float32).numpy()

    def _finish_search_numpy(self, queries, index, index_distances, ids, k: int, candidates: int):
        """CPU tail of `search` in numpy: mask `-1` slots, recompute exact distances where needed, keep the k nearest.

        Why numpy: every torch op over the `(B, candidates)` results (>= 32k elements) runs in torch's OpenMP
        pool, whose idle threads then spin-wait for a while and take the cores away from faiss's next search
        (its own OpenMP runtime). That spinning was the wrapper's +23.5% over raw faiss at 1M entries with
        default OpenMP settings (benchmarks/README_scale.md). numpy's element-wise ops and fancy indexing run
        on the calling thread, so torch's pool stays asleep and no global thread setting is touched.
        Same values as the torch tail: distances `||z - z_i||_2` from the stored keys, `inf` / id 0 for
        empty slots, nearest first.
        """
        ids_np = ids.numpy()  # (B, candidates) int64, shares memory with faiss's output
        valid = ids_np >= 0
        safe = np.where(valid, ids_np, 0)
        if index.exact or not index.full_precision or candidates != k:
            neighbours = self._gather_keys_numpy(safe)  # (B, candidates, D)
            diff = neighbours - queries.detach().to(torch.float32).numpy()[:, None, :]
            distances = np.sqrt(np.einsum("bcd,bcd->bc", diff, diff))  # (B, candidates)
        else:  # IVF-Flat / HNSW-Flat computed them from the float32 keys already
            distances = index_distances.numpy().astype(np.float32, copy=True)
        distances[~valid] = np.inf
        order = np.argsort(distances, axis=1, kind="stable")[:, :k]  # (B, k), nearest first
        distances = np.take_along_axis(distances, order, 1)
        ids_out = np.take_along_axis(safe, order, 1)
        return torch.from_numpy(np.ascontiguousarray(distances)), torch.from_numpy(np.ascontiguousarray(ids_out))

    @_locked
    def attach_index(self, index: NeighbourIndex, source: str = "the index") -> None:
        """Use a prebuilt (e.g. loaded) index; raise `MemoryFileError` if it does not match the keys."""
        if index.dim != self.dim or len(index) != len(self):
            raise MemoryFileError(
                f"{source} has dimension {index.dim} and {len(index)} entries, but the memory's keys have dimension "
                f"{self.dim} and {len(self)} entries: the index and the memory come from different saves. Delete the "
                "index file (it is rebuilt from the keys at the next forward pass) or save the model again."
            )
        self._index = index
        self._index_key = (index.factory, self.keys_device, len(self))
        self._index_params = None

    # ------------------------------------------------------------------ task hooks
    def _task_metadata(self) -> dict[str, str]:
        """The task's metadata as strings (file metadata / manifest); none for classifiers."""
        return {}

    def _read_task_metadata(self, metadata: dict[str, str]) -> None:
        """Set the task's attributes from `_task_metadata` strings."""


class EditableMemory(MemoryStore):
    """A store whose entries are tensors in RAM (or on a GPU): searchable, editable, saved to one file.

    One non-persistent buffer per schema field (they follow `model.to(device)` but are saved in their
    own file by `save` / `load`, not in the model weights). `add` appends entries, `remove` drops
    them by source example id; both persist through `save` / `load`.
    """

    def __init__(self):
        super().__init__()
        for name, dtype, ndim in self.schema.fields:
            self.register_buffer(name, torch.empty((0,) * ndim, dtype=dtype), persistent=False)

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def dim(self) -> int:
        return self.keys.shape[1] if self.keys.dim() == 2 else 0

    @property
    def keys_device(self) -> torch.device:
        return self.keys.device

    def field_rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        # index_select copies whole rows, 3-4x faster than advanced indexing `t[ids]` (same values).
        return getattr(self, name).index_select(0, ids.reshape(-1).to(self.keys.device))

    def entry_tensors(self) -> dict[str, torch.Tensor]:
        """Every per-entry tensor, by schema field name (optional fields may be empty)."""
        return {name: getattr(self, name) for name in self.schema.names}

    def _widths(self) -> dict[str, int]:
        return {name: t.shape[1] for name, t in self.entry_tensors().items() if t.dim() == 2 and t.numel()}

    def _stored(self, name: str) -> bool:
        """Whether field `name` holds data (an optional field may be stored empty)."""
        return getattr(self, name).numel() > 0

    def _row_bytes(self) -> int:
        """Bytes one entry takes over all stored fields."""
        return int(sum(t.element_size() * (t.shape[1] if t.dim() > 1 else 1) for t in self.entry_tensors().values() if t.numel()))

    def _make_index(self, factory: str) -> NeighbourIndex:
        return build_index(self.keys, factory)

    @_locked
    def _apply(self, fn, recurse=True):
        # A device move invalidates the search index built over the old keys (a no-op move keeps it).
        device = self.keys.device
        result = super()._apply(fn, recurse)
        if self.keys.device != device:
            self._index = None
        return result

    def _coerce(self, tensors: dict, device) -> dict[str, torch.Tensor]:
        """Schema dtypes, `device`, contiguous; a missing optional field becomes empty `(0, 0)`."""
        out = {}
        for name, dtype, ndim in self.schema.fields:
            t = tensors.get(name)
            t = torch.empty((0,) * ndim, dtype=dtype) if t is None else torch.as_tensor(t)
            t = t.to(device, dtype)
            if ndim == 1 and t.dim() != 1:
                t = t.reshape(-1)
            out[name] = t.contiguous()  # the same tensor when nothing changes (memories built together share keys)
        return out

    @_locked
    def _replace(
        self, tensors: dict, fingerprint: str | None, layer: str | None, source: str, error=ValueError, check_content: bool = True
    ) -> None:
        """Replace the whole content with `tensors` (checked by `_check_entries`)."""
        self._check_entries(tensors, source, error, check_content=check_content)
        device = tensors["keys"].device if isinstance(tensors["keys"], torch.Tensor) else torch.device("cpu")
        for name, t in self._coerce(tensors, device).items():
            setattr(self, name, t)
        self.fingerprint, self.layer = fingerprint, layer
        self._index = None

    # ------------------------------------------------------------------ editing
    @_locked
    def add(self, data, *, example_ids=None, **embed_kwargs) -> "EditableMemory":
        """Append entries given as tensors (the wrapper embeds data: use `model.add_to_memory(dataset)`).

        Args:
            data: dict of the schema's fields (`keys` `(n, D)` and the task's payload, see the class
                docstring); `example_ids` `(n,)` may be in it or passed as the argument.
            example_ids: `(n,)` ids of the new entries; for a classifier memory they default to the next
                ids after the largest existing one, so ids stay unique. Pass your own to `remove` them later.
            embed_kwargs: accepted only to say, for a dataset, that the model embeds it (`model.add_to_memory`).
        Returns:
            The memory (`len(memory)` grew by n).
        """
        if not isinstance(data, dict) or embed_kwargs:
            raise ValueError(
                "A memory stores tensors and does not embed data: call `model.add_to_memory(dataset, ...)` (the model "
                f"embeds it), or pass a dict of {list(self.schema.required)} tensors."
            )
        data = dict(data)
        missing = [name for name in self.schema.required if name != "example_ids" and data.get(name) is None]
        if missing:
            raise ValueError(f"add(dict) needs {list(n for n in self.schema.required if n != 'example_ids')}; missing {sorted(missing)}.")
        if example_ids is not None:
            data["example_ids"] = _as_id_tensor(example_ids)
        if data.get("example_ids") is None:
            if not self.schema.one_entry_per_example:
                raise ValueError("add(dict) of token entries needs `example_ids` (one per entry): use `model.add_to_memory`.")
            first = int(self.example_ids.max()) + 1 if len(self) else 0
            data["example_ids"] = torch.arange(first, first + torch.as_tensor(data["keys"]).shape[0])
        self.add_entries_dict(data)
        return self

    @_locked
    def add_entries_dict(self, tensors: dict) -> None:
        """Append entries `{field: (n, ...)}` (checked by `_check_entries`); their example ids must be new."""
        tensors = {name: (torch.as_tensor(t) if t is not None else None) for name, t in tensors.items()}
        if "example_ids" in tensors:
            tensors["example_ids"] = _as_id_tensor(tensors["example_ids"])
        n = self._check_entries(tensors, ADD_SOURCE, append=True)
        new = self._coerce(tensors, self.keys.device)
        ids = new["example_ids"]
        clash = torch.isin(ids, self.example_ids) if len(self) else torch.zeros(n, dtype=torch.bool)
        if clash.any():
            raise ValueError(
                f"example_ids must be unique across the memory; {torch.unique(ids[clash])[:10].tolist()} already exist "
                "(or the new ids repeat). Leave `example_ids=None` to number new entries after the existing ones."
            )
        index, was_empty = self._index, len(self) == 0
        for name, t in new.items():
            old = getattr(self, name)
            setattr(self, name, t if was_empty or (old.numel() == 0 and t.numel() == 0) else torch.cat([old, t]))
        self._index = None
        if index is not None and index.mutable and len(index) == len(self) - n:  # extend the trained index
            index.add(new["keys"])
            self._index = index
            self._index_key = self._index_key[:-1] + (len(self),)

    @_locked
    def remove(self, ids) -> int:
        """Drop the entries built from the given source example ids (e.g. to forget data).

        Args:
            ids: example ids (int, list or `(n,)` tensor) present in `memory.example_ids`.
        Returns:
            The number of entries removed.
        Raises:
            ValueError: when an id is not in the memory (nothing is removed then).
        """
        ids = _as_id_tensor(ids).to(self.example_ids.device)
        known = torch.isin(ids, self.example_ids)
        if not known.all():
            raise ValueError(
                f"Unknown example ids {ids[~known][:10].tolist()}: the memory holds {len(self)} entries with ids "
                f"{self.example_ids.min().item() if len(self) else '-'}..{self.example_ids.max().item() if len(self) else '-'} "
                "(see `memory.example_ids`). Nothing was removed."
            )
        keep = ~torch.isin(self.example_ids, ids)  # (N,)
        removed = int((~keep).sum())
        index = self._index
        for name, t in self.entry_tensors().items():
            if t.numel():
                setattr(self, name, t[keep].contiguous())
        self._index = None
        if index is not None and index.mutable and not index.exact and len(self):
            index.reset()  # keep the trained centroids / codebooks, re-add the remaining keys
            index.add(self.keys)
            self._index = index
            self._index_key = self._index_key[:-1] + (len(self),)
        return removed

    # ------------------------------------------------------------------ persistence
    def save(self, path: str, index_path: str | None = None, extra_metadata: dict[str, str] | None = None) -> None:
        """Write the memory to one safetensors file (tensors + metadata, never pickle), via a temporary file.

        Args:
            index_path: also write the current search index there when it is a trained approximate
                index (IVF, HNSW, PQ), so that loading does not retrain it.
            extra_metadata: more metadata strings, e.g. the save id that loading checks against config.json.
        """
        metadata = {
            "format": self.schema.format,
            "format_version": self.schema.format_version,
            "fingerprint": self.fingerprint or "",
            "layer": self.layer or "",
            "num_entries": str(len(self)),
            **self._task_metadata(),
            **(extra_metadata or {}),
        }
        self._save_index(index_path, metadata)
        tensors = {n: t.detach().cpu().contiguous() for n, t in self.entry_tensors().items()}
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def read_file(cls, path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Read a memory file of this class's schema; raise `MemoryFileError` naming the fix if it is unusable."""
        schema = cls.schema
        tensors, metadata = open_memory_file(path, schema.format, schema.rebuild_hint, schema.kind)
        missing = [key for key in ("fingerprint", "layer") if key not in metadata]
        if missing:
            raise MemoryFileError(
                f"The memory file {path} lacks {missing} in its metadata (it was not written by "
                "`save_pretrained`, or by a much older version): rebuild the memory with "
                "`model.build_memory(dataset)` and save the model again."
            )
        n = int(metadata.get("num_entries", -1))
        if set(tensors) != set(schema.names) or any(
            t.shape[:1] != (n,) for name, t in tensors.items() if not (name in schema.optional and t.numel() == 0)
        ):
            raise MemoryFileError(
                f"The memory file {path} is inconsistent: expected tensors {list(schema.names)} with {n} rows each, "
                f"found { {k: tuple(v.shape) for k, v in tensors.items()} }. Save the model again."
            )
        cls._check_file_content(tensors, metadata, f"The memory file {path}")
        return tensors, metadata

    def load(self, path: str, index_path: str | None = None, mmap_index: bool = True) -> dict[str, str]:
        """Load a file written by `save` (validated by `read_file` and `_check_entries`).

        Args:
            index_path: a faiss index written by `save` beside the memory; read memory-mapped (by
                default) and checked against the stored keys (dimension and entry count).
        Returns:
            The file's metadata (e.g. the `save_id` the wrapper checks against config.json).
        """
        tensors, metadata = self.read_file(path)
        device = self.keys.device if self.keys.device.type != "meta" else torch.device("cpu")
        tensors = {name: t.to(device) for name, t in tensors.items()}
        previous, self.augmentation = self.augmentation, metadata.get("augmentation", "none")  # its id rule applies
        try:
            # read_file checked every value, naming the file
            self._replace(tensors, metadata["fingerprint"], metadata["layer"], path, MemoryFileError, check_content=False)
        except Exception:
            self.augmentation = previous
            raise
        self._read_task_metadata(metadata)
        self._load_index(index_path, metadata, mmap_index)
        return metadata

    def _save_index(self, index_path: str | None, metadata: dict) -> None:
        """Write a trained approximate index (IVF, HNSW, PQ) beside the memory and note its factory in `metadata`."""
        if index_path is not None and self._index is not None and self._index.savable and len(self._index) == len(self):
            self._index.save(index_path)
            metadata.update(index_record(index_path, self._index))  # binds the file to this memory (checked at load)

    def _load_index(self, index_path: str | None, metadata: dict, mmap_index: bool = True) -> None:
        """Attach the index written by `_save_index`, if any (checked against the keys)."""
        factory = metadata.get("index_factory")
        if index_path is not None and factory and os.path.isfile(index_path):
            if verify_index_file(index_path, metadata, self.dim, len(self)):  # else warn; rebuilt from the keys
                self.attach_index(FaissIndex.load(index_path, factory, mmap=mmap_index), index_path)


class ClassifierResiduals:
    """The classifier payload: dense base logits `(N, C)` and labels; residuals recomputed at any temperature.

    Mixed into a store ([`ResidualMemory`] in RAM, the on-disk classifier memory); uses only
    `field_rows` and `search`.
    """

    schema = CLASSIFIER_SCHEMA

    def _check_content(self, tensors: dict, source: str, error: type[Exception], joining: bool) -> None:
        fix = FILE_FIX if issubclass(error, MemoryFileError) else ADD_FIX
        classes = self._widths().get("base_logits") if joining else None
        check_classifier_entries(tensors, classes, source, dim=self.dim if joining else None, error=error, fix=fix,
                                 max_repeats=views_per_example(self.augmentation))

    @classmethod
    def _check_file_content(cls, tensors: dict, metadata: dict, source: str) -> None:
        check_classifier_entries(tensors, None, source, error=MemoryFileError, fix=FILE_FIX,
                                 max_repeats=views_per_example(metadata.get("augmentation")))

    # The key space the stored keys live in (`resmem.key_variants.key_space_id`: "none", "l2", "standardize:<digest>"),
    # set by the wrapper's build; written to the file / manifest metadata only when not "none" (default files unchanged).
    key_space: str = "none"

    def _task_metadata(self) -> dict[str, str]:
        # Only a non-default augmentation / key space is named, so files of the default memory are byte-identical.
        metadata = {} if self.augmentation == "none" else {"augmentation": self.augmentation}
        if self.key_space != "none":
            metadata["key_space"] = self.key_space
        return metadata

    def _read_task_metadata(self, metadata: dict[str, str]) -> None:
        self.augmentation = metadata.get("augmentation", "none")
        self.key_space = metadata.get("key_space") or "none"

    def neighbour_residuals(self, ids: torch.Tensor, temperature: float) -> torch.Tensor:
        """Residuals of the given entries at temperature `T`: `(B, k)` ids -> `(B, k, C)`."""
        b, k = ids.shape
        flat = ids.reshape(-1)
        logits, labels = self.field_rows("base_logits", flat), self.field_rows("labels", flat)  # (B*k, C), (B*k,)
        return residuals(logits, labels, temperature).view(b, k, -1)

    @_locked
    def residual_for(
        self,
        queries: torch.Tensor,
        k: int,
        sigma: float,
        temperature: float,
        index_spec: str = "auto",
        index_params: dict | None = None,
        sigma_mode: str = "absolute",
    ):
        """`r_kNN(x) = sum_i w_i r_i` over the k nearest entries.

        Args:
            queries: `(B, D)` key embeddings of the inputs (in the memory's key space, see `key_space`).
            sigma_mode: `"absolute"` (`w = softmax(-d / sigma)`) or `"relative"` (`sigma * d_k(x)`, see `resmem.key_variants`).
        Returns:
            `(B, C)` float32 residual to add to `softmax(f(x) / T)`, on the queries' device.
        """
        distances, ids = self.search(queries, k, index_spec, index_params)
        weights = neighbour_weights(distances, sigma, sigma_mode)  # (B, k)
        weights = torch.nan_to_num(weights, nan=0.0)  # a query with no neighbour at all gets no residual
        residual = weighted_residual(weights, self.neighbour_residuals(ids, temperature).to(weights.device))  # (B, C)
        return residual.to(queries.device)


class ResidualMemory(ClassifierResiduals, EditableMemory):
    """Keys `z_i = phi(x_i)` with the base logits and labels of each memory entry (classifiers).

    Residuals `onehot(y_i) - softmax(f(x_i) / T)` are recomputed from the stored logits for
    the neighbours of each query, so `temperature` can change without a rebuild. The tensors
    are non-persistent buffers: they follow `model.to(device)` but are saved in their own file
    (`save` / `load`), not in the model weights.

    The memory is editable: `add` appends entries given as tensors, `remove` drops entries by source
    example id (e.g. to forget data); both persist through `save` / `load`. To add a dataset, let the
    model embed it: `model.add_to_memory(dataset)`.

    Buffers:
        keys: `(N, D)` float32.  base_logits: `(N, C)` float32.  labels: `(N,)` int64.
        example_ids: `(N,)` int64, unique id of the source example (its row in the dataset the memory
        was built from; rows added later get ids after the largest existing one unless given).

    Example:

    ```python
    >>> model.build_memory(train_dataset)
    >>> model.add_to_memory(extra_dataset)       # appended, ids continue after the largest id
    >>> model.remove_from_memory([3, 17])        # forget source examples 3 and 17
    >>> model.save_pretrained("folder")          # the edited memory is what gets saved
    ```
    """

    def set_entries(self, keys, base_logits, labels, example_ids, fingerprint: str, layer: str) -> None:
        """Replace the memory's content (shapes as in the class docstring)."""
        tensors = {"keys": keys, "base_logits": base_logits, "labels": labels, "example_ids": example_ids}
        self._replace(tensors, fingerprint, layer, "set_entries")

    def add_entries(self, keys, base_logits, labels, example_ids) -> None:
        """Append raw entries (shapes as in the class docstring); ids must be new and unique."""
        self.add_entries_dict({"keys": keys, "base_logits": base_logits, "labels": labels, "example_ids": example_ids})
