"""Nearest-neighbour search backends behind one interface.

Every backend returns *plain* L2 distances (faiss L2 indexes return squared ones) and int64 ids
into the memory, nearest first. Ids of `-1` mark "no neighbour found" (an IVF index probing too
few lists can return fewer than k candidates); callers mask them.

Backends, chosen by the `index` spec (see `build_index`):

- `"exact"`: faiss `IndexFlatL2` on the CPU (all GPUs, sharded, with faiss-gpu), or a torch
  matrix-multiply top-k on the keys' device when faiss-gpu is absent.
- any faiss factory string: `"IVF1024,Flat"`, `"HNSW32"`, `"IVF1024,PQ16"`, ...
- `"auto"`: exact below `AUTO_EXACT_MAX_ENTRIES` entries, `IVF{nlist},Flat` above.

Search parameters (`nprobe`, `efSearch`, ...) are set with `set_params`, which takes any name
faiss's `ParameterSpace` understands; `rerank_factor` is consumed by the memory (it fetches
`rerank_factor * k` candidates and keeps the k nearest by exact distance from its stored keys).

CPU performance note: torch and faiss each bring an OpenMP runtime whose idle threads spin-wait
after a parallel region; on a machine with few cores they steal time from each other (measured:
+56% search time on 2 cores). The memory's CPU search therefore finishes in numpy, starting no torch
parallel region between faiss searches (`MemoryStore._finish_search_numpy`); a forward's own torch work
(base model, residuals) can still spin next to faiss, which `OMP_WAIT_POLICY=PASSIVE` avoids (+3% then;
see benchmarks/README_scale.md and benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import os
import shutil
import threading
import warnings

import numpy as np
import torch

FAISS_INSTALL_HINT = "pip install 'resmem-hf[cpu]' (faiss-cpu) or 'resmem-hf[gpu]' (faiss-gpu)"
AUTO_EXACT_MAX_ENTRIES = 200_000
# Parameters handled by the memory, not by faiss.
MEMORY_PARAMS = ("rerank_factor",)
_ADD_CHUNK = 262_144


def is_faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def require_faiss():
    if not is_faiss_available():
        raise ImportError(f"This index needs faiss, which is not installed: {FAISS_INSTALL_HINT}.")
    import faiss

    return faiss


def faiss_gpu_count() -> int:
    """Number of GPUs faiss can use (0 with faiss-cpu or without faiss)."""
    if not is_faiss_available():
        return 0
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def resolve_spec(spec: str, num_entries: int) -> str:
    """Map `"auto"` to `"exact"` or an IVF factory string by memory size; other specs pass through.

    `auto` picks `IVF{nlist},Flat` with `nlist` the power of two nearest `4 * sqrt(N)` (faiss's
    rule of thumb) once the memory has `AUTO_EXACT_MAX_ENTRIES` entries or more.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"config.index must be 'exact', 'auto' or a faiss factory string, got {spec!r}.")
    if spec != "auto":
        return spec
    if num_entries < AUTO_EXACT_MAX_ENTRIES:
        return "exact"
    nlist = 2 ** round(math.log2(4 * math.sqrt(num_entries)))
    return f"IVF{nlist},Flat"


def _as_numpy_rows(keys, start: int, stop: int) -> np.ndarray:
    rows = keys[start:stop]
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(rows, dtype=np.float32)


class NeighbourIndex:
    """Interface: `search(queries (B, D), k) -> (distances (B, k) plain L2, ids (B, k) int64)`.

    Attributes:
        factory: the resolved spec (`"exact"` or a faiss factory string).
        exact: whether `search` returns the true k nearest entries.
    """

    factory: str = "exact"
    exact: bool = True
    # Whether the returned distances are computed from the full float32 keys (flat, IVF-Flat, HNSW-Flat),
    # so that only rounding can separate them from distances recomputed from the memory's stored keys.
    full_precision: bool = True

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def set_params(self, params: dict | None) -> None:
        """Set search-time parameters (`nprobe`, `efSearch`, ...).

        Exact search has none and ignores them, so that `index="auto"` with `{"nprobe": 16}` works
        whether the memory is small (exact) or large (IVF).
        """

    mutable: bool = True

    def add(self, keys) -> None:
        """Append `(n, D)` keys (ids continue from `len(self)`)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Drop every entry, keeping what was trained."""
        raise NotImplementedError

    @property
    def savable(self) -> bool:
        """Whether `save` writes something worth keeping (a trained approximate index)."""
        return False


