"""Digest of the default (paper) path, to compare two versions of the code bit for bit.

Builds a memory (CIFAR-ResNet-style tiny CNN, 200 random images), runs a forward on 50 queries and a tune grid,
saves the model, and prints a short SHA-256 of each of: memory keys, base logits, labels, example ids, the
forward's scores, logits and residual, and the tune's (T, S, K, V) predictions; plus the memory file's metadata
keys. Run it against each version and compare the lines:

    PYTHONPATH=/path/to/old/src python benchmarks/default_path_digest.py
    PYTHONPATH=src python benchmarks/default_path_digest.py
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile

import numpy as np
import torch
from safetensors import safe_open

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from conftest import dataset_arrays, make_base, make_pixel_dataset  # noqa: E402

import resmem  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    model = resmem.ResMemWrapper.from_base(make_base("cifar_resnet", seed=0), k=7, sigma=0.8, temperature=1.2)
    model.build_memory(make_pixel_dataset(200, seed=0), batch_size=64, progress=False)
    val = make_pixel_dataset(50, seed=5)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(dataset_arrays(val)[0]))
    result = model.tune(val, k=[3, 7, 20], sigma=[0.3, 1.0], temperature=[1.0, 1.5], set_best=False, progress=False)
    m = model.memory
    tensors = {"keys": m.keys, "base_logits": m.base_logits, "labels": m.labels, "example_ids": m.example_ids,
               "scores": out.scores, "logits": out.logits, "residual": out.residual, "tune": result.predictions}
    for name, t in tensors.items():
        print(f"{name:12s} {hashlib.sha256(np.ascontiguousarray(t.numpy()).tobytes()).hexdigest()[:16]}")
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        with safe_open(os.path.join(folder, "resmem_memory.safetensors"), "pt") as f:
            print("metadata    ", sorted(f.metadata()))
    print("module      ", resmem.__file__)


if __name__ == "__main__":
    main()
