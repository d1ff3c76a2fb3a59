"""Build a memory larger than this process should hold in RAM: 5 million entries written in shards.

Random 64-d keys, 100 classes (random base logits and labels), written through
`resmem.memory_disk.MemoryWriter` in chunks, then memory-mapped (`OnDiskMemory`), indexed with
IVF-PQ (trained on a sample, filled shard by shard, written to disk and memory-mapped) and searched
with exact re-ranking from the mapped keys.

Run:  PYTHONPATH=src python benchmarks/bench_disk_build.py --entries 5000000 --folder /tmp/resmem-5m
Prints bytes per entry on disk and peak RSS, with ratios against the baseline of holding the
same memory in RAM (keys + base logits + labels + ids as dense tensors, i.e. what the in-RAM
`ResidualMemory` holds), computed in the same run from the same sizes.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import time

import faiss
import numpy as np
import torch

from resmem.memory_disk import MemoryWriter, OnDiskMemory


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_gib(field: str = "VmRSS") -> float:
    """Current resident memory; `RssAnon` is the private part (`VmRSS` also counts mapped file pages)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


PEAK_ANON = [0.0]


def sample_anon() -> None:
    PEAK_ANON[0] = max(PEAK_ANON[0], current_rss_gib("RssAnon"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=5_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=500_000)
    parser.add_argument("--index", default="IVF256,SQ8")
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--rerank", type=int, default=4)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--folder", default="/tmp/resmem-5m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    shutil.rmtree(args.folder, ignore_errors=True)
    rng = np.random.default_rng(0)

    t0 = time.perf_counter()
    with MemoryWriter(args.folder, fingerprint="synthetic", layer="none", shard_size=args.shard_size) as writer:
        for start in range(0, args.entries, args.chunk):
            n = min(args.chunk, args.entries - start)
            writer.add(
                rng.standard_normal((n, args.dim), dtype=np.float32),
                rng.standard_normal((n, args.classes), dtype=np.float32),
                rng.integers(0, args.classes, n),
            )
            sample_anon()
    write_s = time.perf_counter() - t0
    rss_after_write = rss_gib()
    disk = sum(os.path.getsize(os.path.join(args.folder, f)) for f in os.listdir(args.folder))
    print(f"wrote {args.entries:,} entries in {len(os.listdir(args.folder)) - 1} shards in {write_s:.1f} s "
          f"({args.entries / write_s:,.0f} entries/s); peak RSS so far {rss_after_write:.2f} GiB")

    t0 = time.perf_counter()
    memory = OnDiskMemory.open(args.folder)
    open_s = time.perf_counter() - t0
    print(f"opened memory-mapped in {open_s * 1e3:.1f} ms; RSS now {current_rss_gib():.2f} GiB")

    t0 = time.perf_counter()
    import resmem.index as index_module

    index_module._as_numpy_rows_original = index_module._as_numpy_rows

    def sampled_rows(*a):  # sample anonymous RSS while the index is filled chunk by chunk
        sample_anon()
        return index_module._as_numpy_rows_original(*a)

    index_module._as_numpy_rows = sampled_rows
    memory.build_index(args.index)
    index_module._as_numpy_rows = index_module._as_numpy_rows_original
    sample_anon()
    index_s = time.perf_counter() - t0
    index_bytes = os.path.getsize(os.path.join(args.folder, "resmem_index.faiss"))
    print(f"index {args.index}: trained + filled + written in {index_s:.1f} s ({index_bytes / 2**20:.0f} MiB on disk); "
          f"peak RSS so far {rss_gib():.2f} GiB")

    queries = torch.randn(args.queries, args.dim, generator=torch.Generator().manual_seed(1))
    params = {"nprobe": args.nprobe, "rerank_factor": args.rerank}
    memory.residual_for(queries[:10], 50, 1.0, 1.0, args.index, params)  # warm-up
    t0 = time.perf_counter()
    residual = memory.residual_for(queries, 50, 1.0, 1.0, args.index, params)
    search_s = time.perf_counter() - t0
    assert torch.isfinite(residual).all()
    sample_anon()
    print(f"{args.queries} queries, k=50, {params}: {search_s * 1e3:.0f} ms; RSS now {current_rss_gib():.2f} GiB")

    ram_bytes_per_entry = args.dim * 4 + args.classes * 4 + 8 + 8
    ram_total = ram_bytes_per_entry * args.entries
    peak = rss_gib()
    disk_per_entry = disk / args.entries
    print(f"bytes per entry on disk: {disk_per_entry:.1f} (shards) + {index_bytes / args.entries:.1f} (index); "
          f"in-RAM baseline {ram_bytes_per_entry} B/entry")
    print(f"RATIO shard bytes per entry / dense in-RAM bytes per entry: {disk_per_entry / ram_bytes_per_entry:.3f}")
    print(f"peak RSS {peak:.2f} GiB (ru_maxrss: includes pages of the memory-mapped files, which the kernel "
          f"reclaims under pressure) vs {ram_total / 2**30:.2f} GiB to hold the memory in RAM: "
          f"RATIO peak RSS / in-RAM size = {peak * 2**30 / ram_total:.3f}")
    print(f"peak anonymous RSS (private memory, sampled per chunk) {PEAK_ANON[0]:.2f} GiB: "
          f"RATIO peak anon RSS / in-RAM size = {PEAK_ANON[0] * 2**30 / ram_total:.3f}")
    if not args.keep:
        shutil.rmtree(args.folder, ignore_errors=True)


if __name__ == "__main__":
    main()
