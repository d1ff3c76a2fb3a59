"""Speed of ResMem for image classification, as ratios against the base model in the same run.

Targets:
  a. `build_memory` throughput >= 0.85x the base model's plain inference throughput over the
     same `datasets.Dataset` (same batch size, same data-iteration path).
  b. ResMem forward latency <= 1.25x the base forward at batch 256 with 50,000 memory entries,
     for a ResNet-18-sized classifier on 32x32 inputs.

Usage:
    python benchmarks/bench_image.py            # full run, about 2 minutes on 2 idle CPU cores
    python benchmarks/bench_image.py --quick    # smoke run (~1 min on idle cores), fewer repetitions
    python benchmarks/bench_image.py --threads 1 --clock cpu   # cross-check, largely immune to other processes

Timings are noisy on a shared machine, so base and ResMem runs are interleaved (alternating
which goes first) after a warm-up, each is repeated, and the ratio is the median over the
back-to-back pairs of resmem/base time. Only ratios are judged; absolute times are printed for
context and never asserted. Models are randomly initialised (weights do not change the cost)
and images are Gaussian noise.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

try:
    import faiss  # imported before torch is configured: its omp_set_num_threads can change torch's count
except ImportError:  # the library falls back to its exact torch backend
    faiss = None
import torch

try:
    import resmem  # noqa: F401
except ImportError:  # running from a clone without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import datasets
from transformers import ResNetConfig, ResNetForImageClassification
from transformers.utils import logging as hf_logging

from resmem import ResMemWrapper
from resmem.data import image_batches
from resmem.hooks import EmbeddingCapture, per_example_keys, resolve_module
from resmem.hub import base_fingerprint
from resmem.models import CifarResNetConfig, CifarResNetForImageClassification

BATCH = 256
NUM_LABELS = 100
K, SIGMA, TEMPERATURE = 53, 0.7, 1.4  # the paper's CIFAR-100 settings
BUILD_TARGET, FORWARD_TARGET = 0.85, 1.25


def set_threads(n: int) -> tuple[int, int | None]:
    """Set faiss's and torch's OpenMP thread counts explicitly (they load separate runtimes)."""
    if faiss is not None:
        faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)  # after faiss, which may have changed it
    return torch.get_num_threads(), (faiss.omp_get_max_threads() if faiss is not None else None)


def cifar_resnet(hidden_sizes=(64, 128, 256, 512)) -> CifarResNetForImageClassification:
    config = CifarResNetConfig(num_labels=NUM_LABELS, hidden_sizes=hidden_sizes, depths=(2, 2, 2, 2))
    return CifarResNetForImageClassification(config).eval()


def hf_resnet18() -> ResNetForImageClassification:
    """transformers' ResNet-18 (ImageNet stem: 7x7 stride-2 conv + max-pool)."""
    config = ResNetConfig(
        num_labels=NUM_LABELS,
        layer_type="basic",
        embedding_size=64,
        hidden_sizes=[64, 128, 256, 512],
        depths=[2, 2, 2, 2],
    )
    return ResNetForImageClassification(config).eval()


def random_dataset(n: int, rng: np.random.Generator) -> datasets.Dataset:
    """`n` Gaussian 3x32x32 images with random labels, as `pixel_values` + `label` columns."""
    features = datasets.Features(
        {"pixel_values": datasets.Array3D((3, 32, 32), "float32"), "label": datasets.ClassLabel(num_classes=NUM_LABELS)}
    )
    pixels = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
    labels = rng.integers(0, NUM_LABELS, n)
    return datasets.Dataset.from_dict({"pixel_values": pixels, "label": labels}, features=features)


# Wall-clock by default; `--clock cpu` (process CPU time) is largely immune to other processes but counts
# OpenMP spin-waits, so it is meaningful with `--threads 1`.
CLOCK = time.perf_counter


def timed(fn) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def interleaved(base_fn, resmem_fn, reps: int) -> tuple[list[float], list[float]]:
    """Run both `reps` times, alternating which goes first; return (base times, resmem times).

    Run i of each forms a pair measured back to back, so `paired_ratio` cancels slow load drift.
    """
    base_t, resmem_t = [], []
    for rep in range(reps):
        if rep % 2 == 0:
            base_t.append(timed(base_fn))
            resmem_t.append(timed(resmem_fn))
        else:
            resmem_t.append(timed(resmem_fn))
            base_t.append(timed(base_fn))
    return base_t, resmem_t


