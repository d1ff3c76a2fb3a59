"""CIFAR-100 CIFAR-ResNet8 + ResMem: the paper's CIFAR recipe (Yang et al., Table 1 and sec. 4).

Trains `resmem.models.CifarResNetForImageClassification` with hidden sizes (16, 32, 64) and one
basic block per stage (CIFAR-ResNet8) on the paper's schedule (SGD, global batch 128, 256 epochs,
peak lr 0.4, momentum 0.9, linear warm-up over 15 epochs, lr x0.1 at epochs 96 / 192 / 224) under
Accelerate, then wraps it with ResMem (k=53, sigma=0.7, T=1.4), builds the memory on the training
images and prints / saves DeepNet vs ResMem accuracy with the paper's TPR / FPR / Gain.

    accelerate launch recipes/cifar100_resnet8/train.py --output-dir outputs/cifar100_resnet8
    python recipes/cifar100_resnet8/train.py --data-dir /path/to/cifar10 --output-dir outputs/cifar10_resnet8
    python recipes/cifar100_resnet8/train.py --smoke     # seconds, tiny synthetic image folder, no network

Data: `load_dataset("cifar100")` (label column `fine_label`) by default, or any image folder laid
out `<data-dir>/{train,test}/<class>/*.png|jpg` (`--data-dir`, read by `load_dataset("imagefolder")`).
`--tune-on-validation FRACTION` holds out that share of the training images (stratified), builds
the memory on the rest and picks k, sigma, T there; the test split is never used for any choice.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import numpy as np
import torch

PAPER = {"dataset": "CIFAR-100", "model": "CIFAR-ResNet8", "base_accuracy": 0.5646, "resmem_accuracy": 0.5966}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="cifar100", help="Hub dataset id (default cifar100); ignored with --data-dir")
    data.add_argument("--data-dir", help="image folder with train/ and test/ subfolders of class folders")
    data.add_argument("--label-column", help="default: fine_label for cifar100, label otherwise")
    data.add_argument("--image-column", help="default: the dataset's Image column")
    data.add_argument("--train-split", default="train")
    data.add_argument("--test-split", default="test")
    data.add_argument("--max-train-examples", type=int,
                      help="use a random class-balanced subset of N training images (after any validation carve)")
    data.add_argument("--train-fraction", type=float, default=1.0,
                      help="use a random class-balanced share of the training images (after any validation carve); "
                           "the training-set-size study of the paper's sec. 4.3")
    model = p.add_argument_group("model and schedule (paper defaults)")
    model.add_argument("--hidden-sizes", type=int, nargs="+", default=[16, 32, 64])
    model.add_argument("--depths", type=int, nargs="+", default=[1, 1, 1])
    model.add_argument("--epochs", type=int, default=256)
    model.add_argument("--batch-size", type=int, default=128, help="global batch (split over processes)")
    model.add_argument("--lr", type=float, default=0.4, help="peak learning rate")
    model.add_argument("--momentum", type=float, default=0.9)
    model.add_argument("--weight-decay", type=float, default=5e-4)
    model.add_argument("--warmup-epochs", type=float, default=15)
    model.add_argument("--milestones", type=int, nargs="*", default=[96, 192, 224], help="epochs where lr is multiplied by --lr-decay")
    model.add_argument("--lr-decay", type=float, default=0.1)
    model.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--checkpoint-epochs", type=int, nargs="*", default=[],
                       help="also save the base model after these epochs to OUTPUT_DIR/checkpoint_epoch{E} "
                            "(an earlier checkpoint gives residuals on examples it has fitted less: variants.py)")
    rm = p.add_argument_group("ResMem")
    rm.add_argument("--k", type=int, default=53)
    rm.add_argument("--sigma", type=float, default=0.7)
    rm.add_argument("--temperature", type=float, default=1.4)
    rm.add_argument("--tune-on-validation", type=float, metavar="FRACTION",
                    help="carve this share of train as validation; pick k, sigma, T there")
    rm.add_argument("--k-grid", type=int, nargs="+", default=[10, 20, 53, 100])
    rm.add_argument("--sigma-grid", type=float, nargs="+", default=[0.3, 0.5, 0.7, 1.0, 1.5])
    rm.add_argument("--temperature-grid", type=float, nargs="+", default=[0.7, 1.0, 1.4, 2.0])
    out = p.add_argument_group("output")
    out.add_argument("--output-dir", default="outputs/cifar100_resnet8")
    out.add_argument("--eval-batch-size", type=int, default=512)
    out.add_argument("--save-model", action="store_true", help="also save the ResMem model (weights + memory)")
    out.add_argument("--cpu", action="store_true", help="run on CPU even where a GPU is present (also what makes `torchrun` / `accelerate launch` use several CPU processes)")
    out.add_argument("--smoke", action="store_true", help="tiny synthetic image folder, 1 epoch: checks the pipeline in seconds")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data
def make_smoke_folder(root: str, classes: int = 3, train_per_class: int = 12, test_per_class: int = 4, seed: int = 0) -> str:
    """Write a tiny image folder `root/{train,test}/class_i/*.png` of noisy 32x32 images whose colour depends on the class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class_{c}")
            os.makedirs(folder, exist_ok=True)
            colour = np.zeros(3)
            colour[c % 3] = 160
            for i in range(n):
                pixels = np.clip(colour + 40 + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i:04d}.png"))
    return root


