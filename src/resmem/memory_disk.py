"""A residual memory that need not fit in RAM: safetensors shards written during the build, memory-mapped at load.

Layout of a memory folder (a model folder saved with such a memory holds the same files):

    resmem_memory.index.json          manifest: build id, entry count, shape, shard list
    resmem_memory-00000.safetensors   keys (n, D) f32, base_logits (n, C) f32, labels (n,), example_ids (n,)
    resmem_memory-00001.safetensors   ... every shard's metadata names the build id
    resmem_index.faiss                the trained approximate index of a save (optional), read with IO_FLAG_MMAP

Searching touches only the probed IVF lists of the memory-mapped index and the k candidate rows
of each query in the memory-mapped shards. `MemoryWriter` builds such a folder from chunks of
arrays (no model needed), e.g. for 5 million entries on a small machine:

```python
>>> from resmem.memory_disk import MemoryWriter, OnDiskMemory
>>> with MemoryWriter("memory-dir", fingerprint="synthetic", layer="none") as writer:
...     for keys, logits, labels in chunks:          # numpy or torch, any chunk size
...         writer.add(keys, logits, labels)
>>> memory = OnDiskMemory.open("memory-dir")
>>> memory.build_index("IVF1024,Flat")           # trained, cached under resmem_cache_dir(), memory-mapped
>>> model.memory = memory                        # or ResMemWrapper.from_pretrained(saved folder)
```
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import uuid

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers.utils import logging

from .atomic import link_or_copy, save_index_atomic, write_json_atomic
from .hub import INDEX_FILE, resmem_cache_dir
from .index import FaissIndex, NeighbourIndex, build_index, resolve_spec
from .memory import MEMORY_FORMAT, MEMORY_FORMAT_VERSION, MemoryFileError, ResidualMemory
from .residuals import residuals

logger = logging.get_logger(__name__)

MANIFEST_FILE = "resmem_memory.index.json"
SHARD_FILE = "resmem_memory-{:05d}.safetensors"
FIELDS = ("keys", "base_logits", "labels", "example_ids")
# The only shard names a manifest may list: a plain file name, so no manifest can point outside its folder.
SHARD_NAME_PATTERN = re.compile(r"resmem_memory-[0-9]{5,9}\.safetensors")
_DTYPES = {"F32": np.float32, "I64": np.int64, "F16": np.float16, "I32": np.int32}


def _numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype)


class MemoryWriter:
    """Write memory entries to safetensors shards as they come (bounded RAM: one shard's rows at most).

    Args:
        folder: output folder (created; must not already hold a memory).
        fingerprint, layer: stored in the manifest, checked when a model loads the memory.
        shard_size: rows per shard file.
    """

    def __init__(self, folder: str, fingerprint: str = "", layer: str = "", shard_size: int = 500_000):
        if os.path.exists(os.path.join(folder, MANIFEST_FILE)):
            raise ValueError(f"{folder} already holds a memory; write the new one to another folder.")
        os.makedirs(folder, exist_ok=True)
        self.folder, self.fingerprint, self.layer, self.shard_size = folder, fingerprint, layer, shard_size
        self.build_id = uuid.uuid4().hex
        self.shards: list[dict] = []
        self.num_entries = 0
        self.shape: tuple[int, int] | None = None
        self._pending: list[tuple[np.ndarray, ...]] = []
        self._pending_rows = 0
        self._closed = False

    def add(self, keys, base_logits, labels, example_ids=None) -> None:
        """Append a chunk: `keys (n, D)`, `base_logits (n, C)`, `labels (n,)`, `example_ids (n,)` (default: row numbers)."""
        keys, logits = _numpy(keys, np.float32), _numpy(base_logits, np.float32)
        labels = _numpy(labels, np.int64).reshape(-1)
        n = keys.shape[0]
        first = self.num_entries + self._pending_rows
        ids = np.arange(first, first + n, dtype=np.int64) if example_ids is None else _numpy(example_ids, np.int64)
        if not (logits.shape[0] == labels.shape[0] == ids.shape[0] == n):
            raise ValueError("keys, base_logits, labels and example_ids must have the same number of rows.")
        shape = (keys.shape[1], logits.shape[1])
        if self.shape is not None and shape != self.shape:
            raise ValueError(f"Chunk has key dimension {shape[0]} and {shape[1]} classes; earlier chunks had {self.shape}.")
        self.shape = shape
        self._pending.append((keys, logits, labels, ids))
        self._pending_rows += n
        while self._pending_rows >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, rows: int) -> None:
        parts = [np.concatenate([p[i] for p in self._pending]) for i in range(4)]
        shard, rest = [p[:rows] for p in parts], [p[rows:] for p in parts]
        self._pending = [tuple(rest)] if rest[0].shape[0] else []
        self._pending_rows = rest[0].shape[0]
        name = SHARD_FILE.format(len(self.shards))
        metadata = {
            "format": MEMORY_FORMAT, "format_version": MEMORY_FORMAT_VERSION, "build_id": self.build_id,
            "shard": str(len(self.shards)), "first_row": str(self.num_entries), "num_entries": str(shard[0].shape[0]),
        }
        path = os.path.join(self.folder, name)
        save_file(dict(zip(FIELDS, shard)), path + ".tmp", metadata=metadata)
        os.replace(path + ".tmp", path)  # a new inode: never rewrites a file an earlier save hard-linked
        self.shards.append({"file": name, "num_entries": int(shard[0].shape[0])})
        self.num_entries += shard[0].shape[0]

    def close(self) -> None:
        """Write the last shard and the manifest (the memory is readable only after this)."""
        if self._closed:
            return
        if self._pending_rows:
            self._flush(self._pending_rows)
        if not self.num_entries:
            raise ValueError("No entries were added: the memory needs at least one.")
        manifest = {
            "format": MEMORY_FORMAT, "format_version": MEMORY_FORMAT_VERSION, "build_id": self.build_id,
            "num_entries": self.num_entries, "dim": self.shape[0], "num_classes": self.shape[1],
            "fingerprint": self.fingerprint, "layer": self.layer, "shards": self.shards,
        }
        write_json_atomic(os.path.join(self.folder, MANIFEST_FILE), manifest)
        self._closed = True

    def __enter__(self) -> "MemoryWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()


def _safetensors_layout(path: str) -> tuple[dict, dict, int]:
    """(tensor table, metadata, data start offset) of a safetensors file, from its header only."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return header, header.pop("__metadata__", {}) or {}, 8 + size


class _Shard:
    """One shard's tensors as read-only memory maps (pages are read only when touched)."""

    def __init__(self, path: str):
        header, self.metadata, start = _safetensors_layout(path)
        self.path, self.arrays, self.offsets = path, {}, {}
        for name in FIELDS:
            info = header[name]
            offset = start + info["data_offsets"][0]
            dtype = _DTYPES[info["dtype"]]
            self.offsets[name] = (offset, dtype, tuple(info["shape"]))
            # mode "c": copy-on-write, so torch gets a writable view and nothing is ever written back.
            self.arrays[name] = torch.from_numpy(np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=tuple(info["shape"])))

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows `[start, stop)` read with a plain file read (bulk scans do not leave mapped pages resident)."""
        offset, dtype, shape = self.offsets[name]
        row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        with open(self.path, "rb") as f:
            f.seek(offset + start * row * np.dtype(dtype).itemsize)
            out = np.fromfile(f, dtype=dtype, count=(stop - start) * row)
        return out.reshape((stop - start, *shape[1:]))


class ShardedRows:
    """`(N, D)` rows spread over shards, read in slices (what `FaissIndex` needs to train and add)."""

    def __init__(self, shards: list[_Shard], name: str, starts: list[int], total: int):
        self.shards, self.name, self.starts, self.total = shards, name, starts, total
        self.shape = (total, *shards[0].offsets[name][2][1:])

    def __getitem__(self, item: slice) -> np.ndarray:
        start, stop, step = item.indices(self.total)
        if step != 1:
            rows = np.arange(start, stop, step)
            return np.concatenate([self[int(r) : int(r) + 1] for r in rows]) if len(rows) < 64 else self._strided(rows)
        parts = []
        for shard, first in zip(self.shards, self.starts):
            n = shard.offsets[self.name][2][0]
            lo, hi = max(start, first), min(stop, first + n)
            if lo < hi:
                parts.append(shard.read_rows(self.name, lo - first, hi - first))
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def _strided(self, rows: np.ndarray) -> np.ndarray:
        parts = []
        for shard, first in zip(self.shards, self.starts):
            n = shard.offsets[self.name][2][0]
            mine = rows[(rows >= first) & (rows < first + n)] - first
            if mine.size:
                parts.append(np.asarray(shard.arrays[self.name].numpy()[mine]))
        return np.concatenate(parts)


class OnDiskMemory(ResidualMemory):
    """A [`ResidualMemory`] whose entries stay in memory-mapped safetensors shards (see the module docstring).

    Read-only: `add` / `remove` raise (write a new memory with [`MemoryWriter`]). The search index
    should be approximate (`"auto"` picks IVF from 200,000 entries): an exact faiss index would copy
    every key into RAM.
    """

    def __init__(self, folder: str, manifest: dict, shards: list[_Shard]):
        super().__init__()
        self.folder, self.manifest, self.shards = folder, manifest, shards
        counts = [s.offsets["keys"][2][0] for s in shards]
        self.starts = list(np.cumsum([0] + counts[:-1]).tolist())
        self._starts_t = torch.tensor(self.starts + [sum(counts)])
        self._num_entries = sum(counts)
        self.fingerprint, self.layer = manifest.get("fingerprint") or "", manifest.get("layer") or ""
        self._index_path: str | None = None  # file the current index is memory-mapped from (cache or loaded folder)

    @classmethod
    def open(cls, folder: str, files: dict[str, str] | None = None) -> "OnDiskMemory":
        """Open a memory folder, checking that every shard is present and from the same build.

        Opening only reads: nothing is ever written into `folder` (it may be a loaded save or a
        Hugging Face cache snapshot); an index trained later goes to `resmem_cache_dir()`.

        Args:
            files: optional map from file name to local path (files resolved from a Hub cache).
        """
        files = files or {}
        manifest_path = files.get(MANIFEST_FILE, os.path.join(folder, MANIFEST_FILE))
        if not os.path.isfile(manifest_path):
            raise MemoryFileError(f"{folder} has no {MANIFEST_FILE}: it is not a sharded memory (or the build did not finish).")
        manifest = read_manifest(manifest_path)
        names = shard_file_names(manifest, manifest_path)
        shards = []
        for i, (entry, name) in enumerate(zip(manifest["shards"], names)):
            path = files.get(name, os.path.join(folder, name))
            if not os.path.isfile(path):
                raise MemoryFileError(
                    f"Memory shard {name} ({i + 1} of {len(names)}) is missing from {folder}. "
                    "Copy every resmem_memory-*.safetensors file of the build, or rebuild the memory."
                )
            try:
                shard = _Shard(path)
            except Exception as err:
                raise MemoryFileError(f"Memory shard {path} cannot be read ({err}); it is truncated or corrupt.") from err
            if shard.metadata.get("build_id") != manifest["build_id"]:
                raise MemoryFileError(
                    f"Memory shard {name} comes from build {shard.metadata.get('build_id', '?')[:12]}, but the "
                    f"manifest lists build {manifest['build_id'][:12]}: the folder mixes files of two different builds. "
                    "Copy all shards of one build together, or rebuild the memory."
                )
            if shard.offsets["keys"][2][0] != entry["num_entries"]:
                raise MemoryFileError(f"Memory shard {name} holds {shard.offsets['keys'][2][0]} rows, the manifest says {entry['num_entries']}.")
            shards.append(shard)
        memory = cls(folder, manifest, shards)
        index_path = files.get(INDEX_FILE, os.path.join(folder, INDEX_FILE))
        if manifest.get("index_factory") and os.path.isfile(index_path):
            memory.attach_index(FaissIndex.load(index_path, manifest["index_factory"]), index_path)
            memory._index_path = index_path
        return memory

    def __len__(self) -> int:
        return self._num_entries

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def all_example_ids(self) -> torch.Tensor:
        """`(N,)` example ids of every entry (read from the shards on demand; 8 bytes per entry)."""
        return torch.cat([s.arrays["example_ids"] for s in self.shards])

    def rows(self, name: str) -> ShardedRows:
        return ShardedRows(self.shards, name, self.starts, len(self))

    def _gather(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).cpu()
        shard_of = torch.searchsorted(self._starts_t, flat, right=True) - 1  # (M,)
        first = self.shards[0].arrays[name]
        out = torch.empty((flat.shape[0], *first.shape[1:]), dtype=first.dtype)
        for s in torch.unique(shard_of).tolist():
            mask = shard_of == s
            out[mask] = self.shards[s].arrays[name][flat[mask] - self.starts[s]]
        return out.view(*ids.shape, *first.shape[1:])

    def gather_keys(self, ids):
        return self._gather("keys", ids)

    def neighbour_residuals(self, ids, temperature):
        b, k = ids.shape
        logits, labels = self._gather("base_logits", ids.reshape(-1)), self._gather("labels", ids.reshape(-1))
        return residuals(logits, labels, temperature).view(b, k, -1)

    def residual_for(self, queries, *args, **kwargs):
        return super().residual_for(queries, *args, **kwargs).to(queries.device)

    def index(self, spec: str, params: dict | None = None) -> NeighbourIndex:
        factory = resolve_spec(spec, len(self))
        if self._index is None or self._index.factory != factory:
            self.build_index(spec)
        if dict(params or {}) != self._index_params:
            self._index.set_params(params)
            self._index_params = dict(params or {})
        return self._index

    def build_index(self, spec: str = "auto") -> NeighbourIndex:
        """Train and fill an index from the shards; an approximate one is cached and memory-mapped.

        The trained index is written (temporary name + rename) to
        `resmem_cache_dir()/indexes/<key>.faiss`, `key` = hash of the build id, the entry count,
        the key dimension and the factory string, and reused from there by every later process. It is
        never written into `self.folder`: that folder may be a save another model was loaded from
        (whose files a later save hard-links) or a read-only Hugging Face cache snapshot. Without a
        writable cache the index stays in RAM.
        """
        factory = resolve_spec(spec, len(self))
        path = self._cached_index_path(factory)
        index = None
        if path is not None and os.path.isfile(path):
            try:
                index = FaissIndex.load(path, factory)
            except Exception:  # a damaged cache entry is trained again and replaced
                index = None
            if index is not None and (index.dim != self.dim or len(index) != len(self)):
                index = None
        if index is None:
            index = build_index(self.rows("keys"), spec)
            if index.savable and path is not None:
                try:
                    save_index_atomic(index, path)
                    index = FaissIndex.load(path, index.factory)  # drop the in-RAM copy; search from the mapped file
                except OSError as err:
                    logger.warning_once(f"Cannot cache the trained index in {os.path.dirname(path)} ({err}); keeping it in RAM.")
                    path = None
            else:
                path = None
        self._index, self._index_key, self._index_params = index, (index.factory, torch.device("cpu"), len(self)), None
        self._index_path = path
        return index

    def _cached_index_path(self, factory: str) -> str | None:
        """Where `build_index` caches the `factory` index of this build (None without a build id)."""
        build_id = self.manifest.get("build_id")
        if not isinstance(build_id, str) or not build_id:
            return None
        key = hashlib.sha256(f"{build_id}\0{len(self)}\0{self.dim}\0{factory}".encode()).hexdigest()[:40]
        return os.path.join(resmem_cache_dir(), "indexes", f"{key}.faiss")

    def add(self, *args, **kwargs):
        raise ValueError("An OnDiskMemory is read-only: write a new memory with `resmem.memory_disk.MemoryWriter`.")

    add_entries = remove = add

    def save_folder(self, target: str, save_id: str | None = None) -> None:
        """Put the shards, a new manifest and the current approximate index into `target`.

        Shards and the index are hard-linked where possible (else copied): neither is ever modified
        in place (shards are written once, cached indexes only replaced by rename). The manifest is
        written anew, with `save_id` (checked against config.json at load) and the factory of the
        index saved beside it.
        """
        names = shard_file_names(self.manifest)
        for shard, name in zip(self.shards, names):
            link_or_copy(shard.path, os.path.join(target, name))
        manifest = {key: value for key, value in self.manifest.items() if key not in ("index_factory", "save_id")}
        index = self._index
        if index is not None and index.savable and len(index) == len(self):
            destination = os.path.join(target, INDEX_FILE)
            source = getattr(self, "_index_path", None)
            if source and os.path.isfile(source):
                link_or_copy(source, destination)
            else:
                index.save(destination)
            manifest["index_factory"] = index.factory
        if save_id:
            manifest["save_id"] = save_id
        write_json_atomic(os.path.join(target, MANIFEST_FILE), manifest)

    def save(self, path: str, index_path: str | None = None) -> None:
        raise ValueError("An OnDiskMemory is saved as a folder: use `save_folder(folder)` or `model.save_pretrained`.")


def read_manifest(path: str) -> dict:
    """Read and check a memory manifest; a truncated or malformed one raises `MemoryFileError` naming the fix."""
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        raise MemoryFileError(
            f"The memory manifest {path} is truncated or not JSON ({err}). Copy it again from the save it came "
            "from, or save the model again."
        ) from err
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if (
        not isinstance(shards, list)
        or not shards
        or not isinstance(manifest.get("build_id"), str)
        or not all(isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("num_entries"), int) for e in shards)
    ):
        raise MemoryFileError(
            f"The memory manifest {path} is malformed (it needs a 'build_id' and a list of 'shards' with 'file' and "
            "'num_entries'). Copy it again from the save it came from, or save the model again."
        )
    return manifest


def shard_file_names(manifest: dict, source: str = "the memory manifest") -> list[str]:
    """The shard file names a manifest lists, each checked to be a plain `resmem_memory-NNNNN.safetensors` name.

    A name such as `../x` or `/etc/x` would make loading read, and a later save hard-link, a file outside
    the memory's folder: it raises `MemoryFileError`.
    """
    names = [entry["file"] for entry in manifest["shards"]]
    for name in names:
        if not (isinstance(name, str) and SHARD_NAME_PATTERN.fullmatch(name)):
            raise MemoryFileError(
                f"{source} lists the shard file {name!r}, which is not a plain shard name like "
                "'resmem_memory-00000.safetensors' inside the memory's folder. The manifest was edited or damaged: "
                "copy the save again or rebuild the memory."
            )
    if len(set(names)) != len(names):
        raise MemoryFileError(f"{source} lists a shard file twice; copy the save again or rebuild the memory.")
    return names


__all__ = ["MANIFEST_FILE", "MemoryWriter", "OnDiskMemory", "ShardedRows", "read_manifest", "shard_file_names"]