# ---------------------------------------------------------------------------------------- a
def bench_build(n_images: int, reps: int, rng: np.random.Generator) -> dict:
    """`build_memory` vs plain inference over the same dataset through the same iteration path."""
    hidden = (32, 64, 128, 256)
    base = cifar_resnet(hidden)
    dataset = random_dataset(n_images, rng)
    model = ResMemWrapper.from_base(base, k=K, sigma=SIGMA, temperature=TEMPERATURE)

    @torch.inference_mode()
    def plain_inference():
        # The library's own data path (`resmem.data.image_batches`: select_columns -> with_format("torch")
        # -> Dataset.iter), then the base forward: what build_memory does minus the memory.
        for batch in image_batches(dataset, BATCH):
            base(pixel_values=batch.pixel_values)

    def build():
        model.build_memory(dataset, batch_size=BATCH)

    with torch.inference_mode():
        base(pixel_values=torch.randn(BATCH, 3, 32, 32))  # warm-up (oneDNN primitives)
    base_t, build_t = interleaved(plain_inference, build, reps)
    assert len(model.memory) == n_images
    base_tp, build_tp = n_images / statistics.median(base_t), n_images / statistics.median(build_t)
    ratio = 1.0 / paired_ratio(base_t, build_t)  # throughput ratio = inverse time ratio
    return {
        "name": f"a. build_memory throughput, img/s (CIFAR ResNet-18 at width {hidden[0]}, {n_images} imgs)",
        "base": base_tp,
        "resmem": build_tp,
        "ratio": ratio,
        "target": f">= {BUILD_TARGET}",
        "met": ratio >= BUILD_TARGET,
        "runs": f"{reps} interleaved passes each; per pass s: base {_fmt(base_t)}, build {_fmt(build_t)}",
    }


# ---------------------------------------------------------------------------------------- b
def fill_memory(model, base, x_warm: torch.Tensor, n_entries: int, gen: torch.Generator) -> None:
    """Fill `model.memory` with `n_entries` keys drawn around real embeddings of the key layer.

    The key layer's outputs for one real forward of `x_warm` (256 images) are resampled with
    replacement plus Gaussian noise of the same per-dimension standard deviation; the base logits
    of each entry are the head applied to its key (the key layer is the head's input), labels random.
    """
    layer = model.config.layer
    capture = EmbeddingCapture(base, layer)
    with torch.inference_mode(), capture:
        base(pixel_values=x_warm)  # also the base model's warm-up
    real = per_example_keys(capture.get(), x_warm.shape[0], layer)  # (256, D)
    pick = torch.randint(0, real.shape[0], (n_entries,), generator=gen)
    noise = torch.randn(n_entries, real.shape[1], generator=gen) * real.std(dim=0, keepdim=True)
    keys = (real[pick] + noise).contiguous()  # (N, D)
    with torch.inference_mode():
        logits = resolve_module(base, layer)(keys)  # (N, C): the head applied to the keys
    labels = torch.randint(0, NUM_LABELS, (n_entries,), generator=gen)
    model.memory.set_entries(
        keys.clone(), logits.clone(), labels, torch.arange(n_entries), fingerprint=base_fingerprint(base), layer=layer
    )
    model.config.memory_size = n_entries


def bench_forward(
    label: str, base, n_entries: int, reps: int, gen: torch.Generator, numpy_tail: bool = True, choose: bool = False
) -> dict:
    model = ResMemWrapper.from_base(base, k=K, sigma=SIGMA, temperature=TEMPERATURE)
    if not numpy_tail:  # the search tail in torch ops, as before the numpy tail: for a before/after in one run
        model.memory._numpy_tail = False
        label += ", old torch search tail"
    x_warm = torch.randn(BATCH, 3, 32, 32, generator=gen)
    x = torch.randn(BATCH, 3, 32, 32, generator=gen)
    fill_memory(model, base, x_warm, n_entries, gen)
    if choose:  # the index measured by resmem.index_choice (held-out memory entries, seed 0)
        from resmem.index_choice import measure_index_choice

        record = measure_index_choice(model.memory, K, SIGMA, TEMPERATURE, sample=512, seed=0)
        model.config.index, model.config.index_params = record["choice"], record["params"]
        label += f", measured choice {record['choice']} {record['params']}"
        for m in record["measured"]:
            print("  index_choice:", {key: (round(v, 4) if isinstance(v, float) else v) for key, v in m.items()})
        print(f"  index_choice: exact search {record['exact_search_s'] * 1e3:.1f} ms for {record['queries']} queries; "
              f"exact gain {record['exact_gain']:+.4f}; choice {record['choice']} {record['params']}")
    with torch.inference_mode():
        model(pixel_values=x_warm[:8])  # warm-up: builds the search index over the 50k keys

    base_t, resmem_t, ratio = timed_forwards(base, model, x, reps)
    base_ms, resmem_ms = 1e3 * statistics.median(base_t), 1e3 * statistics.median(resmem_t)
    return {
        "name": f"b. forward latency, ms, batch {BATCH}, {n_entries} entries ({label})",
        "base": base_ms,
        "resmem": resmem_ms,
        "ratio": ratio,
        "target": f"<= {FORWARD_TARGET}",
        "met": ratio <= FORWARD_TARGET,
        "runs": f"{reps} interleaved runs each; memory part (median difference) {resmem_ms - base_ms:.0f} ms; "
        f"per run ms: base {_fmt(base_t, 1e3, 0)}, resmem {_fmt(resmem_t, 1e3, 0)}",
    }


def paired_ratio(base_t: list[float], resmem_t: list[float]) -> float:
    """Median over the interleaved pairs of resmem time / base time (> 1: ResMem is slower)."""
    return statistics.median(r / b for b, r in zip(base_t, resmem_t))



