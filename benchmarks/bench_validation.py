"""Cost of the load-time checks (index-file binding, memory contents), as ratios against the load they protect, in the same run.

(a) Index file binding: `check_index_file` hashes the saved faiss index (SHA-256, 8 MiB chunks) before
    faiss reads it. Compared with `faiss.read_index` memory-mapped (what a load does: it touches only the
    header and the list directory) and fully read (IO_FLAG_MMAP off).
(b) Memory contents: `check_classifier_entries` over a classifier memory file's tensors, compared with one
    pass over them (a copy of each: safetensors maps the file lazily, so "reading" it costs nothing until
    the data is touched) and with a one-shot `torch.isfinite(x).all()`; and the peak extra RAM of the
    checks against that one-shot test (VmHWM, reset through /proc/self/clear_refs).

Both files are read from the page cache (written just before): a cold read is disk-bound for the hash and
the load alike. Nothing is asserted; numbers go to benchmarks/README.md.

    PYTHONPATH=src python benchmarks/bench_validation.py                 # ~1-2 min on 2 cores
    PYTHONPATH=src python benchmarks/bench_validation.py --entries 100000 --quick
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_extra_bytes(fn) -> int:
    """Peak resident memory added while `fn` runs (Linux: VmHWM after resetting it)."""

    def vm(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = vm("VmRSS:")
    fn()
    return vm("VmHWM:") - before


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=400_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    torch.set_num_threads(2)

    import faiss

    from resmem.index import FaissIndex, file_sha256, index_record
    from resmem.memory import ResidualMemory, open_memory_file  # noqa: I001
    from resmem.validation import check_classifier_entries, check_index_file

    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng(0)
    keys = torch.from_numpy(rng.standard_normal((args.entries, args.dim), dtype=np.float32))
    logits = torch.from_numpy(rng.standard_normal((args.entries, args.classes), dtype=np.float32))
    labels = torch.from_numpy(rng.integers(0, args.classes, args.entries))
    with tempfile.TemporaryDirectory() as folder:
        # (a) index file
        path = os.path.join(folder, "index.faiss")
        index = FaissIndex(keys, "IVF256,Flat")
        index.save(path)
        record = index_record(path, index)
        size = os.path.getsize(path)
        t_hash = best_of(lambda: file_sha256(path), repeats)
        t_check = best_of(lambda: check_index_file(path, record, args.dim, args.entries), repeats)
        t_mmap = best_of(lambda: faiss.read_index(path, faiss.IO_FLAG_MMAP), repeats)
        t_full = best_of(lambda: faiss.read_index(path), repeats)
        print(f"(a) index file {size / 2**20:.0f} MiB ({args.entries} x {args.dim}, IVF256,Flat)")
        print(f"    sha256 {t_hash:.3f} s ({size / t_hash / 2**30:.2f} GiB/s); check_index_file {t_check:.3f} s")
        print(f"    faiss.read_index: memory-mapped {t_mmap * 1e3:.2f} ms (lazy), fully read {t_full:.3f} s")
        print(f"    check_index_file / full faiss read of the same file: {t_check / t_full:.2f}x")
        del index

        # (b) memory contents
        memory = ResidualMemory()
        memory.set_entries(keys, logits, labels, torch.arange(args.entries), fingerprint="bench", layer="none")
        mem_path = os.path.join(folder, "memory.safetensors")
        memory.save(mem_path)
        del memory
        # safetensors maps the file lazily, so the baseline is one pass over the tensors: a copy of each.
        tensors, _ = open_memory_file(mem_path, "resmem-memory", "rebuild", "a memory")
        t_copy = best_of(lambda: [t.clone() for t in tensors.values()], repeats)
        t_validate = best_of(lambda: check_classifier_entries(tensors, None, "bench"), repeats)
        t_naive = best_of(lambda: [bool(torch.isfinite(tensors[n]).all()) for n in ("keys", "base_logits")], repeats)
        mem_size = os.path.getsize(mem_path)
        print(f"(b) memory file {mem_size / 2**20:.0f} MiB ({args.entries} entries, D={args.dim}, C={args.classes})")
        print(f"    one copy of the tensors {t_copy:.3f} s; check_classifier_entries {t_validate:.3f} s: {t_validate / t_copy:.2f}x")
        print(f"    one-shot torch.isfinite(...).all() of keys and logits alone: {t_naive:.3f} s ({t_naive / t_validate:.1f}x the full check)")
        chunked = peak_extra_bytes(lambda: check_classifier_entries(tensors, None, "bench"))
        naive = peak_extra_bytes(lambda: bool(torch.isfinite(tensors["keys"]).all()) and bool(torch.isfinite(tensors["base_logits"]).all()))
        print(f"    peak extra RAM: check_classifier_entries {chunked / 2**20:.1f} MiB, one-shot isfinite {naive / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
