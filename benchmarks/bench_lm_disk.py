"""A causal-LM memory larger than the RAM its build and its forward use: on-disk shards from a streaming dataset.

A tiny random Llama (from a config, so the forward is fast; hidden 256, vocabulary 2048) reads real
text (/work/shared/data/text/*.txt.gz through `datasets.load_dataset("text", streaming=True)`, as
byte ids in documents of ~2 KB) and `ResMemForCausalLM.build_memory_on_disk` writes every token
entry (key 256 x f32, top-512 residual values f16 + indices i32, label, example id, position: 4,120
bytes) to safetensors shards of 32 MiB as it goes. The build then trains an IVF-SQ4 index (written beside the shards,
memory-mapped) and saves the model; a second process loads it with `from_pretrained` and runs one
forward with the approximate index (exact re-ranking from the memory-mapped keys).

Each step runs in its own child process (timeout, killed with its process group); the peak RSS of
each is its own `VmHWM` (resident set high-water mark, file-backed mapped pages included), checked
against `getrusage(RUSAGE_CHILDREN).ru_maxrss`. Printed: the memory files' size, bytes per entry,
both peaks and the ratios files / peak RSS (target >= 3), and the in-RAM baseline: what
`build_memory` would hold (entries x bytes per entry) against the same peaks.

Run:  PYTHONPATH=src python benchmarks/bench_lm_disk.py --tokens 700000 --folder /tmp/resmem-lm-disk
The folder is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

TEXT_FILES = sorted(glob.glob("/work/shared/data/text/*.txt.gz"))


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def documents(files: str, target_tokens: int, doc_bytes: int):
    """Byte-id documents of ~`doc_bytes` from the streamed text files (cycled), `target_tokens` in all.

    `files` is one comma-separated string: `IterableDataset.from_generator` would split a list
    argument into one generator call per file (each producing `target_tokens`).
    """
    import datasets

    files = files.split(",")
    total = 0
    while True:
        stream = datasets.load_dataset("text", data_files=files, split="train", streaming=True)
        buf, size = [], 0
        for row in stream:
            buf.append(row["text"])
            size += len(row["text"]) + 1
            if size >= doc_bytes:
                ids = list("\n".join(buf).encode()[:doc_bytes])
                buf, size = [], 0
                yield {"input_ids": ids}
                total += len(ids)
                if total >= target_tokens:
                    return


def tiny_llama(args):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    )
    return tf.AutoModelForCausalLM.from_config(config).eval()


def child_build(args) -> dict:
    import datasets
    import torch

    import resmem
    from resmem import ResMemWrapper

    torch.set_num_threads(args.threads)
    model = ResMemWrapper.from_base(tiny_llama(args), k=args.k, sigma=1.0, temperature=1.0, window=256, stride=192)
    data = datasets.IterableDataset.from_generator(
        documents, gen_kwargs={"files": ",".join(TEXT_FILES), "target_tokens": args.tokens, "doc_bytes": args.doc_bytes}
    )
    build_dir = os.path.join(args.folder, "build")
    t0 = time.perf_counter()
    model.build_memory_on_disk(data, build_dir, batch_size=16, residual_top_m=args.top_m, pad_token_id=0,
                              shard_bytes=args.shard_mb * 2**20)
    build_s = time.perf_counter() - t0
    hwm_memory = vm_hwm_bytes()
    t0 = time.perf_counter()
    model.memory.build_index(args.index)
    index_s = time.perf_counter() - t0
    model.config.index = args.index
    model.save_pretrained(os.path.join(args.folder, "model"))  # hard links to the shards and the index
    shutil.rmtree(build_dir)
    assert isinstance(model.memory, resmem.memory_disk.OnDiskMemory)
    return {
        "entries": len(model.memory), "bytes_per_entry_fields": model.memory.bytes_per_entry(),
        "shards": len(model.memory.shards), "build_s": build_s, "index_s": index_s,
        "hwm_after_memory": hwm_memory, "hwm": vm_hwm_bytes(),
    }


def child_forward(args) -> dict:
    import torch

    import resmem  # noqa: F401  registers the model type
    from resmem import ResMemWrapper

    torch.set_num_threads(args.threads)
    model = ResMemWrapper.from_pretrained(os.path.join(args.folder, "model"))
    model.config.index = args.index
    model.config.index_params = {"nprobe": args.nprobe, "rerank_factor": args.rerank}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(32, 127, (args.forward_batch, args.forward_len), generator=g)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids)
    forward_s = time.perf_counter() - t0
    assert torch.isfinite(out.scores).all()
    return {"forward_s": forward_s, "queries": ids.numel(), "hwm": vm_hwm_bytes(),
            "memory_class": type(model.memory).__name__, "index_mmapped": bool(getattr(model.memory._index, "mmapped", False))}


def run_child(role: str, argv: list[str], timeout: int) -> dict:
    """Run this script as `--role role` in a new process group; kill the group on timeout."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")  # torch and faiss load separate OpenMP runtimes whose idle threads spin-wait
    proc = subprocess.Popen(
        [sys.executable, __file__, "--role", role, *argv], stdout=subprocess.PIPE, env=env, start_new_session=True, text=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise SystemExit(f"{role} step exceeded {timeout} s")
    if proc.returncode:
        raise SystemExit(f"{role} step failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def files_bytes(folder: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "resmem_*")))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", default="parent", choices=["parent", "build", "forward"])
    parser.add_argument("--tokens", type=int, default=700_000)
    parser.add_argument("--doc-bytes", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--top-m", type=int, default=512)
    parser.add_argument("--shard-mb", type=int, default=32)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--index", default="IVF256,SQ4")
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--rerank", type=int, default=8)
    parser.add_argument("--forward-batch", type=int, default=1)
    parser.add_argument("--forward-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--folder", default="/tmp/resmem-lm-disk")
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if args.role != "parent":
        result = child_build(args) if args.role == "build" else child_forward(args)
        print(json.dumps(result))
        return
    argv = [a for a in sys.argv[1:]]
    shutil.rmtree(args.folder, ignore_errors=True)
    os.makedirs(args.folder)
    try:
        build = run_child("build", argv, args.timeout)
        children_after_build = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        forward = run_child("forward", argv, args.timeout)
        children_max = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        size = files_bytes(os.path.join(args.folder, "model"))
    finally:
        if not args.keep:
            shutil.rmtree(args.folder, ignore_errors=True)
    gib = 2**30
    n = build["entries"]
    in_ram = n * build["bytes_per_entry_fields"]
    print(f"text: {len(TEXT_FILES)} files streamed as byte ids; tiny Llama hidden {args.hidden}, vocab {args.vocab}; "
          f"top_m {args.top_m}; index {args.index} nprobe {args.nprobe} rerank x{args.rerank}; threads {args.threads}")
    print(f"entries {n:,} in {build['shards']} shards; build {build['build_s']:.0f} s "
          f"({n / build['build_s']:,.0f} entries/s), index {build['index_s']:.0f} s")
    print(f"memory files (shards + manifest + index): {size / gib:.2f} GiB = {size / n:.0f} B/entry "
          f"(fields {build['bytes_per_entry_fields']} B/entry)")
    print(f"peak RSS build (VmHWM): {build['hwm'] / gib:.2f} GiB (after the memory, before the index: "
          f"{build['hwm_after_memory'] / gib:.2f} GiB); getrusage(RUSAGE_CHILDREN) after build: {children_after_build / gib:.2f} GiB")
    print(f"peak RSS forward (VmHWM): {forward['hwm'] / gib:.2f} GiB; {forward['queries']} queries in "
          f"{forward['forward_s'] * 1e3:.0f} ms; memory {forward['memory_class']}, index memory-mapped: {forward['index_mmapped']}; "
          f"getrusage(RUSAGE_CHILDREN) max: {children_max / gib:.2f} GiB")
    print(f"ratio files / peak RSS: build {size / build['hwm']:.2f}x, forward {size / forward['hwm']:.2f}x (target >= 3)")
    print(f"baseline in-RAM memory (entries x bytes/entry, what build_memory holds): {in_ram / gib:.2f} GiB = "
          f"{in_ram / build['hwm']:.2f}x the on-disk build's peak RSS")


if __name__ == "__main__":
    main()
