"""Cost of `output_neighbors=True` (explanations) against the plain ResMem forward, ratios from one run.

The baseline is the same model's forward with `output_neighbors=False` (the default, whose code path is the
unchanged pre-explanations one), timed interleaved with the explaining forward; the ratio is on / off of the
median of `--repeats` timings each. Memories are random (keys, logits / sparse residuals) of `--entries`
entries: search and gather cost depend on sizes, not on where the entries come from.

1. image classifier: transformers ResNet (hidden sizes 64, 128; 128-d keys), 32x32 inputs, batch 256, 10 classes;
2. causal LM: GPT-2 (4 layers, 256 wide, vocabulary 8,192), batch 4 x 128 positions, top-m 128 residuals.

Run:  PYTHONPATH=src python benchmarks/bench_explain.py [--entries 50000] [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageClassification, GPT2Config, ResNetConfig

from resmem import ResMemWrapper
from resmem.hub import base_fingerprint


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median seconds of `fn(False)` and `fn(True)`, interleaved so that load changes hit both alike."""
    off, on = [], []
    fn(False), fn(True)  # warm-up (index build, allocator)
    for _ in range(repeats):
        for flag, times in ((False, off), (True, on)):
            start = time.perf_counter()
            fn(flag)
            times.append(time.perf_counter() - start)
    return statistics.median(off), statistics.median(on)


def image_case(entries: int, repeats: int, k: int) -> tuple[float, float]:
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[64, 128], depths=[1, 1], num_labels=10)
    base = AutoModelForImageClassification.from_config(config).eval()
    model = ResMemWrapper.from_base(base, k=k, sigma=1.0, index="exact")
    g = torch.Generator().manual_seed(1)
    model.memory.set_entries(
        torch.randn(entries, 128, generator=g), torch.randn(entries, 10, generator=g),
        torch.randint(0, 10, (entries,), generator=g), torch.arange(entries),
        fingerprint=base_fingerprint(base), layer=model.config.layer,
    )
    model.config.memory_size = entries
    x = torch.randn(256, 3, 32, 32, generator=g)

    def run(flag):
        with torch.inference_mode():
            model(pixel_values=x, output_neighbors=flag)

    return timed(run, repeats)


def lm_case(entries: int, repeats: int, k: int, top_m: int = 128) -> tuple[float, float]:
    torch.manual_seed(0)
    vocab = 8192
    config = GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=vocab, n_positions=256, bos_token_id=0, eos_token_id=1)
    base = AutoModelForCausalLM.from_config(config).eval()
    model = ResMemWrapper.from_base(base, k=k, sigma=1.0, index="exact")
    g = torch.Generator().manual_seed(1)
    indices = torch.rand(entries, vocab, generator=g).topk(top_m, dim=-1).indices.int()  # distinct per row
    model.memory.set_token_entries(
        torch.randn(entries, 256, generator=g), (torch.randn(entries, top_m, generator=g) * 0.1).half(), indices,
        torch.randint(0, vocab, (entries,), generator=g), torch.arange(entries) // 100, torch.arange(entries) % 100,
        fingerprint=base_fingerprint(base), layer=model.config.layer, temperature=1.0, vocab_size=vocab, top_m=top_m,
    )
    model.config.memory_size = entries
    ids = torch.randint(0, vocab, (4, 128), generator=g)

    def run(flag):
        with torch.inference_mode():
            model(ids, output_neighbors=flag)

    return timed(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name, case in (("image classifier, batch 256", image_case), ("causal LM, 4 x 128 positions", lm_case)):
        off, on = case(args.entries, args.repeats, args.k)
        print(f"{name}, {args.entries} entries, k={args.k}: off {off * 1e3:.1f} ms, on {on * 1e3:.1f} ms, on/off {on / off:.3f}x")


if __name__ == "__main__":
    main()
