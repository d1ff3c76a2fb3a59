"""Causal-LM ResMem speed against the base model, ratios from one run.

1. Memory build throughput (text tokens/s) vs the base model's forward over the same windows
   (target >= 0.8x), and vs a plain non-overlapping forward over the same text.
2. Greedy generation per-token latency with a 200,000-entry memory vs the base model's `generate`
   (target <= 1.3x), for the exact index and an IVF index.

The 200,000-entry memory is the real memory built in step 1, tiled to size with small Gaussian
noise on the keys (search cost depends on the number and width of keys, not on their origin).

    PYTHONPATH=src python benchmarks/bench_causal_lm.py --model outputs/smollm2-135m \
        --text ../shared/data/text/wikitext2_valid.txt.gz --build-tokens 3000
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import resmem
from resmem.data_lm import token_sequences, window_batches


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base causal LM folder (e.g. SmolLM2-135M saved locally)")
    p.add_argument("--text", required=True, help="a .txt or .txt.gz file")
    p.add_argument("--build-tokens", type=int, default=3000)
    p.add_argument("--memory-size", type=int, default=200_000)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ivf", default="IVF1024,Flat|nprobe=16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-build-timing", action="store_true", help="build the memory once, time only generation")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    opener = gzip.open if args.text.endswith(".gz") else open
    with opener(args.text, "rt") as f:
        text = f.read(args.build_tokens * 8)
    ids = tok(text)["input_ids"][: args.build_tokens]
    model = resmem.ResMemWrapper.from_base(base, k=50, sigma=1.0)
    cfg = model.config
    result = {"model": args.model, "threads": args.threads, "build_tokens": len(ids), "window": cfg.window, "stride": cfg.stride}

    # ---- 1. build throughput
    def base_windows():
        batches = window_batches(token_sequences([ids]), cfg.window, cfg.stride, args.batch_size, tok.pad_token_id)
        with torch.inference_mode():
            for b in batches:
                base(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    def base_plain():
        with torch.inference_mode():
            for s in range(0, len(ids), cfg.window * args.batch_size):
                chunk = torch.tensor(ids[s : s + cfg.window * args.batch_size])
                n = chunk.numel() // cfg.window * cfg.window
                if n:
                    base(input_ids=chunk[:n].view(-1, cfg.window), use_cache=False)
                if chunk.numel() > n:
                    base(input_ids=chunk[n:][None], use_cache=False)

    def build():
        model.build_memory([ids], batch_size=args.batch_size, pad_token_id=tok.pad_token_id)

    if args.skip_build_timing:
        build()
        args_build_repeats = 0
    else:
        base_windows()  # warm-up
        args_build_repeats = args.repeats
    t_build, t_windows, t_plain = [], [], []
    for _ in range(args_build_repeats):  # interleaved: the machine is shared
        t_windows.append(timed(base_windows, 1))
        t_build.append(timed(build, 1))
        t_plain.append(timed(base_plain, 1))
    n = len(ids)
    if args_build_repeats:
        tb, tw, tp = (statistics.median(x) for x in (t_build, t_windows, t_plain))
        result.update(
            build_tokens_per_s=n / tb,
            base_windows_tokens_per_s=n / tw,
            base_plain_tokens_per_s=n / tp,
            build_ratio_vs_same_windows=tw / tb,
            build_ratio_vs_plain_forward=tp / tb,
        )
    result.update(entries=len(model.memory), bytes_per_entry=model.memory.bytes_per_entry())
    print(json.dumps(result, indent=1), flush=True)

    # ---- 2. generation latency with a large memory
    mem = model.memory
    reps = -(-args.memory_size // len(mem))
    g = torch.Generator().manual_seed(0)
    keys = mem.keys.repeat(reps, 1)[: args.memory_size]
    keys = keys + 0.05 * mem.keys.std() * torch.randn(keys.shape, generator=g)
    tiled = [t.repeat(reps, *([1] * (t.dim() - 1)))[: args.memory_size] for t in mem.token_tensors()[1:]]
    mem.set_token_entries(keys, *tiled, **mem.token_metadata())
    result["memory_size"] = len(mem)
    result["memory_mb"] = mem.nbytes() / 2**20
    prompt = torch.tensor([ids[: args.prompt_tokens]])
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
              do_sample=False, pad_token_id=tok.pad_token_id)

    def gen(m):
        return lambda: m.generate(prompt, **kw)

    for name, spec in (("exact", "auto"), ("ivf", args.ivf)):
        cfg.index = spec
        t = time.perf_counter()
        mem.index(spec)  # build the index outside the timing
        result[f"index_build_s_{name}"] = time.perf_counter() - t
        gen(model)()  # warm-up
        tb_, tr_ = [], []
        for _ in range(args.repeats):
            tb_.append(timed(gen(base), 1))
            tr_.append(timed(gen(model), 1))
        b, r = statistics.median(tb_), statistics.median(tr_)
        result[f"gen_ms_per_token_base_{name}"] = 1000 * b / args.new_tokens
        result[f"gen_ms_per_token_resmem_{name}"] = 1000 * r / args.new_tokens
        result[f"gen_ratio_{name}"] = r / b
        print(json.dumps({k: v for k, v in result.items() if name in k}, indent=1), flush=True)
    # agreement of the IVF and exact neighbours on real queries
    q = mem.keys[:: max(1, len(mem) // 500)][:500] + 0.05 * mem.keys.std() * torch.randn(500, mem.keys.shape[1], generator=g)
    _, exact = mem.search(q, 50, "auto")
    _, approx = mem.search(q, 50, args.ivf)
    result["ivf_recall_at_50"] = float((approx.unsqueeze(2) == exact.unsqueeze(1)).any(2).float().mean())
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