def load_splits(args):
    """(train, test, label_column, image_column) as `datasets.Dataset`s with an Image and a ClassLabel column."""
    from datasets import load_dataset

    if args.data_dir:
        ds = load_dataset("imagefolder", data_dir=args.data_dir)
        label_column = args.label_column or "label"
    else:
        ds = load_dataset(args.dataset)
        label_column = args.label_column or ("fine_label" if args.dataset.split("/")[-1] == "cifar100" else "label")
    train, test = ds[args.train_split], ds[args.test_split]
    image_column = args.image_column or next(
        (n for n, f in train.features.items() if type(f).__name__ == "Image"), "img"
    )
    return train, test, label_column, image_column


def subsample(train, label_column: str, fraction: float = 1.0, max_examples: int | None = None, seed: int = 0):
    """A seeded, class-balanced random subset of `train` (`fraction` of it, capped at `max_examples`).

    Random, not the first N rows: image folders list their files class by class, so a prefix would hold only
    the first classes.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--train-fraction must be in (0, 1], got {fraction}")
    n = int(round(fraction * len(train)))
    if max_examples:
        n = min(n, max_examples)
    if n >= len(train):
        return train
    if n < 1:
        raise ValueError(f"--train-fraction {fraction} of {len(train)} images leaves none; use a larger fraction")
    try:
        return train.train_test_split(train_size=n, stratify_by_column=label_column, seed=seed)["train"]
    except ValueError:  # too few examples per class to stratify
        return train.train_test_split(train_size=n, seed=seed)["train"]


def to_uint8(images) -> torch.Tensor:
    """List of PIL images -> `(B, 3, H, W)` uint8."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).contiguous()


def load_uint8(dataset, image_column, label_column, batch_size=2000):
    """All images `(N, 3, H, W)` uint8 and labels `(N,)` int64 in dataset order."""
    xs, ys = [], []
    for batch in dataset.select_columns([image_column, label_column]).iter(batch_size=batch_size):
        xs.append(to_uint8(batch[image_column]))
        ys.append(torch.as_tensor(batch[label_column]).long())
    return torch.cat(xs), torch.cat(ys)