def timed_forwards(base, model, x: torch.Tensor, reps: int) -> tuple[list[float], list[float], float]:
    """Interleaved base / ResMem forwards on `x` `(B, C, H, W)`: (base seconds, ResMem seconds, paired ratio)."""

    @torch.inference_mode()
    def base_forward():
        base(pixel_values=x)

    @torch.inference_mode()
    def resmem_forward():
        model(pixel_values=x)

    base_t, resmem_t = interleaved(base_forward, resmem_forward, reps)
    return base_t, resmem_t, paired_ratio(base_t, resmem_t)

def _load() -> str:
    """1/5/15-minute load averages: timings on a shared machine are only as good as its load."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _fmt(times, scale=1.0, digits=2) -> str:
    return "[" + ", ".join(f"{t * scale:.{digits}f}" for t in times) + "]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run (~1 min on idle cores): fewer images and repetitions"
    )
    parser.add_argument("--threads", type=int, default=None, help="threads for torch and faiss (default: usable cores)")
    parser.add_argument("--entries", type=int, default=50_000, help="memory entries for the forward benchmark")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall-clock time (default) or this process's CPU time (a cross-check largely immune to other "
        "processes' load; use it with --threads 1)",
    )
    parser.add_argument(
        "--hf-before-after",
        action="store_true",
        help="only the transformers ResNet-18 forward, with the old torch search tail and with the numpy tail",
    )
    parser.add_argument(
        "--measured-choice",
        action="store_true",
        help="with --hf-before-after: a third row with the index resmem.index_choice measures and picks",
    )
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch_threads, faiss_threads = set_threads(args.threads or cores)
    hf_logging.disable_progress_bar()  # build_memory's tqdm bar would cost time the baseline does not pay
    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)

    n_images, build_reps = (512, 3) if args.quick else (1024, 5)
    cifar_reps, hf_reps = (2, 5) if args.quick else (5, 9)

    print(f"resmem-hf image benchmark{' (--quick)' if args.quick else ''}")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{__import__('transformers').__version__}, datasets {datasets.__version__}, "
        f"faiss {faiss.__version__ if faiss else 'absent (torch exact search)'}"
    )
    print(f"CPU: {platform.processor() or platform.machine()}, {cores} usable cores, cuda: {torch.cuda.is_available()}")
    print(f"threads: torch {torch_threads}, faiss {faiss_threads} (set explicitly, faiss first)")
    print(f"load average at the start {_load()}")
    print(f"clock: {'process CPU time' if args.clock == 'cpu' else 'wall-clock'}")
    print(f"ResMem: k={K}, sigma={SIGMA}, T={TEMPERATURE}, {NUM_LABELS} classes, batch {BATCH}, index='auto' (exact)")
    print(
        "a: plain inference = the base forward over resmem.data.image_batches(dataset, 256), the iteration "
        "build_memory uses; build_memory's progress bar off"
    )
    print(
        f"b: {args.entries} synthetic keys = resampled real pre-logit embeddings of 256 random images "
        "+ Gaussian noise (same per-dim std); entry logits = the head applied to the key; random labels"
    )
    print()

    start = time.perf_counter()
    if args.hf_before_after:
        base = hf_resnet18()
        rows = [
            bench_forward("transformers ResNet-18, ImageNet stem", base, args.entries, hf_reps, gen, numpy_tail=False),
            bench_forward("transformers ResNet-18, ImageNet stem", base, args.entries, hf_reps, gen),
        ]
        if args.measured_choice:
            rows.append(bench_forward("transformers ResNet-18, ImageNet stem", base, args.entries, hf_reps, gen, choose=True))
    else:
        rows = None
    rows = rows or [
        bench_build(n_images, build_reps, rng),
        bench_forward("CIFAR ResNet-18, 3x3 stem", cifar_resnet(), args.entries, cifar_reps, gen),
        bench_forward("transformers ResNet-18, ImageNet stem", hf_resnet18(), args.entries, hf_reps, gen),
    ]
    elapsed = time.perf_counter() - start

    width = max(len(r["name"]) for r in rows)
    print(f"{'measurement':<{width}}  {'base':>9}  {'resmem':>9}  {'ratio':>6}  {'target':>7}  met")
    for r in rows:
        print(
            f"{r['name']:<{width}}  {r['base']:>9.1f}  {r['resmem']:>9.1f}  {r['ratio']:>6.3f}  {r['target']:>7}  "
            f"{'yes' if r['met'] else 'NO'}"
        )
    print()
    for r in rows:
        print(f"{r['name'][:2]} {r['runs']}")
    print(
        "ratio = median over interleaved back-to-back pairs of resmem/base time (a: inverted, as a throughput "
        "ratio); base/resmem columns are medians"
    )
    if args.quick:
        print("--quick is a smoke run: too few repetitions for a verdict on a busy machine; the full run measures")
    print(f"benchmark time {elapsed:.0f} s; load average at the end {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
