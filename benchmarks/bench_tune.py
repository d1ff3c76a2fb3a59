"""Cost of `model.tune` over a 5x5x5 grid relative to ONE plain evaluation (`evaluation.predict`).

Hardware: any CPU (the numbers in benchmarks/README.md come from 2 shared cores); a CUDA device is used with --device cuda.
Launch:   PYTHONPATH=src python benchmarks/bench_tune.py            (1-2 minutes on 2 busy cores)
Expected: ratio <= 3 (tune does one forward pass + one search at the largest k, then 125 combinations
          from the cache; a brute-force search would cost ~125 plain evaluations).

Setup (paper's CIFAR-100 scale, synthetic data): CIFAR ResNet8 (16-32-64) over 32x32 inputs, 100 classes,
a memory of 20,000 entries (64-d keys), 1,000 validation images (see --memory-size, --val-size); the plain evaluation runs at the grid's
middle k. Both timings are medians of --repeats runs after a warm-up, measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import datasets
import numpy as np
import torch
from transformers.utils import logging as hf_logging

import resmem  # noqa: F401
from resmem import ResMemWrapper
from resmem.evaluation import predict
from resmem.hub import base_fingerprint
from resmem.models import CifarResNetConfig, CifarResNetForImageClassification


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-size", type=int, default=20_000)
    parser.add_argument("--val-size", type=int, default=1_000)
    parser.add_argument("--num-labels", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()

    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = CifarResNetForImageClassification(CifarResNetConfig(num_labels=args.num_labels)).eval()
    model = ResMemWrapper.from_base(base, k=50, sigma=0.7, temperature=1.4).to(args.device)
    # Synthetic memory of the right shape (building it from 50k images is not what is measured here).
    dim = model.base.config.hidden_sizes[-1]
    n, c = args.memory_size, args.num_labels
    model.memory.set_entries(
        torch.randn(n, dim, generator=gen).abs().to(args.device),
        (2 * torch.randn(n, c, generator=gen)).to(args.device),
        torch.randint(0, c, (n,), generator=gen).to(args.device),
        torch.arange(n).to(args.device),
        fingerprint=base_fingerprint(model.base),
        layer=model.config.layer,
    )
    # Array3D pixel_values: the torch formatter then yields whole tensors (nested-list columns are
    # tensorised element by element and would dominate both timings).
    features = datasets.Features({"pixel_values": datasets.Array3D((3, 32, 32), "float32"), "label": datasets.Value("int64")})
    val = datasets.Dataset.from_dict(
        {
            "pixel_values": rng.standard_normal((args.val_size, 3, 32, 32)).astype(np.float32),
            "label": rng.integers(0, c, args.val_size),
        },
        features=features,
    )
    grid = dict(k=[10, 25, 50, 75, 100], sigma=[0.3, 0.5, 0.7, 1.0, 2.0], temperature=[0.5, 1.0, 1.4, 2.0, 3.0])
    model.config.k = grid["k"][len(grid["k"]) // 2]

    def plain():
        predict(model, val, batch_size=args.batch_size)

    def tuned():
        model.tune(val, **grid, batch_size=args.batch_size, set_best=False)

    timings = {}
    for name, fn in (("plain evaluation", plain), ("tune 5x5x5", tuned)):
        fn()  # warm-up (index build, allocator)
        runs = []
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - start)
        timings[name] = statistics.median(runs)
        print(f"{name:18s} median {timings[name]:.3f} s  (runs: {', '.join(f'{r:.3f}' for r in runs)})")
    ratio = timings["tune 5x5x5"] / timings["plain evaluation"]
    print(
        f"memory {n} x {dim}, {c} classes, {args.val_size} validation images, plain k={model.config.k}, "
        f"device {args.device}, {torch.get_num_threads()} threads"
    )
    print(f"ratio tune(125 combinations) / plain evaluation = {ratio:.2f}  (target <= 3)")


if __name__ == "__main__":
    main()