class TorchExactIndex(NeighbourIndex):
    """Exact search by matrix multiply + top-k on the keys' device (the fast path on a GPU without faiss-gpu).

    Keys are processed in blocks so that the `(B, block)` distance matrix stays bounded.
    """

    def __init__(self, keys: torch.Tensor, block_size: int = 262_144):
        self.keys = keys  # (N, D) float32
        self.sq_norms = keys.pow(2).sum(dim=1)  # (N,)
        self.block_size = block_size

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def dim(self) -> int:
        return self.keys.shape[1]

    def reset(self) -> None:
        self.keys, self.sq_norms = self.keys[:0], self.sq_norms[:0]

    def add(self, keys) -> None:
        keys = torch.as_tensor(keys).to(self.keys.device, torch.float32)
        self.keys = torch.cat([self.keys, keys])
        self.sq_norms = torch.cat([self.sq_norms, keys.pow(2).sum(dim=1)])

    def search(self, queries, k):
        queries = queries.to(self.keys.device, torch.float32)
        best_d, best_i = None, None
        for start in range(0, len(self), self.block_size):
            block = self.keys[start : start + self.block_size]  # (n, D)
            # ||q - x||^2 = ||q||^2 + (||x||^2 - 2 q.x): the per-query ||q||^2 cannot change the ranking, so one
            # fused matrix multiply-add ranks the block and ||q||^2 is added to the k winners only.
            d = torch.addmm(self.sq_norms[start : start + block.shape[0]], queries, block.T, alpha=-2.0)  # (B, n)
            d, i = torch.topk(d, min(k, block.shape[0]), dim=1, largest=False)  # (B, k')
            i += start
            if best_d is not None:
                d, pick = torch.topk(torch.cat([best_d, d], 1), min(k, best_d.shape[1] + d.shape[1]), dim=1, largest=False)
                i = torch.cat([best_i, i], 1).gather(1, pick)
            best_d, best_i = d, i
        q_sq = queries.pow(2).sum(dim=1, keepdim=True)  # (B, 1)
        return (best_d + q_sq).clamp_min_(0).sqrt_(), best_i


def _full_precision(index) -> bool:
    faiss = require_faiss()
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexHNSW):
        return isinstance(faiss.downcast_index(index.storage), faiss.IndexFlat)
    return isinstance(index, (faiss.IndexFlat, faiss.IndexIVFFlat))


