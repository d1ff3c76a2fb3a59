"""ImageNet ResNet-18 + ResMem: the paper's ImageNet recipe (Yang et al., Table 1).

Loads a pretrained ResNet-18 from the Hub (`microsoft/resnet-18`, through
`AutoModelForImageClassification` and its `AutoImageProcessor`), wraps it with ResMem (k=80,
sigma=1, T=1), builds the memory on the ImageNet training images with an `accelerate.Accelerator`
(each process embeds a contiguous shard; `accelerate launch` spreads it over GPUs) and reports
DeepNet vs ResMem accuracy, TPR, FPR and Gain on the validation split.

    accelerate launch recipes/imagenet_resnet18/run.py --output-dir outputs/imagenet_resnet18
    python recipes/imagenet_resnet18/run.py --data-dir /data/imagenet   # image folder with train/ and val/
    python recipes/imagenet_resnet18/run.py --smoke                      # seconds, tiny local model + images, no Hub

Data: `load_dataset("imagenet-1k")` (gated on the Hub: accept its terms and log in first), or an
image folder `<data-dir>/{train,val}/<wnid>/*.JPEG` read by `load_dataset("imagefolder")`;
folders named by WordNet id sort into the standard class order the Hub model uses.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

PAPER = {"dataset": "ImageNet", "model": "ResNet-18", "base_accuracy": 0.6686, "resmem_accuracy": 0.6744}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="microsoft/resnet-18", help="Hub id or folder of an image classifier")
    p.add_argument("--dataset", default="imagenet-1k", help="Hub dataset id; ignored with --data-dir")
    p.add_argument("--data-dir", help="image folder with train/ and val/ (or validation/) class folders")
    p.add_argument("--train-split", default="train")
    p.add_argument("--eval-split", default="validation")
    p.add_argument("--label-column", default="label")
    p.add_argument("--image-column", help="default: the dataset's Image column")
    p.add_argument("--max-train-examples", type=int, help="memory from a random subset of N training images")
    p.add_argument("--max-eval-examples", type=int, help="evaluate on the first N validation images")
    p.add_argument("--k", type=int, default=80)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="outputs/imagenet_resnet18")
    p.add_argument("--save-model", action="store_true", help="also save the ResMem model (weights + memory)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even where a GPU is present (also what makes `torchrun` / `accelerate launch` use several CPU processes)")
    p.add_argument("--smoke", action="store_true", help="tiny ResNet from a config + tiny image folder, no Hub")
    return p.parse_args(argv)


def make_smoke_assets(root: str, classes: int = 3, train_per_class: int = 10, eval_per_class: int = 4, seed: int = 0):
    """A tiny image folder `root/data/{train,validation}/class_i/*.png` and a tiny ResNet + processor in `root/model`."""
    from PIL import Image
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("validation", eval_per_class)):
        for c in range(classes):
            folder = os.path.join(root, "data", split, f"class_{c}")
            os.makedirs(folder, exist_ok=True)
            colour = np.zeros(3)
            colour[c % 3] = 160
            for i in range(n):
                pixels = np.clip(colour + 40 + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i:04d}.png"))
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=classes,
                          id2label={i: f"class_{i}" for i in range(classes)},
                          label2id={f"class_{i}": i for i in range(classes)})
    import torch

    torch.manual_seed(seed)  # every process of a multi-process smoke run builds the same tiny model
    ResNetForImageClassification(config).save_pretrained(os.path.join(root, "model"))
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(os.path.join(root, "model"))
    return os.path.join(root, "data"), os.path.join(root, "model")


class RGBProcessor:
    """The model's image processor, after converting every image to RGB (ImageNet holds some grayscale and CMYK JPEGs)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, images, **kwargs):
        return self.processor(images=[im.convert("RGB") for im in images], **kwargs)


def main(argv=None) -> dict:
    args = parse_args(argv)
    tmp = None
    if args.smoke:
        tmp = tempfile.TemporaryDirectory(prefix="resmem-imagenet-smoke-")
        args.data_dir, args.model = make_smoke_assets(tmp.name)
        args.batch_size = 16
        if args.output_dir == "outputs/imagenet_resnet18":
            args.output_dir = os.path.join(tmp.name, "out")
    try:
        return run(args)
    finally:
        if tmp is not None:
            tmp.cleanup()


