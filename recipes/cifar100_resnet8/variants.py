"""Ablation of ResMem variants beyond the paper on base models trained by `train.py` (several seeds).

For every run folder (one `train.py --tune-on-validation F --seed S --checkpoint-epochs ...` output: `base_model/`,
`checkpoint_epoch*/`, `results.json`), this re-makes train.py's stratified validation carve (same fraction and
seed), and for every variant builds a memory on the remaining training images, tunes k / sigma / T on the
validation images only (`model.tune`) and reports the test images at that setting (`resmem.evaluate`).

Variants (each a config option or a `build_memory` argument of the library; `+` combines them, e.g.
`"relative sigma+hflip memory"`):

- `paper`: the paper's method (eq. 3, absolute sigma, raw keys, in-sample residuals).
- `relative sigma`: `config.sigma_mode = "relative"` (sigma in units of each query's k-th neighbour distance).
- `l2 keys`, `standardized keys`, `whitened keys`: `config.key_normalization = "l2"` / `"standardize"` / `"whiten"`
  (PCA whitening).
- `hflip memory`: `build_memory(..., augment="hflip")` (every training image and its mirror image).
- `hflip queries`: `config.query_augmentation = "hflip"` (residual averaged over the query and its mirror).
- `residuals from epoch E`: `build_memory(..., residual_model=<checkpoint_epochE>)`: residuals of a model that
  fitted the training images less (out-of-sample-like residuals; keys still from the final model).

Selection is on validation only: per seed, the `selected` row is the variant with the highest validation ResMem
accuracy (ties: the earlier variant in the list, `paper` first); `validation winners combined` combines the
variants whose validation accuracy beats `paper` on every seed. Writes `variants.json`, `variants.md` and
`variants.png` to `--output-dir`.

    python recipes/cifar100_resnet8/variants.py --runs outputs/seed0 outputs/seed1 outputs/seed2 \\
        --data-dir /tmp/cifar/cifar10 --output-dir outputs/cifar10_variants
    python recipes/cifar100_resnet8/variants.py --smoke   # seconds: two tiny seeds on a synthetic image folder
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import tempfile
import time

import torch

# name -> what it changes: `config` fields set before the build, `build` kwargs of build_memory (a
# `residual_model` value is a folder name inside the run), `sigma`: the tune grid when "auto" does not apply.
ATOMS = {
    "paper": {},
    "relative sigma": {"config": {"sigma_mode": "relative"}, "sigma": [0.02, 0.05, 0.1, 0.2, 0.5, 1.0]},
    "l2 keys": {"config": {"key_normalization": "l2"}},
    "standardized keys": {"config": {"key_normalization": "standardize"}},
    "whitened keys": {"config": {"key_normalization": "whiten"}},
    "hflip memory": {"build": {"augment": "hflip"}},
    "hflip queries": {"config": {"query_augmentation": "hflip"}},
    "residuals from epoch 6": {"build": {"residual_model": "checkpoint_epoch6"}},
    "residuals from epoch 3": {"build": {"residual_model": "checkpoint_epoch3"}},
}
SELECTED = "selected on validation"
COMBINED = "validation winners combined"


def _train_module():
    """train.py of this folder (its data loading and normalisation), imported by path."""
    spec = importlib.util.spec_from_file_location("cifar_train", os.path.join(os.path.dirname(__file__), "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", help="train.py output folders, one per seed")
    p.add_argument("--data-dir", help="the image folder the runs were trained on")
    p.add_argument("--variants", nargs="+", default=list(ATOMS), help=f"default: all of {list(ATOMS)}; '+' combines")
    p.add_argument("--no-combined", action="store_true", help=f"skip the {COMBINED!r} row")
    p.add_argument("--k-grid", type=int, nargs="+", default=[10, 20, 53, 100])
    p.add_argument("--sigma-grid", default="auto", nargs="+",
                   help="'auto' (sigma_scale x 0.25..4, the default) or values; `relative sigma` has its own grid")
    p.add_argument("--temperature-grid", type=float, nargs="+", default=[0.7, 1.0, 1.4, 2.0])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--output-dir", default="outputs/cifar10_variants")
    p.add_argument("--smoke", action="store_true", help="train two tiny seeds on a synthetic folder and run everything")
    p.add_argument("--merge", nargs="+", metavar="VARIANTS_JSON",
                   help="no runs: merge variants.json files of earlier invocations (e.g. one process per seed, and the "
                        "combined row run afterwards) into one table; rows of the same run are joined")
    args = p.parse_args(argv)
    if not args.smoke and not args.merge and not (args.runs and args.data_dir):
        p.error("give --runs and --data-dir (or --smoke, or --merge)")
    if args.sigma_grid != "auto":
        args.sigma_grid = "auto" if args.sigma_grid == ["auto"] else [float(s) for s in args.sigma_grid]
    for name in args.variants:
        unknown = [a for a in name.split("+") if a not in ATOMS]
        if unknown:
            p.error(f"unknown variant(s) {unknown}; known: {list(ATOMS)} (combine with '+')")
    return args


def combine(name: str) -> dict:
    """Merge the atoms of `a+b+...` into one spec (config, build, sigma grid)."""
    spec = {"config": {}, "build": {}, "sigma": None}
    for atom in name.split("+"):
        part = ATOMS[atom]
        spec["config"].update(part.get("config", {}))
        spec["build"].update(part.get("build", {}))
        spec["sigma"] = part.get("sigma", spec["sigma"])
    return spec


class Splits:
    """train.py's splits of one seed as `with_transform` datasets over images decoded once (uint8 in RAM)."""

    def __init__(self, train_mod, data_dir: str, fraction: float, seed: int, cache: dict):
        from datasets import Dataset

        if data_dir not in cache:
            ns = argparse.Namespace(data_dir=data_dir, dataset=None, label_column=None, image_column=None,
                                    train_split="train", test_split="test")
            train, test, label_column, image_column = train_mod.load_splits(ns)
            cache[data_dir] = (train, test, label_column, train_mod.load_uint8(train, image_column, label_column),
                               train_mod.load_uint8(test, image_column, label_column))
        train, test, label_column, (x_train, y_train), (x_test, y_test) = cache[data_dir]
        # The same stratified carve as train.py: it depends only on the labels, the fraction and the seed.
        rows = train.select_columns([label_column]).add_column("row", list(range(len(train))))
        try:
            parts = rows.train_test_split(test_size=fraction, stratify_by_column=label_column, seed=seed)
        except ValueError:  # too few examples per class to stratify (as train.py)
            parts = rows.train_test_split(test_size=fraction, seed=seed)
        self.x_train, self.x_test = x_train, x_test

        def rows_of(row_ids):
            return Dataset.from_dict({"row": list(row_ids), "label": y_train[list(row_ids)].tolist()})

        self.train = rows_of(parts["train"]["row"])
        self.validation = rows_of(parts["test"]["row"])
        self.test = Dataset.from_dict({"row": list(range(len(y_test))), "label": y_test.tolist()})

    def with_pixels(self, ds, images, norm):
        """Rows yield `pixel_values` `(3, H, W)` float32 normalised as in training, and `label`."""
        return ds.with_transform(lambda b: {"pixel_values": norm.tensor(images[torch.as_tensor(b["row"])]),
                                            "label": b["label"]})


