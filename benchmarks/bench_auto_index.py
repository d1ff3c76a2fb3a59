"""ResMem forward / base forward at batch 256 with `index="auto"` measured by cost and quality.

Targets (ratios against the base forward measured in the same run, interleaved):
  1. CIFAR-ResNet8 (`resmem.models.CifarResNetConfig(hidden_sizes=(16, 32, 64), depths=(1, 1, 1))`, 78k
     parameters, 64-d keys), 55,000 memory entries: ResMem forward <= 1.5x base.
  2. transformers' ResNet-18 (`ResNetConfig` resnet-18 layout, ImageNet stem) on 32x32 inputs, 512-d keys,
     50,000 entries: <= 1.25x.
Each model is timed with exact search and with the index `resmem.index_choice` measures on 1,024 validation
queries (`config.index = "auto"`, `config.index_choice` = the record: the forward's own wiring), and the
quality kept by the choice (share of exact ResMem predictions kept, share of exact gain kept) is printed.

Usage:
    PYTHONPATH=src python benchmarks/bench_auto_index.py            # ~4 min on 2 busy cores
    PYTHONPATH=src python benchmarks/bench_auto_index.py --quick    # smoke run

Data: random-init models (weights do not change the cost), Gaussian images for the timed forward. The memory
and the validation queries are synthetic but structured, so that the quality numbers mean something: keys are
real pre-logit embeddings of 256 random images, resampled with replacement plus Gaussian noise (1x the
per-dimension std); each of the 256 sources has a label (source % C), replaced by a random class for 50% of
entries; entry logits are the head applied to the key (the key layer is the head's input). Validation
queries are drawn the same way. k=50, sigma = the memory's median nearest-key distance (`sigma_scale()`), T=1,
10 classes (CIFAR-10).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

try:
    import faiss  # before torch is configured: its omp_set_num_threads can change torch's count
except ImportError:
    faiss = None
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_image import hf_resnet18, set_threads, timed_forwards, _load  # noqa: E402

from transformers.utils import logging as hf_logging  # noqa: E402

from resmem import ResMemWrapper  # noqa: E402
from resmem.hooks import EmbeddingCapture, per_example_keys, resolve_module  # noqa: E402
from resmem.hub import base_fingerprint  # noqa: E402
from resmem.index_choice import measure_on_queries  # noqa: E402
from resmem.models import CifarResNetConfig, CifarResNetForImageClassification  # noqa: E402

BATCH, K, T, NUM_LABELS = 256, 50, 1.0, 10


def resnet8() -> CifarResNetForImageClassification:
    config = CifarResNetConfig(num_labels=NUM_LABELS, hidden_sizes=(16, 32, 64), depths=(1, 1, 1))
    return CifarResNetForImageClassification(config).eval()


def structured_entries(base, layer: str, n: int, gen: torch.Generator):
    """`(keys (n, D), logits (n, C), labels (n,))` around real embeddings (see the module docstring)."""
    capture = EmbeddingCapture(base, layer)
    with torch.inference_mode(), capture:
        base(pixel_values=torch.randn(256, 3, 32, 32, generator=gen))
    real = per_example_keys(capture.get(), 256, layer)  # (256, D)
    pick = torch.randint(0, 256, (n,), generator=gen)
    keys = (real[pick] + torch.randn(n, real.shape[1], generator=gen) * real.std(0, keepdim=True)).contiguous()
    labels = torch.where(torch.rand(n, generator=gen) < 0.5, torch.randint(0, NUM_LABELS, (n,), generator=gen), pick % NUM_LABELS)
    with torch.inference_mode():
        logits = resolve_module(base, layer)(keys)  # (n, C): the head applied to the keys
    return keys.clone(), logits.clone().float(), labels


def bench(label: str, base, n_entries: int, reps: int, target: float, gen: torch.Generator, val_queries: int) -> list[dict]:
    model = ResMemWrapper.from_base(base, k=K, sigma=1.0, temperature=T)
    layer = model.config.layer
    keys, logits, labels = structured_entries(base, layer, n_entries + val_queries, gen)
    model.memory.set_entries(keys[:n_entries], logits[:n_entries], labels[:n_entries], torch.arange(n_entries),
                             fingerprint=base_fingerprint(base), layer=layer)
    model.config.memory_size = n_entries
    model.config.index = "exact"
    model.config.sigma = model.sigma_scale()  # the memory's median nearest-key distance
    x = torch.randn(BATCH, 3, 32, 32, generator=gen)
    params = sum(p.numel() for p in base.parameters())
    rows = []

    def timed_row(what: str) -> dict:
        with torch.inference_mode():
            model(pixel_values=x[:8])  # warm-up: builds / attaches the search index
            base(pixel_values=x)

        base_t, resmem_t, ratio = timed_forwards(base, model, x, reps)
        b, r = 1e3 * statistics.median(base_t), 1e3 * statistics.median(resmem_t)
        return {"name": f"{label} ({params / 1e3:.0f}k params, {keys.shape[1]}-d keys), {n_entries} entries, {what}",
                "base": b, "resmem": r, "ratio": ratio, "target": target, "met": ratio <= target}

    rows.append(timed_row("exact search"))
    t0 = time.perf_counter()
    record, _ = measure_on_queries(model.memory, keys[n_entries:], logits[n_entries:], labels[n_entries:], K,
                                   model.config.sigma, T)
    took = time.perf_counter() - t0
    model.config.index = "auto"
    model.config.index_choice = record  # what tune(validation) records; the forward resolves "auto" with it
    print(f"{label}: index_choice measured on {record['queries']} validation queries in {took:.1f} s (load {_load()}); "
          f"exact search {1e3 * record['exact_search_s']:.1f} ms, exact gain {100 * record['exact_gain']:+.2f} points "
          f"(base acc {100 * record['base_accuracy']:.1f}%)")
    for m in record["measured"]:
        if "error" in m:
            print(f"  {m['spec']} {m['params']}: {m['error']}")
        else:
            print(f"  {m['spec']:<22} {str(m['params']):<34} speed-up {m['speedup']:5.2f}x  agreement "
                  f"{100 * m['agreement']:5.1f}%  gain kept {100 * m['gain_kept']:5.1f}%  recall {100 * m['recall']:5.1f}%")
    kept = next((m for m in record["measured"] if m["spec"] == record["choice"] and m["params"] == record["params"]), None)
    quality = f"agreement {100 * kept['agreement']:.1f}%, gain kept {100 * kept['gain_kept']:.1f}%" if kept else "exact"
    print(f"  -> chosen {record['choice']} {record['params']} ({quality})")
    row = timed_row(f"auto: {record['choice']} {record['params']}")
    row["quality"] = quality
    rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer repetitions")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch_threads, faiss_threads = set_threads(args.threads or cores)
    hf_logging.set_verbosity_error()
    gen = torch.Generator().manual_seed(0)
    reps = 3 if args.quick else 9
    print(f"torch {torch.__version__}, faiss {faiss.__version__ if faiss else 'absent'}; threads torch {torch_threads}, "
          f"faiss {faiss_threads}; {cores} cores; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; "
          f"load at start {_load()}")
    start = time.perf_counter()
    torch.manual_seed(0)  # the random-init weights, hence the keys and the quality numbers, are the same every run
    rows = bench("CIFAR-ResNet8", resnet8(), 55_000, reps, 1.5, gen, 1024)
    rows += bench("transformers ResNet-18 32x32", hf_resnet18_10(), 50_000, reps, 1.25, gen, 1024)
    print()
    width = max(len(r["name"]) for r in rows)
    print(f"{'measurement (batch 256, ms)':<{width}}  {'base':>8}  {'resmem':>8}  {'ratio':>6}  target  met")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['base']:>8.1f}  {r['resmem']:>8.1f}  {r['ratio']:>6.3f}  <= {r['target']:<4}  "
              f"{'yes' if r['met'] else 'NO'}{'  (' + r['quality'] + ')' if 'quality' in r else ''}")
    print(f"ratio = median over {reps} interleaved back-to-back pairs of resmem/base time; "
          f"{time.perf_counter() - start:.0f} s; load at end {_load()}")
    return 0


def hf_resnet18_10():
    import bench_image

    bench_image.NUM_LABELS = NUM_LABELS  # CIFAR-10 head
    return hf_resnet18()


if __name__ == "__main__":
    sys.exit(main())
