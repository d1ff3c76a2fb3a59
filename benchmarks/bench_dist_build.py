"""Memory build throughput with 2 CPU ranks (gloo, torchrun) vs 1 process, same model and data.

Run:  PYTHONPATH=src python benchmarks/bench_dist_build.py --examples 4096
It launches `torchrun --standalone --nproc_per_node N` for N = 1 and 2 (each rank 1 thread, built
with `Accelerator(cpu=True)`), times `build_memory` inside the job (after start-up), checks that the
2-rank memory equals the 1-rank memory, and prints the throughput ratio (ideal: 2.0 on 2 free cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(out: str, examples: int, batch: int) -> None:
    import numpy as np
    import torch
    from accelerate import Accelerator
    from datasets import Dataset
    from safetensors.torch import save_file

    from resmem import ResMemWrapper
    from resmem.models import CifarResNetConfig
    from transformers import AutoModelForImageClassification

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    base = AutoModelForImageClassification.from_config(CifarResNetConfig(num_labels=100, hidden_sizes=[16, 32, 64], depths=[1, 1, 1])).eval()
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((examples, 3, 32, 32), dtype=np.float32)
    dataset = Dataset.from_dict({"pixel_values": pixels, "label": rng.integers(0, 100, examples)})
    model = ResMemWrapper.from_base(base, k=50)
    accelerator.wait_for_everyone()
    t0 = time.perf_counter()
    model.build_memory(dataset, batch_size=batch, accelerator=accelerator)
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - t0
    if accelerator.is_main_process:
        save_file({"keys": model.memory.keys, "logits": model.memory.base_logits}, out + ".safetensors")
        with open(out + ".json", "w") as f:
            json.dump({"seconds": seconds, "world": accelerator.num_processes}, f)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--worker", default=None)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.examples, args.batch)
    import torch
    from safetensors.torch import load_file

    tmp = tempfile.mkdtemp(prefix="resmem-dist-")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for n in (1, 2):
        out = os.path.join(tmp, f"w{n}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               os.path.abspath(__file__), "--examples", str(args.examples), "--batch", str(args.batch), "--worker", out]
        subprocess.run(cmd, env=env, check=True)
        with open(out + ".json") as f:
            results[n] = json.load(f)["seconds"]
        print(f"{n} rank(s): build_memory of {args.examples} images in {results[n]:.2f} s "
              f"({args.examples / results[n]:.0f} images/s)")
    a, b = load_file(os.path.join(tmp, "w1.safetensors")), load_file(os.path.join(tmp, "w2.safetensors"))
    same = all(torch.equal(a[k], b[k]) for k in a)
    print(f"2-rank memory identical to 1-rank memory: {same}")
    print(f"RATIO build throughput 2 ranks / 1 rank: {results[1] / results[2]:.2f}x (ideal 2.0 on 2 idle cores)")


if __name__ == "__main__":
    main()
