"""Cost of the base-weight fingerprint relative to loading the model with `AutoModelForCausalLM.from_pretrained`.

Hardware: any CPU (the numbers in benchmarks/README.md come from 2 shared cores); --device cuda moves the
          loaded model to a GPU before fingerprinting (the v2 sample is then gathered on the GPU).
Launch:   PYTHONPATH=src python benchmarks/bench_fingerprint.py   (~2-4 minutes on 2 busy cores, ~5 GB RAM peak
          in bfloat16, ~2.2 GB of temporary disk, removed at the end)
Expected: target v2 fingerprint / from_pretrained <= 0.05 (measured 0.11-0.15 on 2 cores at load ~10: not met, see
          benchmarks/README.md); the legacy full hash (SHA-256 over every weight byte after a
          CPU copy, what every build, save, add and load paid before) is a large fraction of a load or more.

Setup: a random-init Llama of ~1.1B parameters built from a config (hidden 2048, intermediate 5632, 22 layers,
vocab 32000, as TinyLlama-1.1B), in bfloat16 (--dtype), saved with `save_pretrained` to a temporary folder, then
in the same process: `from_pretrained(folder)` timed (--repeats runs, the folder just written so the page cache is
warm, which makes the load FASTER and the ratio stricter), the v2 fingerprint timed (median of --repeats), the legacy
one timed once. Weights' values do not change either cost.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.utils import logging as hf_logging

from resmem.hub import FINGERPRINT_BLOCK, FINGERPRINT_WHOLE, _sample_rows, base_fingerprint, legacy_base_fingerprint


CPU_TIMES: dict[str, list[float]] = {}  # process CPU seconds per timed call, by label (less sensitive to other jobs)


def timed(fn, label: str | None = None):
    start, cpu = time.perf_counter(), time.process_time()
    value = fn()
    if label:
        CPU_TIMES.setdefault(label, []).append(time.process_time() - cpu)
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-legacy", action="store_true", help="do not time the full legacy hash")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 512), vocab_size=args.vocab,
        max_position_embeddings=2048,
    )
    folder = tempfile.mkdtemp(prefix="resmem-bench-fingerprint-")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            t_build, model = timed(lambda: AutoModelForCausalLM.from_config(config, dtype=dtype))
        n_params = sum(p.numel() for p in model.parameters())
        t_save, _ = timed(lambda: model.save_pretrained(folder))
        del model
        gc.collect()
        print(f"model: {n_params / 1e9:.3f}B parameters, {args.dtype}; built in {t_build:.1f} s, saved in {t_save:.1f} s")

        loads = []
        for _ in range(args.repeats):
            model = None
            gc.collect()
            seconds, model = timed(lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), "load")
            loads.append(seconds)
        model = model.to(args.device).eval()
        state = model.state_dict()
        n_bytes = sum(t.numel() * t.element_size() for t in state.values())
        n_sampled = sum(t.numel() if t.numel() <= FINGERPRINT_WHOLE else FINGERPRINT_WHOLE + FINGERPRINT_BLOCK
                        for t in state.values())
        print(f"state dict: {len(state)} tensors, {n_bytes / 2**30:.2f} GiB; v2 hashes {n_sampled:,} elements")

        _sample_rows.cache_clear()  # the first call computes the sampled rows; later calls reuse them
        first, fp = timed(lambda: base_fingerprint(model))
        fps = []
        for _ in range(args.repeats):
            seconds, fp = timed(lambda: base_fingerprint(model), "v2")
            fps.append(seconds)
        load, fp_s = statistics.median(loads), statistics.median(fps)
        # What a load really pays before the first token: from_pretrained memory-maps the file, so the weights
        # are read (or copied) when first touched. Touch each once (a sum per tensor) to show that cost.
        touch_s, _ = timed(lambda: [t.float().sum().item() for t in state.values()])
        print(f"from_pretrained: median {load:.3f} s of {[round(x, 3) for x in loads]}")
        print(f"v2 fingerprint:  median {fp_s:.4f} s of {[round(x, 4) for x in fps]}  ({fp[:19]}...)")
        print(f"v2 fingerprint, first call in the process (sampled rows not cached yet): {first:.4f} s")
        print(f"touching every weight once after the load (sum per tensor): {touch_s:.3f} s")
        print(f"RATIO v2 fingerprint / from_pretrained = {fp_s / load:.4f}  (target <= 0.05); first call: {first / load:.4f}")
        print(f"RATIO v2 fingerprint / (from_pretrained + touching the weights) = {fp_s / (load + touch_s):.4f}")
        cpu_load, cpu_fp = statistics.median(CPU_TIMES["load"]), statistics.median(CPU_TIMES["v2"])
        print(f"CPU time (process, medians): from_pretrained {cpu_load:.3f} s, v2 fingerprint {cpu_fp:.4f} s; "
              f"RATIO = {cpu_fp / cpu_load:.4f}")
        if not args.skip_legacy:
            legacy_s, legacy = timed(lambda: legacy_base_fingerprint(model), "legacy")
            print(f"legacy full hash: {legacy_s:.3f} s, CPU {CPU_TIMES['legacy'][0]:.3f} s  ({legacy[:16]}...)")
            print(f"RATIO legacy / from_pretrained = {legacy_s / load:.4f}; legacy / v2 = {legacy_s / fp_s:.0f}x")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