def run_seed(run_dir: str, args, train_mod, cache: dict, variants: list[str]) -> dict:
    import resmem
    from resmem import ResMemWrapper
    from transformers import AutoModelForImageClassification

    with open(os.path.join(run_dir, "results.json")) as f:
        run_args = json.load(f)["args"]
    fraction, seed = run_args["tune_on_validation"], run_args["seed"]
    if not fraction:
        raise ValueError(f"{run_dir} was trained without --tune-on-validation: no validation split to select on.")
    splits = Splits(train_mod, args.data_dir, fraction, seed, cache)
    base = AutoModelForImageClassification.from_pretrained(os.path.join(run_dir, "base_model")).eval()
    norm = train_mod.Normalize(base.config.normalization["mean"], base.config.normalization["std"])
    train = splits.with_pixels(splits.train, splits.x_train, norm)
    val = splits.with_pixels(splits.validation, splits.x_train, norm)
    test = splits.with_pixels(splits.test, splits.x_test, norm)
    out = {"run": run_dir, "seed": seed, "train": len(train), "validation": len(val), "test": len(test), "variants": {}}
    for name in variants:
        spec = combine(name)
        t0 = time.perf_counter()
        model = ResMemWrapper.from_base(base)
        model.config.index = "exact"  # variants are compared on accuracy: no approximate index in the way
        for key, value in spec["config"].items():
            setattr(model.config, key, value)
        build = dict(spec["build"])
        if "residual_model" in build:
            build["residual_model"] = AutoModelForImageClassification.from_pretrained(
                os.path.join(run_dir, build["residual_model"])).eval()
        model.build_memory(train, batch_size=args.batch_size, progress=False, **build)
        sigma = spec["sigma"] or args.sigma_grid
        tuned = model.tune(val, k=[min(k, len(model.memory)) for k in args.k_grid], sigma=sigma,
                           temperature=args.temperature_grid, batch_size=args.batch_size, progress=False)
        best = tuned.best
        result = resmem.evaluate(model, test, split="test", batch_size=args.batch_size, progress=False, record=False)
        row = {
            "k": model.config.k, "sigma": model.config.sigma, "temperature": model.config.residual_temperature,
            "validation_base_accuracy": best["base_accuracy"], "validation_accuracy": best["accuracy"],
            "test_base_accuracy": result["base_accuracy"], "test_accuracy": result["resmem_accuracy"],
            "test_tpr": result["tpr"], "test_fpr": result["fpr"], "seconds": round(time.perf_counter() - t0, 1),
            "memory_size": len(model.memory),
        }
        row["test_relative_error_reduction"] = relative_error_reduction(row["test_base_accuracy"], row["test_accuracy"])
        out["variants"][name] = row
        print(f"seed {seed} {name}: {json.dumps(row)}", flush=True)
    return out