class FaissIndex(NeighbourIndex):
    """A faiss index (flat, IVF, HNSW, PQ ... from a factory string) over float32 keys.

    Args:
        keys: `(N, D)` float32 torch tensor or numpy array (a memory-mapped array is read in chunks).
        factory: a faiss factory string (`"Flat"`, `"IVF1024,Flat"`, `"HNSW32"`, `"IVF1024,PQ16"`).
        use_gpu: clone the index onto all GPUs faiss sees, sharded (faiss-gpu only; indexes faiss
            cannot move, such as HNSW, stay on the CPU with a warning).
        max_train: train on at most this many keys (an evenly strided sample).
    """

    def __init__(self, keys=None, factory: str = "Flat", use_gpu: bool = False, max_train: int = 500_000, index=None):
        faiss = require_faiss()
        self.factory = factory
        self.on_gpu = False
        self.mmapped = False
        if index is not None:  # wrap an existing (e.g. loaded) index
            self.index = index
            self.exact = factory in ("Flat", "exact")
            self.full_precision = _full_precision(index)
            return
        n, d = keys.shape
        try:
            index = faiss.index_factory(d, factory, faiss.METRIC_L2)
        except RuntimeError as err:
            raise ValueError(
                f"faiss rejected the index factory string {factory!r}: {err}. Use 'exact', 'auto' or a valid "
                "faiss factory string such as 'Flat', 'IVF1024,Flat', 'HNSW32' or 'IVF1024,PQ16'."
            ) from err
        self.exact = isinstance(index, faiss.IndexFlat)
        self.full_precision = _full_precision(index)
        if not index.is_trained:
            try:  # k-means needs ~40-256 points per list; more only costs time
                max_train = min(max_train, max(65_536, 128 * faiss.extract_index_ivf(index).nlist))
            except RuntimeError:
                pass
            step = max(1, math.ceil(n / max_train))
            sample = keys[::step]
            sample = _as_numpy_rows(sample, 0, sample.shape[0])
            try:
                index.train(sample)
            except RuntimeError as err:
                raise ValueError(
                    f"faiss could not train the {factory!r} index on {sample.shape[0]} keys: {err}. An IVF index "
                    "needs more entries than lists (and PQ at least 256 per codebook); use fewer lists or 'exact'."
                ) from err
        if use_gpu:
            index = self._to_gpus(index)
        for start in range(0, n, _ADD_CHUNK):
            index.add(_as_numpy_rows(keys, start, min(n, start + _ADD_CHUNK)))
        self.index = index

    def _to_gpus(self, index):
        faiss = require_faiss()
        try:
            options = faiss.GpuMultipleClonerOptions()
            options.shard = True
            gpu_index = faiss.index_cpu_to_all_gpus(index, co=options)
        except (RuntimeError, AttributeError) as err:
            warnings.warn(f"faiss cannot move a {self.factory!r} index to the GPU ({err}); searching on the CPU.")
            return index
        self.on_gpu = True
        return gpu_index

    @classmethod
    def load(cls, path: str, factory: str, mmap: bool = True) -> "FaissIndex":
        """Read an index written by `save` (memory-mapped by default: IVF lists and flat codes stay on disk).

        faiss trusts the file it reads: callers check it against its save-time record first
        (`resmem.validation.verify_index_file`). A file faiss cannot parse raises `MemoryFileError`.
        """
        faiss = require_faiss()
        try:
            try:
                index = faiss.read_index(path, faiss.IO_FLAG_MMAP if mmap else 0)
            except RuntimeError:
                if not mmap:
                    raise
                index, mmap = faiss.read_index(path), False  # some index types cannot be memory-mapped
        except (RuntimeError, MemoryError) as err:
            from .memory import MemoryFileError  # memory.py imports this module

            raise MemoryFileError(
                f"The search index {path} cannot be read by faiss ({str(err).strip().splitlines()[-1][:300]}); it is "
                "corrupt or written by an incompatible faiss. Delete the index file: it is rebuilt from the memory's "
                "keys at the first search (save the model again to store the new one)."
            ) from err
        loaded = cls(factory=factory, index=index)
        # A memory-mapped index is read-only: faiss aborts the process on `add`, so it is never mutated.
        loaded.mmapped = mmap
        loaded.source = path if mmap else None
        return loaded

    def save(self, path: str) -> None:
        faiss = require_faiss()
        index = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        tmp = path + ".tmp"
        if self.mmapped and getattr(self, "source", None):
            # faiss writes a memory-mapped IVF index without its inverted lists (a file that crashes `search`
            # once read back): copy the file it maps instead, which is never modified in place.
            shutil.copyfile(self.source, tmp)
        else:
            faiss.write_index(index, tmp)
        os.replace(tmp, path)

    @property
    def savable(self) -> bool:
        return not self.exact

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def mutable(self) -> bool:
        return not self.mmapped

    def reset(self) -> None:
        """Drop every entry but keep the training (IVF centroids, PQ codebooks)."""
        if not self.mutable:
            raise RuntimeError("a memory-mapped index cannot be modified")
        self.index.reset()

    def add(self, keys) -> None:
        if not self.mutable:
            raise RuntimeError("a memory-mapped index cannot be modified")
        n = keys.shape[0]
        for start in range(0, n, _ADD_CHUNK):
            self.index.add(_as_numpy_rows(keys, start, min(n, start + _ADD_CHUNK)))

    def set_params(self, params: dict | None) -> None:
        if self.exact:
            return
        faiss = require_faiss()
        space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        for name, value in (params or {}).items():
            if name in MEMORY_PARAMS:
                continue
            try:
                space.set_index_parameter(self.index, name, value)
            except RuntimeError as err:
                raise ValueError(
                    f"The {self.factory!r} index does not accept the search parameter {name}={value!r}: {err}. "
                    "IVF indexes take 'nprobe', HNSW indexes 'efSearch'."
                ) from err

    def search(self, queries, k):
        q = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        with _blas_tile_for(require_faiss(), q.shape[0]):
            sq_dist, ids = self.index.search(q, k)
        # numpy, not torch: a torch op over (B, k) >= 32k elements starts torch's OpenMP pool, whose threads
        # then spin-wait and steal the cores from faiss's next search (see `MemoryStore.search`).
        distances = torch.from_numpy(np.sqrt(np.maximum(sq_dist, 0, out=sq_dist), out=sq_dist))
        return distances.to(queries.device), torch.from_numpy(ids).to(queries.device)


def file_sha256(path: str, chunk_bytes: int = 8 << 20) -> str:
    """SHA-256 of a file, read in `chunk_bytes` pieces into one reused buffer (RAM: one chunk).

    Cost: one sequential read of the file (measured in benchmarks/bench_index_checksum.py).
    """
    digest = hashlib.sha256()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