def run(args) -> dict:
    from accelerate import Accelerator
    from datasets import load_dataset
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from resmem import ResMemWrapper
    from resmem.evaluation import decompose, predict, results_markdown

    started = time.perf_counter()
    accelerator = Accelerator(cpu=args.cpu)
    log = accelerator.print
    if args.data_dir:
        ds = load_dataset("imagefolder", data_dir=args.data_dir)
    else:
        ds = load_dataset(args.dataset)
    train, evaluation = ds[args.train_split], ds[args.eval_split]
    if args.max_train_examples and args.max_train_examples < len(train):
        train = train.shuffle(seed=args.seed).select(range(args.max_train_examples))
    if args.max_eval_examples and args.max_eval_examples < len(evaluation):
        evaluation = evaluation.select(range(args.max_eval_examples))
    image_column = args.image_column or next(
        (n for n, f in train.features.items() if type(f).__name__ == "Image"), "image"
    )

    processor = RGBProcessor(AutoImageProcessor.from_pretrained(args.model))
    base = AutoModelForImageClassification.from_pretrained(args.model).to(accelerator.device).eval()
    log(f"Model: {args.model} ({sum(p.numel() for p in base.parameters()):,} parameters, {base.config.num_labels} classes) "
        f"on {accelerator.num_processes} process(es)")
    log(f"Data: {args.data_dir or args.dataset}: memory from {len(train)} {args.train_split!r} images, "
        f"evaluation on {len(evaluation)} {args.eval_split!r} images")

    model = ResMemWrapper.from_base(base, k=args.k, sigma=args.sigma, temperature=args.temperature)
    io = dict(label_column=args.label_column, image_column=image_column, image_processor=processor)
    t = time.perf_counter()
    model.build_memory(train, batch_size=args.batch_size, accelerator=accelerator, **io)
    build_seconds = time.perf_counter() - t
    if model.config.k > len(model.memory):
        log(f"  k={model.config.k} exceeds the memory's {len(model.memory)} entries; using k={len(model.memory)}")
        model.config.k = len(model.memory)
    log(f"ResMem: memory of {len(model.memory)} entries, keys from {model.config.layer!r} ({model.memory.dim} dims), "
        f"built in {build_seconds:.1f} s")
    t = time.perf_counter()
    preds = predict(model, evaluation, args.batch_size, progress=False, accelerator=accelerator, **io)
    metrics = decompose(preds.base, preds.resmem, preds.labels)
    eval_seconds = time.perf_counter() - t

    title = (f"{args.data_dir or args.dataset} with {args.model}: ResMem k={model.config.k}, "
             f"sigma={model.config.sigma}, T={model.config.residual_temperature}, memory {len(model.memory)} images")
    rows = [(f"{args.eval_split} ({len(evaluation)})", metrics)]
    markdown = results_markdown(title, rows, PAPER)
    results = {
        "args": vars(args), "layer": model.config.layer,
        "hyperparameters": {"k": model.config.k, "sigma": model.config.sigma, "temperature": model.config.residual_temperature}, "memory_entries": len(model.memory), args.eval_split: metrics,
        "paper": PAPER, "num_processes": accelerator.num_processes,
        "timings_s": {"build_memory": round(build_seconds, 2), "evaluate": round(eval_seconds, 2),
                      "total": round(time.perf_counter() - started, 2)},
    }
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        log("")
        log(markdown)
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2, default=str)
        with open(os.path.join(args.output_dir, "results.md"), "w") as f:
            f.write(markdown)
        log(f"Wrote {os.path.join(args.output_dir, 'results.json')} and results.md ({results['timings_s']['total']:.1f} s)")
    if args.save_model:
        model.save_pretrained(os.path.join(args.output_dir, "resmem_model"), is_main_process=accelerator.is_main_process)
    return results


if __name__ == "__main__":
    main()
