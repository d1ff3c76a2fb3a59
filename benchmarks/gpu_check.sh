#!/usr/bin/env bash
# GPU checks of the scale paths (index backends, on-disk memory, multi-process build): one script, about 8 minutes.
# Hardware: one or more NVIDIA GPUs (written for H100 / H200).
# Launch from the repository root:  bash benchmarks/gpu_check.sh   (results in ${OUT:-/tmp}/gpu_check.log)
# What it does:
#   1. installs what is missing (torch CUDA wheel, faiss-gpu instead of faiss-cpu, the package deps);
#      skipped when already importable, so it also runs on a machine without network access;
#   2. runs the tests marked `gpu` (faiss-gpu sharded index and torch exact search vs the CPU result);
#   3. GPU benchmarks: exact and IVF search at 1M entries on cuda (faiss-gpu across all GPUs when
#      installed, else torch matmul top-k), with ratios against the raw index search;
#   4. with 2+ GPUs: multi-GPU build + evaluation through `accelerate launch --multi_gpu` checked
#      against a single-process build (the same script the 2-CPU-rank test uses).
set -uo pipefail
OUT=${OUT:-/tmp}
LOG="$OUT/gpu_check.log"
exec > >(tee "$LOG") 2>&1
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
step() { echo; echo "=== $(date -u +%T) $*"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total --format=csv || { echo "no GPU visible: stop"; exit 1; }
PY=${PYTHON:-python3}
if ! $PY -c "import torch, transformers, datasets, accelerate, safetensors" 2>/dev/null; then
  step "installing torch + deps (CUDA wheel)"
  timeout 240 $PY -m pip install -q torch "transformers>=5,<6" "datasets>=4" "accelerate>=1" safetensors pytest scikit-learn pillow || echo "pip install failed"
fi
if ! $PY -c "import faiss, sys; sys.exit(0 if faiss.get_num_gpus() > 0 else 1)" 2>/dev/null; then
  step "installing faiss-gpu (replaces faiss-cpu: both ship the same faiss package)"
  timeout 180 $PY -m pip uninstall -y -q faiss-cpu 2>/dev/null
  timeout 180 $PY -m pip install -q faiss-gpu || echo "faiss-gpu not installable: GPU exact search falls back to torch"
fi
$PY - <<'PY'
import torch, faiss
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "gpus", torch.cuda.device_count())
print("faiss", faiss.__version__, "faiss gpus", faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)
PY

step "gpu-marked tests"
timeout 180 $PY -m pytest -q -m gpu tests/test_index.py -p no:cacheprovider

step "benchmark: exact vs IVF on cuda, 1M entries"
timeout 180 $PY benchmarks/bench_index.py --entries 1000000 --queries 2000 --device cuda --threads 8

NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then
  step "multi-GPU build + evaluation via accelerate launch ($NGPU GPUs) vs single process"
  timeout 150 $PY - <<'PY'
import os, subprocess, tempfile
import torch
from safetensors.torch import load_file
env = {**os.environ, "RESMEM_DIST_GPU": "1"}
runs = {}
for n in (1, 2):
    out = tempfile.mkdtemp()
    cmd = ["accelerate", "launch", "--num_processes", str(n)] + (["--multi_gpu"] if n > 1 else []) + ["tests/dist_script.py", out, "37"]
    subprocess.run(cmd, env=env, check=True)
    runs[n] = load_file(os.path.join(out, "result.safetensors"))
a, b = runs[1], runs[2]
print("ids/labels identical:", torch.equal(a["example_ids"], b["example_ids"]) and torch.equal(a["labels"], b["labels"]))
print("keys max abs diff 1 vs 2 GPUs:", (a["keys"] - b["keys"]).abs().max().item())
print("scores max abs diff:", (a["scores"] - b["scores"]).abs().max().item())
print("ResMem predictions identical:", torch.equal(a["pred_resmem"], b["pred_resmem"]))
PY
else
  step "one GPU: multi-GPU accelerate check skipped"
fi
step "done"
