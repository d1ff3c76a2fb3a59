"""`ResidualMemory`: the stored keys and what is needed to recompute residuals at any temperature."""

from __future__ import annotations

import functools
import json
import os
import threading
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .index import FaissIndex, NeighbourIndex, build_index, resolve_spec
from .residuals import neighbour_weights, residuals, weighted_residual

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


def _locked(method):
    """Run a `ResidualMemory` method under the memory's lock (edits vs. forwards from other threads)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


def _as_id_tensor(ids) -> torch.Tensor:
    if isinstance(ids, int):
        ids = [ids]
    return torch.as_tensor(ids if not isinstance(ids, torch.Tensor) else ids.cpu(), dtype=torch.long).reshape(-1)


class ResidualMemory(nn.Module):
    """Keys `z_i = phi(x_i)` with the base logits and labels of each memory entry.

    Residuals `onehot(y_i) - softmax(f(x_i) / T)` are recomputed from the stored logits for
    the neighbours of each query, so `temperature` can change without a rebuild. The tensors
    are non-persistent buffers: they follow `model.to(device)` but are saved in their own file
    (`save` / `load`), not in the model weights.

    The memory is editable: `add` appends entries (from a dataset, embedded by the model that owns
    the memory, or from tensors), `remove` drops entries by source example id (e.g. to forget
    data); both persist through `save` / `load`.

    Buffers:
        keys: `(N, D)` float32.  base_logits: `(N, C)` float32.  labels: `(N,)` int64.
        example_ids: `(N,)` int64, unique id of the source example (its row in the dataset the memory
        was built from; rows added later get ids after the largest existing one unless given).

    Example:

    ```python
    >>> model.build_memory(train_dataset)
    >>> model.memory.add(extra_dataset)          # appended, ids continue after the largest id
    >>> model.memory.remove([3, 17])             # forget source examples 3 and 17
    >>> model.save_pretrained("folder")          # the edited memory is what gets saved
    ```
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("keys", torch.empty(0, 0), persistent=False)
        self.register_buffer("base_logits", torch.empty(0, 0), persistent=False)
        self.register_buffer("labels", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("example_ids", torch.empty(0, dtype=torch.long), persistent=False)
        self.fingerprint: str | None = None
        self.layer: str | None = None
        self._index: NeighbourIndex | None = None
        self._index_key: tuple | None = None
        self._index_params: dict | None = None
        object.__setattr__(self, "_owner", None)  # the wrapper that embeds datasets for `add` (see `attach`)
        # Held by every edit and by the whole read path of a forward (search + neighbour residuals), so that
        # threads sharing the model see the memory before or after an edit, never in between. Reentrant:
        # `add` calls `add_entries`, `residual_for` calls `search`. Not copied by deepcopy/pickle (see __getstate__).
        self._lock = threading.RLock()

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_lock", None)  # a lock cannot be copied or pickled; each copy gets its own
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def dim(self) -> int:
        return self.keys.shape[1] if self.keys.dim() == 2 else 0

    @_locked
    def set_entries(self, keys, base_logits, labels, example_ids, fingerprint: str, layer: str) -> None:
        """Replace the memory's content (shapes as in the class docstring)."""
        n = keys.shape[0]
        if not (base_logits.shape[0] == labels.shape[0] == example_ids.shape[0] == n):
            raise ValueError("keys, base_logits, labels and example_ids must have the same number of rows.")
        if example_ids.numel() and torch.unique(example_ids).numel() != n:
            raise ValueError("example_ids must be unique: each memory entry names one source example.")
        self.keys = keys.float().contiguous()
        self.base_logits = base_logits.float().contiguous()
        self.labels = labels.long().contiguous()
        self.example_ids = example_ids.long().contiguous()
        self.fingerprint = fingerprint
        self.layer = layer
        self._index = None

    @_locked
    def _apply(self, fn, recurse=True):
        # A device move invalidates the search index built over the old keys (a no-op move keeps it).
        device = self.keys.device
        result = super()._apply(fn, recurse)
        if self.keys.device != device:
            self._index = None
        return result

    # ------------------------------------------------------------------ editing
    def attach(self, owner) -> None:
        """Let `add(dataset)` embed datasets with `owner.embed_dataset` (set by the wrapper).

        Held as a plain attribute, not a submodule (so no module cycle) and not a weak reference (so that
        `copy.deepcopy(model)` re-points the copy's memory at the copied model).
        """
        object.__setattr__(self, "_owner", owner)

    def add(self, data, *, example_ids=None, **embed_kwargs) -> "ResidualMemory":
        """Append entries to the memory.

        Args:
            data: a `datasets.Dataset` (embedded by the model owning this memory, with `embed_kwargs`
                such as `batch_size`, `label_column`, `image_processor`), or a dict with `keys` `(n, D)`,
                `base_logits` `(n, C)`, `labels` `(n,)` and optionally `example_ids` `(n,)`.
            example_ids: `(n,)` ids of the new entries; by default they continue after the largest
                existing id, so ids stay unique. Pass the ids of your own data set to `remove` them later.
        Returns:
            The memory (`len(memory)` grew by n).
        """
        if isinstance(data, dict):
            missing = {"keys", "base_logits", "labels"} - set(data)
            if missing:
                raise ValueError(f"add(dict) needs 'keys', 'base_logits' and 'labels'; missing {sorted(missing)}.")
            keys, logits, labels = data["keys"], data["base_logits"], data["labels"]
            example_ids = data.get("example_ids", example_ids)
        else:
            owner = self._owner
            if owner is None or owner.memory is not self:
                raise ValueError(
                    "This memory is not attached to a model, so it cannot embed a dataset: call "
                    "`model.add_to_memory(dataset)`, or pass a dict of `keys`, `base_logits` and `labels`."
                )
            keys, logits, labels, _ = owner.embed_dataset(data, **embed_kwargs)
        n = keys.shape[0]
        with self._lock:  # number and append in one step: two threads adding at once get distinct ids
            if example_ids is None:
                first = int(self.example_ids.max()) + 1 if len(self) else 0
                example_ids = torch.arange(first, first + n)
            self.add_entries(keys, logits, labels, _as_id_tensor(example_ids))
        return self

    @_locked
    def add_entries(self, keys, base_logits, labels, example_ids) -> None:
        """Append raw entries (shapes as in the class docstring); ids must be new and unique."""
        device = self.keys.device
        keys = torch.as_tensor(keys).to(device, torch.float32)
        base_logits = torch.as_tensor(base_logits).to(device, torch.float32)
        labels = torch.as_tensor(labels).to(device, torch.long).reshape(-1)
        example_ids = _as_id_tensor(example_ids).to(device)
        n = keys.shape[0]
        if not (base_logits.shape[0] == labels.shape[0] == example_ids.shape[0] == n):
            raise ValueError("keys, base_logits, labels and example_ids must have the same number of rows.")
        if len(self) and (keys.shape[1] != self.dim or base_logits.shape[1] != self.base_logits.shape[1]):
            raise ValueError(
                f"New entries have keys of dimension {keys.shape[1]} and {base_logits.shape[1]} classes; the memory "
                f"has {self.dim} and {self.base_logits.shape[1]}. Embed them with the same model and layer."
            )
        clash = torch.isin(example_ids, self.example_ids) if len(self) else torch.zeros(n, dtype=torch.bool)
        if clash.any() or torch.unique(example_ids).numel() != n:
            raise ValueError(
                f"example_ids must be unique across the memory; {example_ids[clash][:10].tolist()} already exist "
                "(or the new ids repeat). Leave `example_ids=None` to number new entries after the existing ones."
            )
        index = self._index
        if not len(self):
            self.keys, self.base_logits = keys.contiguous(), base_logits.contiguous()
            self.labels, self.example_ids = labels, example_ids
        else:
            self.keys = torch.cat([self.keys, keys])
            self.base_logits = torch.cat([self.base_logits, base_logits])
            self.labels = torch.cat([self.labels, labels])
            self.example_ids = torch.cat([self.example_ids, example_ids])
        self._index = None
        if index is not None and index.mutable:  # extend the trained index instead of rebuilding it
            index.add(keys)
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
        keep = ~torch.isin(self.example_ids, ids)
        removed = int((~keep).sum())
        index = self._index
        self.keys, self.base_logits = self.keys[keep].contiguous(), self.base_logits[keep].contiguous()
        self.labels, self.example_ids = self.labels[keep], self.example_ids[keep]
        self._index = None
        if index is not None and index.mutable and not index.exact and len(self):
            index.reset()  # keep the trained centroids / codebooks, re-add the remaining keys
            index.add(self.keys)
            self._index = index
            self._index_key = self._index_key[:-1] + (len(self),)
        return removed

    # ------------------------------------------------------------------ search
    @_locked
    def index(self, spec: str, params: dict | None = None) -> NeighbourIndex:
        """The search index over the keys, built on first use and rebuilt when `spec` or the device changes.

        `params` (`nprobe`, `efSearch`, ...) are applied whenever they differ from the last call.
        """
        key = (resolve_spec(spec, len(self)), self.keys.device, len(self))
        if self._index is None or self._index_key != key:
            self._index = build_index(self.keys, key[0])
            self._index_key = key
            self._index_params = None
        params = dict(params or {})
        if params != self._index_params:
            self._index.set_params(params)
            self._index_params = params
        return self._index

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
        # index_select copies whole rows, 3-4x faster than advanced indexing `keys[ids]` (same values).
        return self.keys.index_select(0, ids.reshape(-1)).view(*ids.shape, -1)

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
        factor = int((index_params or {}).get("rerank_factor", 1))
        index = self.index(index_spec, index_params)
        candidates = min(len(self), k * max(1, factor)) if not index.exact else k
        index_distances, ids = index.search(queries, candidates)  # (B, candidates)
        ids = ids.to(self.keys.device)
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

    def neighbour_residuals(self, ids: torch.Tensor, temperature: float) -> torch.Tensor:
        """Residuals of the given entries at temperature `T`: `(B, k)` ids -> `(B, k, C)`."""
        b, k = ids.shape
        flat = ids.reshape(-1)
        logits, labels = self.base_logits.index_select(0, flat), self.labels.index_select(0, flat)  # (B*k, C), (B*k,)
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
    ):
        """`r_kNN(x) = sum_i w_i r_i` over the k nearest entries.

        Args:
            queries: `(B, D)` key embeddings of the inputs.
        Returns:
            `(B, C)` float32 residual to add to `softmax(f(x) / T)`.
        """
        distances, ids = self.search(queries, k, index_spec, index_params)
        weights = neighbour_weights(distances, sigma)  # (B, k)
        weights = torch.nan_to_num(weights, nan=0.0)  # a query with no neighbour at all gets no residual
        return weighted_residual(weights, self.neighbour_residuals(ids, temperature))  # (B, C)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str, index_path: str | None = None) -> None:
        """Write the memory to one safetensors file (tensors + metadata, never pickle).

        Args:
            index_path: also write the current search index there when it is a trained approximate
                index (IVF, HNSW, PQ), so that loading does not retrain it.
        """
        metadata = {
            "format": MEMORY_FORMAT,
            "format_version": MEMORY_FORMAT_VERSION,
            "fingerprint": self.fingerprint or "",
            "layer": self.layer or "",
            "num_entries": str(len(self)),
        }
        self._save_index(index_path, metadata)
        tensors = {
            "keys": self.keys,
            "base_logits": self.base_logits,
            "labels": self.labels,
            "example_ids": self.example_ids,
        }
        save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, path, metadata=metadata)

    @staticmethod
    def read_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Read and validate a memory file; raise `MemoryFileError` naming the fix if it is unusable."""
        tensors, metadata = open_memory_file(
            path, MEMORY_FORMAT, "rebuild the memory with `model.build_memory(dataset)`", "a ResMem memory file"
        )
        n = int(metadata.get("num_entries", -1))
        expected = {"keys", "base_logits", "labels", "example_ids"}
        if set(tensors) != expected or any(t.shape[0] != n for t in tensors.values()):
            raise MemoryFileError(
                f"The memory file {path} is inconsistent: expected tensors {sorted(expected)} with {n} rows each, "
                f"found { {k: tuple(v.shape) for k, v in tensors.items()} }. Save the model again."
            )
        return tensors, metadata

    def load(self, path: str, index_path: str | None = None, mmap_index: bool = True) -> None:
        """Load a file written by `save` (validated by `read_file`).

        Args:
            index_path: a faiss index written by `save` beside the memory; read memory-mapped (by
                default) and checked against the stored keys (dimension and entry count).
        """
        tensors, metadata = self.read_file(path)
        device = self.keys.device if self.keys.device.type != "meta" else torch.device("cpu")
        self.set_entries(
            tensors["keys"].to(device),
            tensors["base_logits"].to(device),
            tensors["labels"].to(device),
            tensors["example_ids"].to(device),
            fingerprint=metadata["fingerprint"],
            layer=metadata["layer"],
        )
        self._load_index(index_path, metadata, mmap_index)

    def _save_index(self, index_path: str | None, metadata: dict) -> None:
        """Write a trained approximate index (IVF, HNSW, PQ) beside the memory and note its factory in `metadata`."""
        if index_path is not None and self._index is not None and self._index.savable and len(self._index) == len(self):
            self._index.save(index_path)
            metadata["index_factory"] = self._index.factory

    def _load_index(self, index_path: str | None, metadata: dict, mmap_index: bool = True) -> None:
        """Attach the index written by `_save_index`, if any (checked against the keys)."""
        factory = metadata.get("index_factory")
        if index_path is not None and factory and os.path.isfile(index_path):
            self.attach_index(FaissIndex.load(index_path, factory, mmap=mmap_index), index_path)

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
        self._index_key = (index.factory, self.keys.device, len(self))
        self._index_params = None
