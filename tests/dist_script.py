"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU ranks).

Builds a memory with `Accelerator(cpu=True)` on an odd-sized dataset (unequal shards), evaluates with
`resmem.evaluation.predict`, and lets the main process alone write the results and a saved model.
"""

import os
import sys

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_base, make_pixel_dataset, random_pixels  # noqa: E402

from resmem import ResMemWrapper  # noqa: E402
from resmem.evaluation import predict  # noqa: E402


def main(out_dir: str, n: int) -> None:
    torch.set_num_threads(1)
    # RESMEM_DIST_GPU=1 (benchmarks/gpu_check.sh): one GPU per rank under `accelerate launch --multi_gpu`.
    on_gpu = os.environ.get("RESMEM_DIST_GPU") == "1"
    accelerator = Accelerator(cpu=not on_gpu)
    model = ResMemWrapper.from_base(make_base("resnet", seed=3), k=5, sigma=0.7, temperature=1.3).to(accelerator.device)
    model.build_memory(make_pixel_dataset(n, seed=3), batch_size=8, accelerator=accelerator)
    queries = torch.from_numpy(random_pixels(9, seed=777)).to(accelerator.device)
    with torch.no_grad():
        scores = model(pixel_values=queries).scores
    preds = predict(model, make_pixel_dataset(n, seed=4), batch_size=8, accelerator=accelerator)
    accelerator.wait_for_everyone()
    model.save_pretrained(os.path.join(out_dir, "saved"), is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        m = model.memory
        save_file(
            {k: v.cpu().contiguous() for k, v in {
                "keys": m.keys, "base_logits": m.base_logits, "labels": m.labels, "example_ids": m.example_ids,
                "scores": scores, "pred_base": preds.base, "pred_resmem": preds.resmem, "pred_labels": preds.labels,
                "world": torch.tensor([accelerator.num_processes]),
            }.items()},
            os.path.join(out_dir, "result.safetensors"),
        )
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
