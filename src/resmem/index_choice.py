"""Choose a search index by measured cost and quality (not yet wired into `index="auto"`, which still decides by memory size).

`measure_index_choice` tries candidate indexes (IVF with a few `nprobe` values, HNSW, a PCA
transform) against exact search on held-out memory entries and picks the fastest that keeps the
exact ResMem predictions and gain, or exact. Queries are a seeded sample of the memory's own
entries with each query's own entry left out of its neighbours (so they act as held-out points
whose base logits and labels are known). The returned record holds every measurement and the choice.
"""

from __future__ import annotations

import math
import time

import torch

from .index import build_index
from .residuals import neighbour_weights, weighted_residual


def default_candidates(num_entries: int, dim: int) -> list[tuple[str, dict]]:
    """IVF at faiss's `4 sqrt(N)` lists with 4 nprobe values, HNSW32, and PCA to D/4 before IVF."""
    nlist = max(4, 2 ** round(math.log2(4 * math.sqrt(num_entries))))
    out = [(f"IVF{nlist},Flat", {"nprobe": p}) for p in (4, 8, 16, 32) if p < nlist]
    out.append(("HNSW32", {"efSearch": 64}))
    if dim >= 32:
        out.append((f"PCA{dim // 4},IVF{nlist},Flat", {"nprobe": 16}))
    return out


def _held_out_search(index, queries: torch.Tensor, self_ids: torch.Tensor, k: int):
    """Search `k + 1`, drop each query's own entry (or the farthest when it was not found) -> `(B, k)` each."""
    d, ids = index.search(queries, k + 1)  # (B, k+1)
    own = ids == self_ids[:, None]
    drop = torch.where(own.any(1), own.float().argmax(1), torch.full_like(self_ids, k))  # (B,)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[torch.arange(len(ids)), drop] = False
    return d[keep].view(-1, k), ids[keep].view(-1, k)


def measure_index_choice(
    memory,
    k: int,
    sigma: float,
    temperature: float,
    candidates: list[tuple[str, dict]] | None = None,
    sample: int = 512,
    seed: int = 0,
    min_kept: float = 0.99,
    repeats: int = 2,
    min_speedup: float = 1.5,
) -> dict:
    """Measure candidate indexes on held-out memory entries; choose the first (cheapest) keeping `min_kept` of exact.

    A candidate qualifies when it keeps `min_kept` of the exact predictions and of the exact ResMem gain
    on the held-out entries and searches at least `min_speedup` times faster than exact; else `"exact"`.

    Args:
        memory: a classifier memory in RAM ([`ResidualMemory`]): keys `(N, D)`, base logits `(N, C)`, labels `(N,)`.
        sample: number of held-out query entries (seeded, without replacement).
    Returns:
        `{"choice": spec, "params": {...}, "measured": [per index: spec, params, search_s, speedup,
        agreement (share of exact predictions kept), gain, gain_kept (1.0 when the exact gain is <= 0: then
        only `agreement` tests quality), recall (share of exact neighbours found)],
        "exact_gain": ..., "queries": n, "seed": seed}`.
    """
    n = len(memory)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n, generator=gen)[: min(sample, n)]  # (Q,)
    queries = memory.keys.index_select(0, pick)  # (Q, D)
    logits, labels = memory.base_logits.index_select(0, pick), memory.labels.index_select(0, pick)
    base_prob = torch.softmax(logits / temperature, -1)  # (Q, C)
    base_acc = (base_prob.argmax(-1) == labels).float().mean().item()

    def evaluate(spec, params):
        index = build_index(memory.keys, spec, params)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            d, ids = _held_out_search(index, queries, pick, k)
            times.append(time.perf_counter() - t0)
        valid = ids >= 0
        ids = ids.clamp_min(0)
        d = d.masked_fill(~valid, float("inf"))
        w = torch.nan_to_num(neighbour_weights(d, sigma), nan=0.0)  # (Q, k)
        pred = (base_prob + weighted_residual(w, memory.neighbour_residuals(ids, temperature))).argmax(-1)  # (Q,)
        return min(times), pred, ids

    exact_s, exact_pred, exact_ids = evaluate("exact", None)
    exact_gain = (exact_pred == labels).float().mean().item() - base_acc
    measured = []
    for spec, params in candidates if candidates is not None else default_candidates(n, memory.dim):
        try:
            s, pred, ids = evaluate(spec, params)
        except ValueError as err:  # e.g. too few entries to train this IVF
            measured.append({"spec": spec, "params": params, "error": str(err)[:200]})
            continue
        gain = (pred == labels).float().mean().item() - base_acc
        recall = (ids[:, :, None] == exact_ids[:, None, :]).any(-1).float().mean().item()
        measured.append({
            "spec": spec, "params": params, "search_s": s, "speedup": exact_s / s,
            "agreement": (pred == exact_pred).float().mean().item(), "gain": gain,
            "gain_kept": gain / exact_gain if exact_gain > 0 else 1.0, "recall": recall,
        })
    # Candidates come cheapest-first by construction (fewer probes first): take the first that keeps the exact
    # predictions and gain (deterministic for a seed) and is clearly faster than exact (the one timed test).
    good = [m for m in measured if "error" not in m and m["agreement"] >= min_kept and m["gain_kept"] >= min_kept
            and m["speedup"] >= min_speedup]
    best = good[0] if good else None
    return {
        "choice": best["spec"] if best else "exact", "params": dict(best["params"]) if best else {},
        "exact_search_s": exact_s, "exact_gain": exact_gain, "base_accuracy": base_acc,
        "queries": int(len(pick)), "seed": seed, "min_kept": min_kept, "measured": measured,
    }
