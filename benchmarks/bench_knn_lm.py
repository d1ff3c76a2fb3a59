"""kNN-LM grid scoring: `resmem.knn_lm.knn_lm_chunk` (touched tokens only) against the dense computation.

The baseline, measured in the same run, builds `p = lam * p_kNN + (1 - lam) * softmax(f(x))` over the whole
vocabulary for every `(k, knn_temperature, lam)` (the forward's `knn_lm_outputs` math) and takes its argmax and
the label's log-probability. Both must agree exactly on correctness and to float rounding on the log-probability
(checked here before timing). Random logits, distances and neighbour tokens (a few distinct tokens, so that
duplicates occur as in text).

    PYTHONPATH=src python benchmarks/bench_knn_lm.py --positions 256 --vocab 49152 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from resmem.knn_lm import KNN_EPS, knn_distribution, knn_lm_chunk
from resmem.residuals import neighbour_weights


def dense(base_logits, labels, distances, neighbour_labels, ks, taus, lams):
    """The forward's math per setting: `(n, V)` mixture, argmax, label log-probability."""
    p_lm = torch.softmax(base_logits, dim=-1)  # (n, V)
    out = {}
    for k in ks:
        for tau in taus:
            p_knn = knn_distribution(neighbour_weights(distances[:, :k], tau), neighbour_labels[:, :k], p_lm.shape[1])
            for lam in lams:
                p = lam * p_knn + (1.0 - lam) * p_lm  # (n, V)
                out[k, float(tau), float(lam)] = (p.argmax(-1) == labels, p.gather(1, labels[:, None]).squeeze(1).clamp_min(KNN_EPS).log())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", type=int, default=256)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--ks", type=int, nargs="+", default=[10, 25, 50, 100])
    p.add_argument("--taus", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0, 10.0])
    p.add_argument("--lams", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5, 0.75])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n, v, kmax = args.positions, args.vocab, max(args.ks)
    base_logits = torch.randn(n, v, generator=g) * 3  # (n, V)
    pool = torch.randint(0, v, (n, 12), generator=g)  # 12 candidate next tokens per position: duplicates
    neighbour_labels = pool.gather(1, torch.randint(0, 12, (n, kmax), generator=g))  # (n, kmax)
    labels = torch.where(torch.rand(n, generator=g) < 0.5, neighbour_labels[:, 0], torch.randint(0, v, (n,), generator=g))
    distances = (torch.rand(n, kmax, generator=g) * 3 + 5).sort(dim=1).values  # (n, kmax) ascending
    grid = (args.ks, args.taus, args.lams)

    fast = knn_lm_chunk(base_logits, labels, distances, neighbour_labels, *grid)
    slow = dense(base_logits, labels, distances, neighbour_labels, *grid)
    for key in slow:
        assert torch.equal(fast[key][0], slow[key][0]), key
        torch.testing.assert_close(fast[key][1], slow[key][1], rtol=1e-6, atol=1e-6)

    def best_time(fn):
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn(base_logits, labels, distances, neighbour_labels, *grid)
            times.append(time.perf_counter() - t)
        return min(times)

    t_dense, t_fast = best_time(dense), best_time(knn_lm_chunk)
    settings = len(args.ks) * len(args.taus) * len(args.lams)
    print(f"{n} positions, V={v}, {settings} settings (k {args.ks} x tau {args.taus} x lam {args.lams}), "
          f"{args.threads} threads; results equal (correctness exactly, log-probability to 1e-6)")
    print(f"dense (n, V) per setting: {t_dense:.3f} s   knn_lm_chunk: {t_fast:.3f} s   speed-up {t_dense / t_fast:.1f}x")


if __name__ == "__main__":
    main()
