"""Nearest-neighbour search backends behind one interface.

Every backend returns *plain* L2 distances (faiss flat indexes return squared ones) and
int64 ids into the memory, nearest first.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

FAISS_INSTALL_HINT = "pip install 'resmem-hf[cpu]' (faiss-cpu) or 'resmem-hf[gpu]' (faiss-gpu)"


def is_faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def require_faiss():
    if not is_faiss_available():
        raise ImportError(f"This index needs faiss, which is not installed: {FAISS_INSTALL_HINT}.")
    import faiss

    return faiss


class NeighbourIndex:
    """Interface: `search(queries (B, D), k) -> (distances (B, k) plain L2, ids (B, k) int64)`."""

    def __len__(self) -> int:
        raise NotImplementedError

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


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


class FaissIndex(NeighbourIndex):
    """A faiss index (flat, IVF, HNSW, PQ ... from a factory string) over CPU float32 keys."""

    def __init__(self, keys: torch.Tensor, factory: str = "Flat"):
        faiss = require_faiss()
        factory, _, params = factory.partition("|")  # e.g. "IVF1024,Flat|nprobe=16"
        x = np.ascontiguousarray(keys.detach().cpu().numpy(), dtype=np.float32)
        try:
            index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_L2)
        except RuntimeError as err:
            raise ValueError(
                f"faiss rejected the index factory string {factory!r}: {err}. Use 'exact', 'auto' or a valid "
                "faiss factory string such as 'Flat', 'IVF1024,Flat' or 'HNSW32'."
            ) from err
        if not index.is_trained:
            index.train(x)
        index.add(x)
        if params:
            try:
                faiss.ParameterSpace().set_index_parameters(index, params)
            except RuntimeError as err:
                raise ValueError(f"faiss rejected the search parameters {params!r} for {factory!r}: {err}.") from err
        self.index = index

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries, k):
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        sq_dist, ids = self.index.search(q, k)
        distances = torch.from_numpy(sq_dist).clamp_min_(0).sqrt_()
        return distances.to(queries.device), torch.from_numpy(ids).to(queries.device)


def build_index(keys: torch.Tensor, spec: str = "auto") -> NeighbourIndex:
    """Build a search index over `keys` `(N, D)` float32.

    `spec`: `"exact"` (faiss `IndexFlatL2` on CPU when faiss is installed, else torch),
    `"auto"` (exact; torch matrix-multiply search when the keys live on an accelerator),
    or any faiss factory string, optionally followed by `|` and search parameters
    (e.g. `"IVF1024,Flat|nprobe=16"`, `"HNSW32|efSearch=64"`).
    """
    on_cpu = keys.device.type == "cpu"
    if spec in ("auto", "exact"):
        if on_cpu and is_faiss_available():
            return FaissIndex(keys, "Flat")
        return TorchExactIndex(keys)
    return FaissIndex(keys, spec)
