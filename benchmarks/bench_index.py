"""Approximate vs exact memory search at scale, and the wrapper's overhead over raw faiss search.

Synthetic but honest task: keys in Gaussian clusters (one class per cluster); the "base model" is
confidently wrong on 30% of the clusters, so the memory's residuals fix those and the ResMem gain
over the base model is large. Queries are fresh draws from the same clusters.

Run (2 CPU threads):  PYTHONPATH=src python benchmarks/bench_index.py --entries 1000000
Prints each measurement and the ratios against the baseline measured in the same run:
- approximate (IVF) search speed-up over exact search (target >= 5x) and the share of the exact
  memory's accuracy gain it keeps (target >= 99%);
- wrapper search (`ResidualMemory.residual_for`: index search + exact distances + residuals) vs raw
  `faiss.Index.search` on the same index and queries (target overhead <= 10%).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import faiss
import numpy as np
import torch

from resmem import ResidualMemory
from resmem.residuals import resmem_scores


def clustered(n, dim, clusters, classes, wrong_share, rng, centres, cluster_label, wrong):
    c = rng.integers(0, clusters, n)
    x = centres[c] + rng.standard_normal((n, dim), dtype=np.float32)
    y = cluster_label[c]
    base_pred = np.where(wrong[c], (y + 1) % classes, y)
    logits = np.eye(classes, dtype=np.float32)[base_pred] * 4 + rng.standard_normal((n, classes), dtype=np.float32) * 0.5
    return x, logits, y


def sync(out):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = sync(fn())
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=2_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--index", default="IVF1024,Flat")
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spread", type=float, default=0.8, help="cluster centre scale (noise is 1): lower = harder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cuda: faiss-gpu on all GPUs when installed, else torch exact search")
    parser.add_argument("--overhead-only", action="store_true",
                        help="build only the approximate index and time raw faiss vs memory.search vs the old torch tail, interleaved")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32) * args.spread
    cluster_label = rng.integers(0, args.classes, args.clusters)
    wrong = rng.random(args.clusters) < 0.3
    make = lambda n: clustered(n, args.dim, args.clusters, args.classes, 0.3, rng, centres, cluster_label, wrong)  # noqa: E731
    keys, logits, labels = make(args.entries)
    q, q_logits, q_labels = (torch.from_numpy(a) for a in make(args.queries))
    memory = ResidualMemory()
    memory.set_entries(torch.from_numpy(keys), torch.from_numpy(logits), torch.from_numpy(labels), torch.arange(args.entries), "synthetic", "none")
    del keys, logits
    memory.to(args.device)
    q, q_logits, q_labels = q.to(args.device), q_logits.to(args.device), q_labels.to(args.device)
    print(f"memory: {args.entries:,} entries x {args.dim}-d keys, {args.classes} classes; {args.queries} queries, k={args.k}")

    if args.overhead_only:
        return overhead_only(memory, q, args)
    base_acc = (q_logits.argmax(-1) == q_labels).float().mean().item()
    results = {}
    for name, spec, params in (("exact", "exact", None), ("approx", args.index, {"nprobe": args.nprobe})):
        t0 = time.perf_counter()
        index = memory.index(spec, params)
        build_s = time.perf_counter() - t0
        if hasattr(index, "index"):  # a faiss index (CPU or GPU): time faiss's own search on numpy queries
            raw_q = np.ascontiguousarray(q.cpu().numpy())
            raw_s, _ = best_time(lambda: index.index.search(raw_q, args.k), args.repeats)
        else:  # torch exact search on the GPU
            raw_s, _ = best_time(lambda: sync(index.search(q, args.k)), args.repeats)
        search_s, _ = best_time(lambda: memory.search(q, args.k, spec, params), args.repeats)
        wrap_s, residual = best_time(lambda: memory.residual_for(q, args.k, 1.0, 1.0, spec, params), args.repeats)
        acc = (resmem_scores(q_logits, residual, 1.0).argmax(-1) == q_labels).float().mean().item()
        results[name] = dict(build_s=build_s, raw_s=raw_s, search_s=search_s, wrap_s=wrap_s, acc=acc)
        print(f"{name:6s} {spec:>14s}: build {build_s:7.2f} s | raw faiss search {raw_s * 1e3:8.1f} ms | "
              f"memory.search {search_s * 1e3:8.1f} ms (overhead {search_s / raw_s - 1:+.1%}) | "
              f"search+residual {wrap_s * 1e3:8.1f} ms (overhead {wrap_s / raw_s - 1:+.1%}) | ResMem acc {acc:.4f}")
        memory._index = None  # free the index before building the next one
    ex, ap = results["exact"], results["approx"]
    gain_exact, gain_approx = ex["acc"] - base_acc, ap["acc"] - base_acc
    speedup = ex["wrap_s"] / ap["wrap_s"]
    kept = gain_approx / gain_exact if gain_exact else float("nan")
    print(f"base accuracy {base_acc:.4f}; exact ResMem gain {gain_exact:+.4f}; approximate gain {gain_approx:+.4f}")
    print(f"RATIO approx/exact search speed-up: {speedup:.1f}x (target >= 5x: {'MET' if speedup >= 5 else 'NOT MET'})")
    print(f"RATIO approx gain / exact gain: {kept:.4f} (target >= 0.99: {'MET' if kept >= 0.99 else 'NOT MET'})")
    for name in ("exact", "approx"):
        for what, key in (("memory.search", "search_s"), ("search+residual", "wrap_s")):
            over = results[name][key] / results[name]["raw_s"] - 1
            print(f"RATIO {what} overhead over raw faiss ({name}): {over:+.1%} (target <= 10%: {'MET' if over <= 0.10 else 'NOT MET'})")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


def torch_tail_search(memory, queries, k, spec, params):
    """`ResidualMemory.search` as it was before the numpy tail (torch ops on the (B, k) results), for comparison."""
    index = memory.index(spec, params)
    d, ids = index.index.search(np.ascontiguousarray(queries.numpy()), k)
    distances = torch.from_numpy(d).clamp_min_(0).sqrt_()
    ids = torch.from_numpy(ids)
    valid = ids >= 0
    ids = ids.clamp_min(0)
    distances = distances.masked_fill(~valid, float("inf"))
    distances, order = torch.topk(distances, k, dim=1, largest=False)
    return distances, ids.gather(1, order)


def overhead_only(memory, q, args):
    """Wrapper search vs raw faiss on the same index and queries, in rounds (raw, new, old; order rotated)."""
    spec, params = args.index, {"nprobe": args.nprobe}
    t0 = time.perf_counter()
    index = memory.index(spec, params)
    print(f"{spec} nprobe {args.nprobe}: build {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}, "
          f"faiss threads {faiss.omp_get_max_threads()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    raw_q = np.ascontiguousarray(q.numpy())
    fns = {
        "raw faiss": lambda: index.index.search(raw_q, args.k),
        "memory.search (numpy tail)": lambda: memory.search(q, args.k, spec, params),
        "old torch tail": lambda: torch_tail_search(memory, q, args.k, spec, params),
    }
    new_d, new_i = fns["memory.search (numpy tail)"]()
    old_d, old_i = fns["old torch tail"]()
    same = (new_i == old_i).float().mean().item()
    print(f"numpy vs torch tail: ids equal {same:.4%}, max distance diff {(new_d - old_d).abs().max().item():.2e}")
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(args.repeats):
        for name in names[r % 3:] + names[: r % 3]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    med = {name: float(np.median(t)) for name, t in times.items()}
    for name in names:
        print(f"{name:28s} median {med[name] * 1e3:8.1f} ms over {args.repeats} runs")
    for name in names[1:]:
        ratio = med[name] / med["raw faiss"]
        print(f"RATIO {name} / raw faiss: {ratio:.3f} (overhead {ratio - 1:+.1%}; target <= 10%: {'MET' if ratio <= 1.10 else 'NOT MET'})")


if __name__ == "__main__":
    main()