def merged(paths: list[str], order: list[str]) -> tuple[list[dict], list[str]]:
    """Seeds of several variants.json files, rows of the same run joined; variant names in `order`, then the rest."""
    by_run: dict[str, dict] = {}
    for path in paths:
        with open(path) as f:
            for seed in json.load(f)["seeds"]:
                target = by_run.setdefault(seed["run"], {**seed, "variants": {}})
                target["variants"].update({k: v for k, v in seed["variants"].items() if k not in (SELECTED, COMBINED)})
    seeds = list(by_run.values())
    present = [n for n in order if all(n in s["variants"] for s in seeds)]
    extra = [n for n in seeds[0]["variants"] if n not in present and all(n in s["variants"] for s in seeds)]
    return seeds, present + extra


def relative_error_reduction(base_accuracy: float, accuracy: float) -> float:
    """`(err_base - err) / err_base`, errors `1 - accuracy` (nan when the base makes no error)."""
    if base_accuracy >= 1.0:
        return float("nan")
    return (accuracy - base_accuracy) / (1.0 - base_accuracy)


def select(seeds: list[dict], variants: list[str]) -> None:
    """Add the per-seed validation-selected row (highest validation accuracy; earlier variant wins ties)."""
    for s in seeds:
        best = max(variants, key=lambda v: (s["variants"][v]["validation_accuracy"], -variants.index(v)))
        s["variants"][SELECTED] = dict(s["variants"][best], chose=best)


def winners(seeds: list[dict], variants: list[str]) -> list[str]:
    """Atoms whose validation accuracy beats `paper` on every seed (selection on validation only)."""
    return [v for v in variants if v != "paper" and "+" not in v
            and all(s["variants"][v]["validation_accuracy"] > s["variants"]["paper"]["validation_accuracy"] for s in seeds)]


def summarise(seeds: list[dict], names: list[str]) -> list[dict]:
    """Mean and standard error over seeds of each variant's validation / test numbers."""
    rows = []
    for name in names:
        per = [s["variants"][name] for s in seeds if name in s["variants"]]
        if not per:
            continue
        row = {"variant": name}
        for key in ("validation_accuracy", "test_base_accuracy", "test_accuracy", "test_relative_error_reduction"):
            vals = torch.tensor([p[key] for p in per], dtype=torch.float64)
            row[key] = float(vals.mean())
            row[key + "_se"] = float(vals.std(unbiased=True) / math.sqrt(len(vals))) if len(vals) > 1 else float("nan")
        row["test_gain"] = row["test_accuracy"] - row["test_base_accuracy"]
        row["validation_gain"] = float(sum(p["validation_accuracy"] - p["validation_base_accuracy"] for p in per) / len(per))
        if name == SELECTED:
            row["chose"] = [p["chose"] for p in per]
        rows.append(row)
    return rows


