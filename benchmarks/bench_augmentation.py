"""Cost of the flip variants (resmem.augmentation), as ratios against the base model in the same run.

No target: the numbers say what `config.query_augmentation="hflip"` and `build_memory(augment="hflip")` cost,
for the ablation's trade-off. CIFAR-ResNet8 (78k parameters, 64-d pre-logit keys, 10 classes),
batch 256 of 32x32 Gaussian-noise images, random weights (they do not change the cost):

  forward:  base, ResMem (exact search over 55,000 entries) and ResMem with query_augmentation="hflip",
            interleaved in rotating order after a warm-up; each ratio is the median over rounds of
            (variant time / base time) measured back to back.
  build:    build_memory of 4,096 images, augment="none" vs "hflip" (and with a residual_model), medians.

Usage:
    python benchmarks/bench_augmentation.py [--rounds 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

try:
    import faiss  # before torch: its omp_set_num_threads can change torch's count
except ImportError:
    faiss = None
import torch

try:
    import resmem  # noqa: F401
except ImportError:  # running from a clone without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import datasets
from transformers.utils import logging as hf_logging

from resmem import ResMemWrapper
from resmem.hub import base_fingerprint
from resmem.models import CifarResNetConfig, CifarResNetForImageClassification

BATCH, ENTRIES, NUM_LABELS = 256, 55_000, 10


def resnet8(seed: int) -> CifarResNetForImageClassification:
    torch.manual_seed(seed)
    return CifarResNetForImageClassification(CifarResNetConfig(num_labels=NUM_LABELS)).eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if faiss is not None:
        faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    rng = np.random.default_rng(0)

    base = resnet8(0)
    model = ResMemWrapper.from_base(base, k=53, sigma=0.7, temperature=1.4, index="exact")
    keys = torch.from_numpy(rng.standard_normal((ENTRIES, 64)).astype(np.float32))  # (N, 64) random memory
    logits = torch.from_numpy(rng.standard_normal((ENTRIES, NUM_LABELS)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, NUM_LABELS, ENTRIES))
    model.memory.set_entries(keys, logits, labels, torch.arange(ENTRIES), base_fingerprint(base), model.config.layer)
    x = torch.from_numpy(rng.standard_normal((BATCH, 3, 32, 32)).astype(np.float32))

    def forward(augmentation):
        def run():
            model.config.query_augmentation = augmentation
            with torch.inference_mode():
                model(pixel_values=x)
        return run

    def base_forward():
        with torch.inference_mode():
            base(pixel_values=x)

    variants = {"base": base_forward, "resmem": forward("none"), "resmem_query_hflip": forward("hflip")}
    for fn in variants.values():  # warm-up (index build, allocator)
        fn()
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        order = names[r % 3:] + names[: r % 3]  # rotate who goes first
        for name in order:
            times[name].append(timed(variants[name]))
    print(f"forward, batch {BATCH}, {ENTRIES} entries x 64-d, exact search, {args.threads} threads, {args.rounds} rounds")
    for name in names:
        ratio = statistics.median(t / b for t, b in zip(times[name], times["base"]))
        print(f"  {name:20s} median {statistics.median(times[name]) * 1e3:8.1f} ms   ratio to base {ratio:5.2f}x")

    n = 4096
    data = datasets.Dataset.from_dict({"pixel_values": rng.standard_normal((n, 3, 32, 32)).astype(np.float32),
                                       "label": rng.integers(0, NUM_LABELS, n)}).with_format("torch")
    other = resnet8(1)
    builds = {
        "build none": lambda: model.build_memory(data, progress=False, augment="none"),
        "build hflip": lambda: model.build_memory(data, progress=False, augment="hflip"),
        "build residual_model": lambda: model.build_memory(data, progress=False, augment="none", residual_model=other),
    }
    build_times = {name: [] for name in builds}
    for r in range(3):
        for name, fn in builds.items():
            build_times[name].append(timed(fn))
    print(f"build_memory of {n} images, batch 256, 3 rounds")
    for name in builds:
        ratio = statistics.median(t / b for t, b in zip(build_times[name], build_times["build none"]))
        print(f"  {name:20s} median {statistics.median(build_times[name]):6.2f} s   ratio to augment='none' {ratio:5.2f}x")


if __name__ == "__main__":
    main()