def index_record(path: str, index: "NeighbourIndex") -> dict[str, str]:
    """What binds a saved index file to its memory: factory, SHA-256, size, dimension and entry count.

    Stored in the memory's metadata (safetensors metadata, or an on-disk memory's manifest) and checked
    by `resmem.validation.check_index_file` before faiss reads the file again.
    """
    return {
        "index_factory": index.factory,
        "index_sha256": file_sha256(path),
        "index_bytes": str(os.path.getsize(path)),
        "index_dim": str(index.dim),
        "index_count": str(len(index)),
    }


# faiss's default BLAS tile for brute-force search: 4096 queries x 1024 database rows (16 MiB of floats).
_FAISS_BLAS_TILE = 4096 * 1024
# Held from setting faiss's process-wide block sizes until they are restored (search included), so that
# concurrent searches (threads sharing a model, or several models) never see or keep another's values.
_FAISS_GLOBALS_LOCK = threading.Lock()


@contextlib.contextmanager
def _blas_tile_for(faiss, num_queries: int):
    """Shape faiss's brute-force BLAS tile to the query batch for the duration of one search.

    Flat search computes `query_bs x database_bs` distance tiles (defaults 4096 x 1024) and runs an
    OpenMP region per tile: a 256-query forward over 50k keys makes ~50 short regions whose barriers
    stall when the cores are shared (measured on 2 busy cores: 1.44 s -> 0.45 s with the tile below,
    same single-thread CPU time). Tiles of `B x (4M / B)` keep faiss's tile memory and only cut the
    number of regions; the results are the same exact k nearest. faiss exposes these block sizes
    only as process-wide variables, so the previous values are restored on exit, and a module lock
    is held from setting them to restoring them: searches from several threads run one at a time
    (each is OpenMP-parallel inside faiss anyway) instead of overwriting, and then leaking, each
    other's values.
    """
    cvar = getattr(faiss, "cvar", None)
    names = ("distance_compute_blas_query_bs", "distance_compute_blas_database_bs")
    if cvar is None or not all(hasattr(cvar, name) for name in names):
        yield
        return
    with _FAISS_GLOBALS_LOCK:
        old = tuple(getattr(cvar, name) for name in names)
        query_bs = max(1, min(num_queries, old[0]))
        database_bs = max(old[1], _FAISS_BLAS_TILE // query_bs)
        try:
            cvar.distance_compute_blas_query_bs, cvar.distance_compute_blas_database_bs = query_bs, database_bs
            yield
        finally:
            cvar.distance_compute_blas_query_bs, cvar.distance_compute_blas_database_bs = old


def split_inline_params(spec: str, params: dict | None = None) -> tuple[str, dict | None]:
    """`"IVF1024,Flat|nprobe=16"` -> `("IVF1024,Flat", {"nprobe": 16})`, merged over `params`."""
    if not isinstance(spec, str) or "|" not in spec:
        return spec, params
    spec, _, inline = spec.partition("|")
    merged = dict(params or {})
    for item in filter(None, (part.strip() for part in inline.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Search parameters after '|' must read name=value, got {item!r} in {spec}|{inline}.")
        number = float(value)
        merged[name.strip()] = int(number) if number.is_integer() else number
    return spec, merged


def build_index(keys, spec: str = "auto", params: dict | None = None) -> NeighbourIndex:
    """Build a search index over `keys` `(N, D)` float32 (torch tensor, or numpy array / memmap).

    Args:
        spec: `"exact"`, `"auto"` (exact below `AUTO_EXACT_MAX_ENTRIES` entries, IVF above) or any
            faiss factory string. On CUDA keys, faiss indexes are cloned to all GPUs when faiss-gpu is
            installed; without it, exact search runs as a torch matrix multiply on the GPU.
        params: search parameters, see `NeighbourIndex.set_params`. They may also follow the spec
            after a `|`, in faiss `ParameterSpace` syntax: `"IVF1024,Flat|nprobe=16,efSearch=64"`.
    """
    on_cuda = isinstance(keys, torch.Tensor) and keys.device.type == "cuda"
    spec, params = split_inline_params(spec, params)
    factory = resolve_spec(spec, keys.shape[0])
    gpus = faiss_gpu_count() if on_cuda else 0
    if factory == "exact":
        if on_cuda and not gpus:
            index = TorchExactIndex(keys)
        elif is_faiss_available():
            index = FaissIndex(keys, "Flat", use_gpu=bool(gpus))
            index.factory = "exact"
        else:
            index = TorchExactIndex(torch.as_tensor(keys))
    else:
        index = FaissIndex(keys, factory, use_gpu=bool(gpus))
    index.set_params(params)
    return index