class Normalize:
    """`transform` for ResMem and evaluation: list of PIL images -> normalised `(B, 3, H, W)` float32."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def tensor(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return (x_uint8.float() / 255.0 - self.mean.to(x_uint8.device)) / self.std.to(x_uint8.device)

    def __call__(self, images) -> torch.Tensor:
        return self.tensor(to_uint8(images))


def augment(x: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation with torch ops: random crop with zero padding `padding`, horizontal flip.

    `x` `(B, C, H, W)` (normalised, so zero padding is the mean colour) -> same shape.
    """
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dev = x.device
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    rows = (dy[:, None] + torch.arange(h, device=dev)[None, :])  # (B, H)
    cols = (dx[:, None] + torch.arange(w, device=dev)[None, :])  # (B, W)
    flip = torch.rand(b, generator=generator).to(dev) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch_idx = torch.arange(b, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch_idx, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def lr_schedule(optimizer, steps_per_epoch: int, warmup_epochs: float, milestones, decay: float):
    """Stepped once per optimizer step: peak lr x `(s + 1) / n` at step `s < n` (linear warm-up over
    `n = ceil(warmup_epochs * steps_per_epoch)` steps), then x`decay` at each milestone epoch."""
    from torch.optim.lr_scheduler import LinearLR, MultiStepLR, SequentialLR

    warmup = math.ceil(warmup_epochs * steps_per_epoch) if warmup_epochs > 0 else 0
    # SequentialLR restarts the second schedule's step count at the switch: milestones count from there.
    steps = MultiStepLR(optimizer, milestones=[m * steps_per_epoch - warmup for m in milestones], gamma=decay)
    if warmup == 0:
        return steps
    ramp = LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    return SequentialLR(optimizer, [ramp, steps], milestones=[warmup])


# ----------------------------------------------------------------------------- reporting


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    smoke_dir = None
    if args.smoke:
        smoke_dir = tempfile.TemporaryDirectory(prefix="resmem-cifar-smoke-")
        args.data_dir = make_smoke_folder(smoke_dir.name)
        args.epochs, args.batch_size, args.warmup_epochs, args.milestones = 1, 16, 0, []
        args.lr, args.eval_batch_size = 0.05, 64
        if args.output_dir == "outputs/cifar100_resnet8":
            args.output_dir = os.path.join(smoke_dir.name, "out")
    try:
        return run(args)
    finally:
        if smoke_dir is not None:
            smoke_dir.cleanup()


def run(args) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from resmem import ResMemWrapper
    from resmem.evaluation import decompose, predict, results_markdown
    from resmem.models import CifarResNetConfig, CifarResNetForImageClassification

    started = time.perf_counter()
    accelerator = Accelerator(cpu=args.cpu)
    log = accelerator.print
    set_seed(args.seed)
    train, test, label_column, image_column = load_splits(args)
    validation = None
    if args.tune_on_validation:
        try:
            parts = train.train_test_split(test_size=args.tune_on_validation, stratify_by_column=label_column, seed=args.seed)
        except ValueError:  # too few examples per class to stratify
            parts = train.train_test_split(test_size=args.tune_on_validation, seed=args.seed)
        train, validation = parts["train"], parts["test"]
    # Subset after the carve, so every training fraction is tuned and judged on the same validation images.
    train = subsample(train, label_column, args.train_fraction, args.max_train_examples, args.seed)
    names = train.features[label_column].names if hasattr(train.features[label_column], "names") else None
    num_labels = len(names) if names else int(max(train[label_column])) + 1
    log(f"Data: {args.data_dir or args.dataset}: train {len(train)}"
        + (f", validation {len(validation)} (carved from train)" if validation is not None else "")
        + f", test {len(test)}, {num_labels} classes, label column {label_column!r}")

    x_train, y_train = load_uint8(train, image_column, label_column)
    scaled = x_train.float() / 255.0
    mean = scaled.mean(dim=(0, 2, 3)).tolist()
    std = scaled.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    del scaled
    norm = Normalize(mean, std)

    config = CifarResNetConfig(
        num_channels=3, hidden_sizes=list(args.hidden_sizes), depths=list(args.depths), num_labels=num_labels,
        id2label=dict(enumerate(names)) if names else None,
        label2id={n: i for i, n in enumerate(names)} if names else None,
    )
    config.normalization = {"mean": mean, "std": std}  # recorded in config.json so users can reproduce the inputs
    model = CifarResNetForImageClassification(config)
    log(f"Model: CifarResNet hidden_sizes {args.hidden_sizes} depths {args.depths}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters")

    per_process = max(1, args.batch_size // accelerator.num_processes)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train), batch_size=per_process, shuffle=True, drop_last=False,
        generator=torch.Generator().manual_seed(args.seed),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = len(loader)
    # Stepped once per optimizer step by hand (not prepared): --batch-size is the global batch.
    scheduler = lr_schedule(optimizer, steps_per_epoch, args.warmup_epochs, args.milestones, args.lr_decay)
    aug_gen = torch.Generator().manual_seed(args.seed + accelerator.process_index)
    log(f"Training: {args.epochs} epochs x {steps_per_epoch} steps, global batch {args.batch_size} "
        f"({accelerator.num_processes} process(es)), SGD lr {args.lr} momentum {args.momentum} wd {args.weight_decay}, "
        f"warm-up {args.warmup_epochs} epochs, x{args.lr_decay} at {args.milestones}")
    t = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        total, correct, loss_sum = 0, 0, 0.0
        for xb, yb in loader:
            x = norm.tensor(xb)
            if not args.no_augment:
                x = augment(x, aug_gen)
            out = model(pixel_values=x, labels=yb)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(out.loss)
            optimizer.step()
            scheduler.step()
            loss_sum += out.loss.item() * len(yb)
            correct += (out.logits.argmax(-1) == yb).sum().item()
            total += len(yb)
        log(f"  epoch {epoch + 1}/{args.epochs}: loss {loss_sum / total:.3f}, train acc {correct / total:.3f} "
            f"(augmented, this process), lr {scheduler.get_last_lr()[0]:.4g}")
        if epoch + 1 in args.checkpoint_epochs and accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(os.path.join(args.output_dir, f"checkpoint_epoch{epoch + 1}"))
    train_seconds = time.perf_counter() - t

    base = accelerator.unwrap_model(model).eval()
    os.makedirs(args.output_dir, exist_ok=True)
    if accelerator.is_main_process:
        base.save_pretrained(os.path.join(args.output_dir, "base_model"))
    accelerator.wait_for_everyone()

    t = time.perf_counter()
    resmem = ResMemWrapper.from_base(base, k=args.k, sigma=args.sigma, temperature=args.temperature)
    io = dict(label_column=label_column, image_column=image_column, transform=norm)
    resmem.build_memory(train, batch_size=args.eval_batch_size, accelerator=accelerator, **io)
    if resmem.config.k > len(resmem.memory):
        log(f"  k={resmem.config.k} exceeds the memory's {len(resmem.memory)} entries; using k={len(resmem.memory)}")
        resmem.config.k = len(resmem.memory)
    log(f"ResMem: memory of {len(resmem.memory)} training images, keys from {resmem.config.layer!r} ({resmem.memory.dim} dims)")
    rows, tuning = [], None
    if validation is not None:
        result = resmem.tune(
            validation, k=sorted({min(k, len(resmem.memory)) for k in args.k_grid}), sigma=args.sigma_grid,
            temperature=args.temperature_grid, batch_size=args.eval_batch_size, split="validation", **io,
        )
        tuning = result.best
        log(f"  tuned on the validation split: k={resmem.config.k}, sigma={resmem.config.sigma}, T={resmem.config.residual_temperature}")
        v = predict(resmem, validation, args.eval_batch_size, progress=False, accelerator=accelerator, **io)
        rows.append((f"validation ({len(validation)}, tuned on)", decompose(v.base, v.resmem, v.labels)))
    p = predict(resmem, test, args.eval_batch_size, progress=False, accelerator=accelerator, **io)
    test_metrics = decompose(p.base, p.resmem, p.labels)
    rows.append((f"test ({len(test)})", test_metrics))
    resmem_seconds = time.perf_counter() - t

    hyper = {"k": resmem.config.k, "sigma": resmem.config.sigma, "temperature": resmem.config.residual_temperature,
             "chosen_by": "validation split carved from train" if validation is not None else "fixed (paper values)"}
    title = (f"{args.data_dir or args.dataset}: CIFAR-ResNet hidden_sizes {args.hidden_sizes} depths {args.depths}, "
             f"{args.epochs} epochs on {len(train)} images; ResMem k={hyper['k']}, sigma={hyper['sigma']}, T={hyper['temperature']} ({hyper['chosen_by']})")
    markdown = results_markdown(title, rows, PAPER)
    results = {
        "args": vars(args), "hyperparameters": hyper, "tuning_best": tuning, "test": test_metrics,
        "rows": {name: r for name, r in rows}, "paper": PAPER, "num_processes": accelerator.num_processes,
        "train_examples": len(train), "parameters": sum(p.numel() for p in base.parameters()),
        "timings_s": {"train": round(train_seconds, 2), "resmem": round(resmem_seconds, 2),
                      "total": round(time.perf_counter() - started, 2)},
    }
    if accelerator.is_main_process:
        log("")
        log(markdown)
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2, default=str)
        with open(os.path.join(args.output_dir, "results.md"), "w") as f:
            f.write(markdown)
        log(f"Wrote {os.path.join(args.output_dir, 'results.json')} and results.md "
            f"({results['timings_s']['total']:.1f} s)")
    if args.save_model:
        resmem.save_pretrained(os.path.join(args.output_dir, "resmem_model"), is_main_process=accelerator.is_main_process)
    return results


if __name__ == "__main__":
    main()