def markdown(rows: list[dict], n_seeds: int) -> str:
    lines = [
        f"| variant | validation gain (mean of {n_seeds}) | test base acc | test ResMem acc | test gain | "
        "relative test-error reduction (± s.e.) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r["variant"] + (f" ({', '.join(r['chose'])})" if "chose" in r else "")
        lines.append(
            f"| {name} | {100 * r['validation_gain']:+.2f} | {100 * r['test_base_accuracy']:.2f}% | "
            f"{100 * r['test_accuracy']:.2f}% | {100 * r['test_gain']:+.2f} | "
            f"{100 * r['test_relative_error_reduction']:.2f}% ± {100 * r['test_relative_error_reduction_se']:.2f}% |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, goal: float = 0.073) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    y = [100 * r["test_relative_error_reduction"] for r in rows]
    err = [100 * r["test_relative_error_reduction_se"] if math.isfinite(r["test_relative_error_reduction_se"]) else 0
           for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    ax.barh(range(len(rows)), y, xerr=err, color=["tab:gray" if n == "paper" else "tab:blue" for n in names])
    ax.axvline(100 * goal, color="tab:red", ls="--", label=f"goal {100 * goal:.1f}% (paper, CIFAR-100)")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    ax.set_xlabel("relative test-error reduction over the base (%), mean ± s.e. over seeds")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def smoke_runs(root: str, train_mod) -> tuple[list[str], str]:
    """Two tiny seeds on a synthetic folder (train.py --smoke data), with an epoch-1 checkpoint each."""
    data = train_mod.make_smoke_folder(os.path.join(root, "data"), classes=3, train_per_class=16, test_per_class=4)
    runs = []
    for seed in (0, 1):
        out = os.path.join(root, f"seed{seed}")
        train_mod.main(["--data-dir", data, "--epochs", "6", "--warmup-epochs", "0", "--milestones", "--cpu",
                        "--tune-on-validation", "0.25", "--seed", str(seed), "--checkpoint-epochs", "3", "6",
                        "--k-grid", "5", "--sigma-grid", "1", "--temperature-grid", "1", "--output-dir", out])
        runs.append(out)
    return runs, data


def main(argv=None) -> dict:
    args = parse_args(argv)
    import resmem.models  # noqa: F401  (registers CifarResNet with the Auto classes)

    started = time.perf_counter()
    train_mod = _train_module()
    tmp = None
    if args.smoke:
        tmp = tempfile.TemporaryDirectory()
        args.runs, args.data_dir = smoke_runs(tmp.name, train_mod)
        args.k_grid = [3, 5]
    cache = {}
    if args.merge:
        seeds, variants = merged(args.merge, args.variants)
    else:
        variants = list(args.variants)
        seeds = [run_seed(run_dir, args, train_mod, cache, variants) for run_dir in args.runs]
    atoms = [v for v in variants if "+" not in v]
    names = list(variants)
    chosen = winners(seeds, atoms) if not args.no_combined and "paper" in atoms else []
    if len(chosen) >= 2:  # one winner alone is already a row of its own
        combined = "+".join(chosen)
        if not all(combined in s["variants"] for s in seeds):
            if args.merge:
                raise SystemExit(f"The validation winners are {chosen}: run `--runs RUN --variants \"{combined}\"` for each "
                                 "seed and add its variants.json to --merge (or pass --no-combined).")
            for i, run_dir in enumerate(args.runs):
                seeds[i]["variants"][combined] = run_seed(run_dir, args, train_mod, cache, [combined])["variants"][combined]
        for s in seeds:
            s["variants"][COMBINED] = dict(s["variants"][combined], combines=chosen)
        names = [n for n in names if n != combined] + [COMBINED]
    select(seeds, names)
    names.append(SELECTED)
    rows = summarise(seeds, names)
    table = markdown(rows, len(seeds))
    out = {
        "args": dict(vars(args)), "seeds": seeds, "summary": rows,
        "validation_winners": chosen, "timings_s": {"total": round(time.perf_counter() - started, 1)},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores visible, torch {torch.__version__} "
                   f"threads {torch.get_num_threads()}",
    }
    os.makedirs(args.output_dir, exist_ok=True)
    for name, text in (("variants.json", json.dumps(out, indent=2, default=str)), ("variants.md", table)):
        path = os.path.join(args.output_dir, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)  # never a half-written results file
    plot(rows, os.path.join(args.output_dir, "variants.png"))
    print(table)
    if tmp is not None:
        tmp.cleanup()
    return out


if __name__ == "__main__":
    main()
