"""A residual memory that need not fit in RAM: safetensors shards written during the build, memory-mapped at load.

One layout for every task; the per-entry fields come from the task's [`resmem.memory.MemorySchema`]:

    resmem_memory.index.json          manifest: format, build id, entry count, fields, task metadata, shard list
    resmem_memory-00000.safetensors   classifier: keys (n, D) f32, base_logits (n, C) f32, labels (n,), example_ids (n,)
                                      causal LM: keys (n, D) f32, values (n, m) f16, indices (n, m) i32 (absent when
                                      dense), labels (n,), example_ids (n,), positions (n,)
    resmem_memory-00001.safetensors   ... every shard's metadata names the format and the build id
    resmem_index.faiss                the trained approximate index (optional), read with IO_FLAG_MMAP

An LM manifest also holds the build `temperature`, `vocab_size`, `top_m`, the tokenizer hash,
`window` and `stride` (the same strings as the single-file format's metadata).

Searching touches only the probed IVF lists of the memory-mapped index and the k candidate rows
of each query in the memory-mapped shards; exact search (`"exact"`, or `"auto"` below 200,000
entries) scans the key shards block by block with plain file reads ([`ShardedExactIndex`]), so
the keys are never all in RAM either. `MemoryWriter` builds such a folder from chunks of arrays
(no model needed), e.g. for 5 million entries on a small machine:

```python
>>> from resmem.memory_disk import MemoryWriter, OnDiskMemory
>>> with MemoryWriter("memory-dir", fingerprint="synthetic", layer="none") as writer:
...     for keys, logits, labels in chunks:          # numpy or torch, any chunk size
...         writer.add(keys, logits, labels)
>>> memory = OnDiskMemory.open("memory-dir")
>>> memory.build_index("IVF1024,Flat")           # trained, cached under resmem_cache_dir(), memory-mapped
>>> model.memory = memory                        # or ResMemWrapper.from_pretrained(saved folder)
```

An on-disk memory is read-only (its files may be shared by several saved models through hard
links): `memory.rewrite(new_folder, remove=ids, add=entries)` streams an edited copy into a new
folder, `memory.to_memory()` loads it into RAM to edit it there.
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

from transformers.utils import logging

from .atomic import link_or_copy, save_index_atomic, write_json_atomic
from .hub import INDEX_FILE, resmem_cache_dir
from .index import FaissIndex, NeighbourIndex, index_record, require_faiss, resolve_spec, split_inline_params
from .memory import (
    CLASSIFIER_SCHEMA,
    MEMORY_FORMAT,
    MEMORY_FORMAT_VERSION,
    ClassifierResiduals,
    MemoryFileError,
    MemorySchema,
    MemoryStore,
    ResidualMemory,
    _locked,
)
from .memory_lm import TOKEN_SCHEMA, TokenResidualMemory, TokenResiduals
from .validation import INDEX_RECORD_KEYS, check_classifier_entries, check_manifest, check_shard_layout, check_token_entries, verify_index_file

logger = logging.get_logger(__name__)

MANIFEST_FILE = "resmem_memory.index.json"
SHARD_FILE = "resmem_memory-{:05d}.safetensors"
# The only shard names a manifest may list: a plain file name, so no manifest can point outside its folder.
SHARD_NAME_PATTERN = re.compile(r"resmem_memory-[0-9]{5,9}\.safetensors")
FIELDS = CLASSIFIER_SCHEMA.names
SCHEMAS = {schema.format: schema for schema in (CLASSIFIER_SCHEMA, TOKEN_SCHEMA)}
_DTYPES = {"F32": np.float32, "I64": np.int64, "F16": np.float16, "I32": np.int32}
_NUMPY = {torch.float32: np.float32, torch.long: np.int64, torch.float16: np.float16, torch.int32: np.int32}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


def _numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype)


def write_safetensors(path: str, pieces: dict[str, list[np.ndarray]], metadata: dict[str, str]) -> None:
    """Write a safetensors file whose tensor `name` is the row-wise concatenation of `pieces[name]`.

    The pieces are streamed to the file one after the other (no concatenated copy in RAM), through a
    temporary file renamed at the end. The layout is safetensors' own: 8-byte header length, JSON
    header (padded to 8 bytes), then the tensors' bytes in header order.
    """
    header, offset = {}, 0
    for name, parts in pieces.items():
        rows = sum(p.shape[0] for p in parts)
        size = sum(p.nbytes for p in parts)
        header[name] = {"dtype": _CODES[parts[0].dtype], "shape": [rows, *parts[0].shape[1:]], "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for parts in pieces.values():
                for p in parts:
                    f.write(memoryview(np.ascontiguousarray(p)).cast("B"))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class MemoryWriter:
    """Write memory entries to safetensors shards as they come (bounded RAM: one shard's rows at most).

    Args:
        folder: output folder (created; must not already hold a memory).
        fingerprint, layer: stored in the manifest, checked when a model loads the memory.
        shard_size: rows per shard file (RAM holds at most this many pending rows).
        schema: the task's fields (`resmem.memory.CLASSIFIER_SCHEMA` or `resmem.memory_lm.TOKEN_SCHEMA`).
        metadata: the task's metadata strings (LM: `resmem.memory_lm.token_metadata_strings(...)`).
    """

    def __init__(
        self,
        folder: str,
        fingerprint: str = "",
        layer: str = "",
        shard_size: int = 500_000,
        schema: MemorySchema = CLASSIFIER_SCHEMA,
        metadata: dict[str, str] | None = None,
    ):
        if os.path.exists(os.path.join(folder, MANIFEST_FILE)):
            raise ValueError(f"{folder} already holds a memory; write the new one to another folder.")
        if int(shard_size) < 1:
            raise ValueError(f"shard_size must be >= 1 row, got {shard_size}.")
        os.makedirs(folder, exist_ok=True)
        self.folder, self.fingerprint, self.layer, self.shard_size = folder, fingerprint, layer, int(shard_size)
        self.schema, self.metadata = schema, dict(metadata or {})
        self.build_id = uuid.uuid4().hex
        self.shards: list[dict] = []
        self.num_entries = 0
        self.fields: dict[str, list] | None = None  # name -> [safetensors dtype, row shape], fixed by the first chunk
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_rows = 0
        self._closed = False

    def add(self, keys=None, base_logits=None, labels=None, example_ids=None, **fields) -> None:
        """Append a chunk. Classifier: `keys (n, D)`, `base_logits (n, C)`, `labels (n,)`, `example_ids (n,)`
        (default: row numbers). Other schemas: every field by name (e.g. `values=`, `indices=`, `positions=`)."""
        entries = {"keys": keys, "base_logits": base_logits, "labels": labels, "example_ids": example_ids, **fields}
        self.add_entries({name: t for name, t in entries.items() if t is not None})

    def add_entries(self, entries: dict) -> None:
        """Append a chunk given as `{field: (n, ...)}` (numpy or torch); optional fields may be left out."""
        schema = self.schema
        ndims = {name: ndim for name, _, ndim in schema.fields}
        arrays = {name: _numpy(entries[name], _NUMPY[schema.dtype(name)]) for name in schema.names if entries.get(name) is not None}
        arrays = {name: a.reshape(-1) if ndims[name] == 1 else a for name, a in arrays.items()}
        if "example_ids" not in arrays and schema.one_entry_per_example and "keys" in arrays:
            first = self.num_entries + self._pending_rows
            arrays["example_ids"] = np.arange(first, first + arrays["keys"].shape[0], dtype=np.int64)
        self._check_entries(arrays, "MemoryWriter.add")
        self._check_content(entries)
        self._pending.append(arrays)
        self._pending_rows += arrays["keys"].shape[0]
        while self._pending_rows >= self.shard_size:
            self._flush(self.shard_size)

    def _check_entries(self, arrays: dict[str, np.ndarray], source: str) -> None:
        """The one place where a chunk on its way to the shards is checked: required fields, equal row counts,
        the same fields and widths as the first chunk (content validation hooks here)."""
        schema = self.schema
        missing = [name for name in schema.required if name not in arrays]
        if missing:
            raise ValueError(f"{source}: the chunk lacks {missing}; a {schema.name} memory stores {list(schema.names)}.")
        n = arrays["keys"].shape[0]
        if any(a.shape[0] != n for a in arrays.values()):
            raise ValueError(
                f"{source}: {', '.join(arrays)} must have the same number of rows; got { {k: a.shape for k, a in arrays.items()} }."
            )
        fields = {name: [_CODES[a.dtype], list(a.shape[1:])] for name, a in arrays.items()}
        if self.fields is not None and fields != self.fields:
            raise ValueError(
                f"{source}: chunk has fields {fields}; earlier chunks had {self.fields} (key dimension, classes or "
                "top-m must not change within one memory)."
            )
        self.fields = fields

    def _check_content(self, entries: dict) -> None:
        """Every value of a chunk, as given (before the cast to the schema's dtypes, so float labels are refused,
        not truncated): `OnDiskMemory.open` reads only the shards' headers, so this is where values are checked.
        Example ids are checked for uniqueness within the chunk."""
        source = "the chunk passed to MemoryWriter.add"
        dim = self.fields["keys"][1][0]
        if self.schema.name == CLASSIFIER_SCHEMA.name:
            chunk = dict(entries)
            if chunk.get("example_ids") is None:
                chunk["example_ids"] = np.arange(len(chunk["keys"]))
            check_classifier_entries(chunk, self.fields["base_logits"][1][0], source, dim=dim)
        else:
            top_m = self.metadata.get("top_m")
            chunk = {name: entries.get(name) for name in self.schema.names}
            vocab_size = int(self.metadata.get("vocab_size", 0))
            check_token_entries(chunk, vocab_size, source, top_m=int(top_m) if top_m else None, dim=dim)

    def _flush(self, rows: int) -> None:
        """Write the first `rows` pending rows as the next shard (pieces streamed, never concatenated)."""
        pieces: dict[str, list[np.ndarray]] = {name: [] for name in self.fields}
        taken, rest = 0, []
        for chunk in self._pending:
            n = next(iter(chunk.values())).shape[0]
            take = min(n, rows - taken)
            if take > 0:
                for name, a in chunk.items():
                    pieces[name].append(a[:take])
            if take < n:
                rest.append({name: a[take:] for name, a in chunk.items()})
            taken += take
        name = SHARD_FILE.format(len(self.shards))
        metadata = {
            "format": self.schema.format, "format_version": self.schema.format_version, "build_id": self.build_id,
            "shard": str(len(self.shards)), "first_row": str(self.num_entries), "num_entries": str(rows),
        }
        write_safetensors(os.path.join(self.folder, name), pieces, metadata)
        self._pending, self._pending_rows = rest, self._pending_rows - rows
        self.shards.append({"file": name, "num_entries": int(rows)})
        self.num_entries += rows

    def close(self) -> None:
        """Write the last shard and the manifest (the memory is readable only after this)."""
        if self._closed:
            return
        if self._pending_rows:
            self._flush(self._pending_rows)
        if not self.num_entries:
            raise ValueError("No entries were added: the memory needs at least one.")
        manifest = {
            "format": self.schema.format, "format_version": self.schema.format_version, "build_id": self.build_id,
            "num_entries": self.num_entries, "dim": self.fields["keys"][1][0],
            "fingerprint": self.fingerprint, "layer": self.layer, "fields": self.fields, "metadata": self.metadata,
            "shards": self.shards,
        }
        if "base_logits" in self.fields:
            manifest["num_classes"] = self.fields["base_logits"][1][0]
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
        for name, info in header.items():
            offset = start + info["data_offsets"][0]
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            self.offsets[name] = (offset, dtype, shape)
            if 0 in shape:  # np.memmap refuses empty maps
                self.arrays[name] = torch.from_numpy(np.zeros(shape, dtype=dtype))
                continue
            # mode "c": copy-on-write, so torch gets a writable view and nothing is ever written back.
            self.arrays[name] = torch.from_numpy(np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape))

    @property
    def num_rows(self) -> int:
        return self.offsets["keys"][2][0]

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

    def __len__(self) -> int:
        return self.total

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
        if not parts:
            return np.empty((0, *self.shape[1:]), dtype=self.shards[0].offsets[self.name][1])
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def _strided(self, rows: np.ndarray, block_rows: int = 65_536) -> np.ndarray:
        """Rows `rows` (sorted) read in blocks with plain file reads: a strided sample (e.g. to train an IVF
        index) through the memory map would leave one resident page per sampled row in the process."""
        parts = []
        for shard, first in zip(self.shards, self.starts):
            n = shard.offsets[self.name][2][0]
            mine = rows[(rows >= first) & (rows < first + n)] - first
            for lo in range(0, n, block_rows):
                sel = mine[(mine >= lo) & (mine < lo + block_rows)]
                if sel.size:
                    parts.append(shard.read_rows(self.name, int(sel[0]), int(sel[-1]) + 1)[sel - sel[0]])
        return np.concatenate(parts)


class ShardedExactIndex(NeighbourIndex):
    """Exact k-nearest search over memory-mapped key shards, scanned in blocks of `block_rows` keys.

    `build_index` on a memory-mapped key matrix would hand faiss an `IndexFlatL2`, which copies every
    key into RAM (`4 * D` bytes per entry). This index instead reads `block_rows` keys at a time with
    plain file reads (the OS page cache, not the process, holds them) and keeps a running top-k, so
    RAM stays at one block plus `(B, k)` results. Each search reads every key: use an approximate
    index (IVF) for large memories and this one for checks and small memories.
    """

    factory = "exact"
    exact = True
    full_precision = True
    mutable = False

    def __init__(self, rows: ShardedRows, block_rows: int = 65_536):
        self.rows, self.block_rows = rows, block_rows

    def __len__(self) -> int:
        return self.rows.total

    @property
    def dim(self) -> int:
        return self.rows.shape[1]

    def search(self, queries, k):
        """`(B, D)` queries -> plain L2 distances and int64 ids, each `(B, k)`, nearest first."""
        q = queries.detach().to("cpu", torch.float32)
        best_d, best_i = None, None
        for start in range(0, len(self), self.block_rows):
            block = torch.from_numpy(self.rows[start : start + self.block_rows])  # (n, D)
            # ||q - x||^2 = ||q||^2 + ||x||^2 - 2 q.x; ||q||^2 cannot change a query's ranking: added to the winners.
            d = torch.addmm(block.pow(2).sum(1), q, block.T, alpha=-2.0)  # (B, n)
            d, i = torch.topk(d, min(k, block.shape[0]), dim=1, largest=False)
            i += start
            if best_d is not None:
                d, pick = torch.topk(torch.cat([best_d, d], 1), min(k, best_d.shape[1] + d.shape[1]), dim=1, largest=False)
                i = torch.cat([best_i, i], 1).gather(1, pick)
            best_d, best_i = d, i
        distances = (best_d + q.pow(2).sum(1, keepdim=True)).clamp_min_(0).sqrt_()
        return distances.to(queries.device), best_i.to(queries.device)


def _faiss_index_from_shards(rows: ShardedRows, spec: str, block_rows: int = 32_768) -> NeighbourIndex:
    """An approximate faiss index over sharded keys with bounded RAM: trained on an evenly strided sample (the
    size `FaissIndex` would use), then filled `block_rows` keys at a time (faiss's IVF `add` holds a
    `(block, nlist)` distance matrix, so the default 262,144-row chunks would dominate a build's peak RSS)."""
    faiss = require_faiss()
    spec, params = split_inline_params(spec)
    factory = resolve_spec(spec, rows.total)
    max_train = 65_536
    try:
        max_train = min(500_000, max(max_train, 128 * faiss.extract_index_ivf(faiss.index_factory(rows.shape[1], factory)).nlist))
    except RuntimeError:  # not an IVF index (or an invalid factory string: FaissIndex names the fix)
        pass
    sample = rows[:: max(1, -(-rows.total // max_train))]  # (<= max_train, D), read block-wise
    index = FaissIndex(sample, factory)  # trains on the whole sample
    del sample
    index.reset()  # keep the training, drop the sample's entries
    for start in range(0, rows.total, block_rows):
        index.add(rows[start : start + block_rows])
    index.set_params(params)
    return index


class OnDiskMemory(MemoryStore):
    """A memory whose entries stay in memory-mapped safetensors shards (see the module docstring).

    `OnDiskMemory.open(folder)` returns the task's subclass chosen by the manifest's format:
    `OnDiskClassifierMemory` (base logits + labels) or `OnDiskTokenMemory` (sparse LM residuals);
    both search and compute residuals exactly as their in-RAM counterparts do. The search index
    should be approximate for large memories (`"auto"` picks IVF from 200,000 entries); exact search
    scans the shards ([`ShardedExactIndex`]).

    The memory is read-only: `add` / `remove` raise a `ValueError` naming the fixes: `rewrite(new_folder,
    remove=ids, add=entries)` streams an edited copy into a new folder, `to_memory()` edits in RAM.
    """

    def __init__(self, folder: str, manifest: dict, shards: list[_Shard]):
        super().__init__()
        self.folder, self.manifest, self.shards = folder, manifest, shards
        counts = [s.num_rows for s in shards]
        self.starts = list(np.cumsum([0] + counts[:-1]).tolist())
        self._starts_t = torch.tensor(self.starts + [sum(counts)])
        self._num_entries = sum(counts)
        self.fingerprint, self.layer = manifest.get("fingerprint") or "", manifest.get("layer") or ""
        self._read_task_metadata(manifest.get("metadata") or {})
        self._index_path: str | None = None  # file the current index is memory-mapped from (cache or loaded folder)

    @classmethod
    def open(cls, folder: str, files: dict[str, str] | None = None) -> "OnDiskMemory":
        """Open a memory folder, checking that every shard is present, of the manifest's format and from the same build.

        Args:
            files: optional map from file name to local path (files resolved from a Hub cache).
        Returns:
            An `OnDiskClassifierMemory` or `OnDiskTokenMemory`, by the manifest's format.
        """
        files = files or {}
        manifest_path = files.get(MANIFEST_FILE, os.path.join(folder, MANIFEST_FILE))
        if not os.path.isfile(manifest_path):
            raise MemoryFileError(f"{folder} has no {MANIFEST_FILE}: it is not a sharded memory (or the build did not finish).")
        manifest = read_manifest(manifest_path)
        check_manifest(manifest, manifest_path, MemoryFileError)
        names = shard_file_names(manifest, manifest_path)
        fmt = manifest.get("format", MEMORY_FORMAT)
        target = _ON_DISK_CLASSES.get(fmt)
        if target is None:
            raise MemoryFileError(f"{manifest_path} has format {fmt!r}; known formats: {sorted(_ON_DISK_CLASSES)}.")
        if cls is not OnDiskMemory and not issubclass(target, cls):
            raise MemoryFileError(
                f"{folder} holds a {target.schema.name} memory ({fmt}), not a {cls.schema.name} one: "
                f"it belongs to another kind of model; {cls.schema.rebuild_hint}."
            )
        shards = []
        for i, (entry, name) in enumerate(zip(manifest["shards"], names)):
            path = files.get(name, os.path.join(folder, name))
            if not os.path.isfile(path):
                raise MemoryFileError(
                    f"Memory shard {entry['file']} ({i + 1} of {len(manifest['shards'])}) is missing from {folder}. "
                    "Copy every resmem_memory-*.safetensors file of the build, or rebuild the memory."
                )
            try:
                shard = _Shard(path)
            except Exception as err:
                raise MemoryFileError(f"Memory shard {path} cannot be read ({err}); it is truncated or corrupt.") from err
            if shard.metadata.get("build_id") != manifest["build_id"]:
                raise MemoryFileError(
                    f"Memory shard {entry['file']} comes from build {shard.metadata.get('build_id', '?')[:12]}, but the "
                    f"manifest lists build {manifest['build_id'][:12]}: the folder mixes files of two different builds. "
                    "Copy all shards of one build together, or rebuild the memory."
                )
            if shard.metadata.get("format", MEMORY_FORMAT) != fmt:
                raise MemoryFileError(f"Memory shard {entry['file']} has format {shard.metadata.get('format')!r}, the manifest {fmt!r}.")
            if "keys" not in shard.offsets or shard.num_rows != entry["num_entries"]:
                raise MemoryFileError(
                    f"Memory shard {entry['file']} holds {shard.offsets.get('keys', (0, 0, (0,)))[2][0]} rows, the manifest "
                    f"says {entry['num_entries']}."
                )
            shards.append(shard)
        if not shards:
            raise MemoryFileError(f"{manifest_path} lists no shards: the memory is empty. Rebuild it.")
        memory = target(folder, manifest, shards)
        # Every shard, from its header only: the schema's fields, dtypes, equal rows, the same widths as shard 0.
        # Values are checked when written (`MemoryWriter`): scanning them at every open would cost O(memory).
        for shard in shards:
            check_shard_layout(shard.offsets, target.schema.fields, manifest, shard.path, MemoryFileError)
            memory._check_entries(shard.arrays, shard.path, MemoryFileError, append=True, check_content=False)
        index_path = files.get(INDEX_FILE, os.path.join(folder, INDEX_FILE))
        if manifest.get("index_factory") and os.path.isfile(index_path):
            if verify_index_file(index_path, manifest, memory.dim, len(memory)):  # else warn; rebuilt from the keys
                memory.attach_index(FaissIndex.load(index_path, manifest["index_factory"]), index_path)
                memory._index_path = index_path
        return memory

    def __len__(self) -> int:
        return self._num_entries

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def keys_device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def keys(self) -> ShardedRows:
        """The `(N, D)` keys, read in slices (`memory.keys[a:b]` is a numpy array); never all loaded."""
        return self.rows("keys")

    @property
    def example_ids(self) -> torch.Tensor:
        """`(N,)` example ids of every entry (read from the shards; 8 bytes per entry)."""
        return self.all_example_ids()

    def all_example_ids(self) -> torch.Tensor:
        """`(N,)` example ids of every entry (read from the shards on demand; 8 bytes per entry)."""
        return torch.cat([s.arrays["example_ids"] for s in self.shards])

    def rows(self, name: str) -> ShardedRows:
        return ShardedRows(self.shards, name, self.starts, len(self))

    def _stored(self, name: str) -> bool:
        return name in self.shards[0].offsets and self.shards[0].arrays[name].numel() > 0

    def _widths(self) -> dict[str, int]:
        return {name: shape[1] for name, (_, _, shape) in self.shards[0].offsets.items() if len(shape) == 2 and shape[1]}

    def _row_bytes(self) -> int:
        total = 0
        for _, dtype, shape in self.shards[0].offsets.values():
            total += np.dtype(dtype).itemsize * (int(np.prod(shape[1:])) if len(shape) > 1 else 1)
        return int(total)

    def files_bytes(self) -> int:
        """Bytes of the manifest, shards and index on disk."""
        names = [MANIFEST_FILE] + shard_file_names(self.manifest) + ([INDEX_FILE] if self.manifest.get("index_factory") else [])
        return sum(os.path.getsize(os.path.join(self.folder, n)) for n in names if os.path.isfile(os.path.join(self.folder, n)))

    def _gather(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).cpu()
        shard_of = torch.searchsorted(self._starts_t, flat, right=True) - 1  # (M,)
        first = self.shards[0].arrays[name]
        out = torch.empty((flat.shape[0], *first.shape[1:]), dtype=first.dtype)
        for s in torch.unique(shard_of).tolist():
            mask = shard_of == s
            out[mask] = self.shards[s].arrays[name][flat[mask] - self.starts[s]]
        return out.view(*ids.shape, *first.shape[1:])

    def field_rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        return self._gather(name, ids.reshape(-1))

    def gather_keys(self, ids):
        return self._gather("keys", ids)

    @_locked
    def index(self, spec: str, params: dict | None = None) -> NeighbourIndex:
        factory = resolve_spec(spec, len(self))
        if self._index is None or self._index.factory != factory:
            self.build_index(spec)
        if dict(params or {}) != self._index_params:
            self._index.set_params(params)
            self._index_params = dict(params or {})
        return self._index

    @_locked
    def build_index(self, spec: str = "auto") -> NeighbourIndex:
        """Train and fill an index from the shards; an approximate one is cached and memory-mapped.

        `"exact"` gives a [`ShardedExactIndex`] that scans the memory-mapped shards (faiss's flat index
        would copy every key into RAM); nothing is written for it. A trained approximate index is
        written (temporary name + rename) to `resmem_cache_dir()/indexes/<key>.faiss`, `key` = hash of
        the build id, the entry count, the key dimension and the factory string, and reused from there by
        every later process. It is never written into `self.folder`: that folder may be a save another
        model was loaded from (whose files a later save hard-links) or a read-only Hugging Face cache
        snapshot. Without a writable cache the index stays in RAM.
        """
        factory = resolve_spec(split_inline_params(spec)[0], len(self))
        if factory == "exact":
            index, path = ShardedExactIndex(self.rows("keys")), None
        else:
            path = self._cached_index_path(factory)
            index = self._load_cached_index(path, factory) if path is not None else None
            if index is None:
                index = _faiss_index_from_shards(self.rows("keys"), spec)
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

    def _load_cached_index(self, path: str, factory: str) -> NeighbourIndex | None:
        """The cached index at `path` if it is there and covers these keys; a damaged entry is trained again."""
        if not os.path.isfile(path):
            return None
        try:
            index = FaissIndex.load(path, factory)
        except Exception:  # MemoryFileError from a damaged file: train again and replace it
            return None
        return index if index.dim == self.dim and len(index) == len(self) else None

    # ------------------------------------------------------------------ editing: in RAM only
    def _read_only(self, *args, **kwargs):
        raise ValueError(
            f"An on-disk memory is read-only (its files in {self.folder} may be shared with other saves): write an "
            "edited copy to a new folder (`model.memory = model.memory.rewrite(new_folder, remove=ids)`), load it into "
            "RAM to edit it (`model.memory = model.memory.to_memory()`, if it fits), or build a new one with the "
            "edited data (`model.build_memory_on_disk(...)`)."
        )

    add = add_entries = remove = _read_only

    def rewrite(self, folder: str, remove=None, add: dict | None = None) -> "OnDiskMemory":
        """A new on-disk memory in `folder` (not this one's): these entries without the example ids `remove`,
        plus the entries `add` (a dict of the schema's fields, as `model.add_to_memory` builds them).

        Streams shard by shard through a [`MemoryWriter`] (RAM: one shard), so it works for memories larger
        than RAM; this memory's files are only read. The new memory has no index yet (built at first search).

        Raises:
            ValueError: unknown ids to remove, ids to add that already exist, or `folder` holding a memory.
        """
        from .memory import _as_id_tensor

        if os.path.abspath(folder) == os.path.abspath(self.folder):
            raise ValueError(f"rewrite needs a new folder: {folder} holds the memory being read.")
        existing = self.all_example_ids()
        remove = _as_id_tensor(remove if remove is not None else [])
        unknown = remove[~torch.isin(remove, existing)]
        if unknown.numel():
            raise ValueError(f"Unknown example ids {unknown[:10].tolist()} (see `memory.example_ids`). Nothing was written.")
        if add is not None and torch.isin(_as_id_tensor(add["example_ids"]), existing[~torch.isin(existing, remove)]).any():
            raise ValueError("example_ids of the added entries already exist in the memory; pass new ids.")
        writer = MemoryWriter(
            folder, self.fingerprint, self.layer, shard_size=max(s.num_rows for s in self.shards), schema=self.schema,
            metadata=self._task_metadata(),
        )
        for shard in self.shards:
            rows = {name: shard.read_rows(name, 0, shard.num_rows) for name in shard.offsets if shard.arrays[name].numel()}
            keep = ~np.isin(rows["example_ids"], remove.numpy())
            if keep.any():
                writer.add_entries({name: a[keep] for name, a in rows.items()})
        if add is not None:
            writer.add_entries(add)
        writer.close()
        return OnDiskMemory.open(folder)

    def to_memory(self):
        """The same memory in RAM (`ResidualMemory` / `TokenResidualMemory`), editable; reads every shard."""
        memory = self._ram_class()
        tensors = {name: torch.from_numpy(self.rows(name)[:]) for name in self.shards[0].offsets}
        memory._read_task_metadata(self._task_metadata())  # first: the values are checked against the vocabulary
        memory._replace(tensors, self.fingerprint, self.layer, self.folder, MemoryFileError)
        return memory

    def _ram_class(self):
        raise NotImplementedError

    # ------------------------------------------------------------------ persistence
    def save_folder(self, target: str, save_id: str | None = None) -> None:
        """Put the shards, a new manifest and the current approximate index into `target`.

        Shards and the index are hard-linked where possible (else copied): neither is ever modified
        in place (shards are written once, cached indexes only replaced by rename). The manifest is
        written anew, with `save_id` (checked against config.json at load) and the record of the index
        saved beside it (factory, SHA-256, size, dimension, count: checked before faiss reads it).
        """
        names = shard_file_names(self.manifest)
        for shard, name in zip(self.shards, names):
            link_or_copy(shard.path, os.path.join(target, name))
        derived = ("save_id",) + INDEX_RECORD_KEYS
        manifest = {key: value for key, value in self.manifest.items() if key not in derived}
        index = self._index
        if index is not None and index.savable and len(index) == len(self):
            destination = os.path.join(target, INDEX_FILE)
            source = self._index_path
            if source and os.path.isfile(source):
                link_or_copy(source, destination)
            else:
                index.save(destination)
            manifest.update(index_record(destination, index))
        if save_id:
            manifest["save_id"] = save_id
        write_json_atomic(os.path.join(target, MANIFEST_FILE), manifest)

    def save(self, path: str, index_path: str | None = None) -> None:
        raise ValueError("An OnDiskMemory is saved as a folder: use `save_folder(folder)` or `model.save_pretrained`.")


class OnDiskClassifierMemory(ClassifierResiduals, OnDiskMemory):
    """On-disk classifier memory: keys, base logits, labels, example ids (residuals at any temperature)."""

    def _ram_class(self):
        return ResidualMemory()


class OnDiskTokenMemory(TokenResiduals, OnDiskMemory):
    """On-disk causal-LM memory: keys and sparse residuals fixed at the build temperature (see `TokenResiduals`)."""

    def _ram_class(self):
        return TokenResidualMemory()


_ON_DISK_CLASSES = {MEMORY_FORMAT: OnDiskClassifierMemory, TOKEN_SCHEMA.format: OnDiskTokenMemory}


def read_manifest(path: str) -> dict:
    """Read a memory manifest; a truncated or malformed one raises `MemoryFileError` naming the fix."""
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


__all__ = [
    "MANIFEST_FILE",
    "MEMORY_FORMAT_VERSION",
    "MemoryWriter",
    "OnDiskClassifierMemory",
    "OnDiskMemory",
    "OnDiskTokenMemory",
    "ShardedExactIndex",
    "ShardedRows",
    "read_manifest",
    "shard_file_names",
    "write_safetensors",
]
