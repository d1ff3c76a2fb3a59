"""Accuracy and calibration (ECE, NLL) of a base classifier, probability-space ResMem and logit-space ResMem.

Takes a base model trained by `train.py` (its `base_model/` folder, with `config.normalization`) and the same
image folder; re-makes train.py's stratified validation carve (same `--tune-on-validation` and `--seed`), builds
ONE memory on the remaining training images and, for each method, picks its settings on the validation split
only and reports the test split with `resmem.evaluate`:

- base model (T = 1), and base with temperature scaling (T picked for validation NLL: the standard
  calibration fix, for reference);
- ResMem, probability space (the paper's method; `logits` clamped at `score_floor` and renormalised);
- ResMem, logit space (`residual_space="logit"`; grid also over the target smoothing `eps`).

Each ResMem method is tuned twice on validation: by accuracy (`model.tune`, the project's rule) and by NLL
(the lowest validation NLL of the same grid). Writes `calibration.json` and `calibration.md` to `--output-dir`.

    python recipes/cifar100_resnet8/calibration.py --base-model outputs/cifar10/base_model \\
        --data-dir /tmp/cifar/cifar10 --tune-on-validation 0.1 --output-dir outputs/cifar10_calibration
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time

import torch


def _train_module():
    """train.py of this folder (its data loading and normalisation), imported by path."""
    spec = importlib.util.spec_from_file_location("cifar_train", os.path.join(os.path.dirname(__file__), "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", required=True, help="train.py's base_model/ folder")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--tune-on-validation", type=float, default=0.1, help="as given to train.py (same carve)")
    p.add_argument("--seed", type=int, default=0, help="as given to train.py")
    p.add_argument("--k-grid", type=int, nargs="+", default=[10, 20, 53, 100])
    p.add_argument("--sigma-grid", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5])
    p.add_argument("--temperature-grid", type=float, nargs="+", default=[0.7, 1.0, 1.4, 2.0])
    p.add_argument("--smoothing-grid", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--output-dir", required=True)
    return p.parse_args(argv)


def probability_space_nll_grid(model, cache, grid, num_bins=15):
    """Validation NLL and ECE of probability-space ResMem (clamped, renormalised `logits`) for every grid point.

    The same weights and residuals as `resmem.tuning.grid_predictions`, then the forward's
    `log(renormalise(clamp(scores, score_floor)))`. Returns rows `{"k", "sigma", "temperature", "nll", "ece", "accuracy"}`.
    """
    from resmem.scoring import calibration_bin_sums

    ks, sigmas, temps = grid["k"], grid["sigma"], grid["temperature"]
    k_max = max(ks)
    d, ids = cache.distances[:, :k_max].float(), cache.ids[:, :k_max]  # (V, k_max)
    labels = cache.labels.long()  # (V,)
    nb_logits, nb_labels = model.memory.base_logits[ids].float(), model.memory.labels[ids].long()  # (V, k_max, C), (V, k_max)
    c = nb_logits.shape[-1]
    onehot = torch.nn.functional.one_hot(nb_labels, c).float()  # (V, k_max, C)
    rows = []
    for k in ks:
        for sigma in sigmas:
            w = torch.softmax(-d[:, :k] / sigma, dim=-1)  # (V, k)
            for t in temps:
                r = onehot[:, :k] - torch.softmax(nb_logits[:, :k] / t, dim=-1)  # (V, k, C)
                scores = torch.softmax(cache.base_logits.float() / t, dim=-1) + torch.einsum("vk,vkc->vc", w, r)
                clamped = scores.clamp_min(model.config.score_floor)
                log_probs = (clamped / clamped.sum(-1, keepdim=True)).log()  # (V, C)
                top, pred = log_probs.max(-1)
                gap = calibration_bin_sums(top.exp(), pred == labels, num_bins)
                rows.append({
                    "k": k, "sigma": sigma, "temperature": t,
                    "nll": float(-log_probs.gather(1, labels[:, None]).mean()),
                    "ece": float(gap.abs().sum() / len(labels)),
                    "accuracy": float((scores.argmax(-1) == labels).float().mean()),
                })
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    import resmem
    from resmem import ResMemWrapper
    from resmem.scoring import calibration
    from resmem.tuning import collect_neighbours
    from transformers import AutoModelForImageClassification

    started = time.perf_counter()
    train_mod = _train_module()
    ns = argparse.Namespace(data_dir=args.data_dir, dataset=None, label_column=None, image_column=None,
                            train_split="train", test_split="test")
    train, test, label_column, image_column = train_mod.load_splits(ns)
    parts = train.train_test_split(test_size=args.tune_on_validation, stratify_by_column=label_column, seed=args.seed)
    train, val = parts["train"], parts["test"]
    base = AutoModelForImageClassification.from_pretrained(args.base_model).eval()
    norm = train_mod.Normalize(base.config.normalization["mean"], base.config.normalization["std"])
    io = dict(label_column=label_column, image_column=image_column, transform=norm, batch_size=args.batch_size)
    print(f"train {len(train)}, validation {len(val)}, test {len(test)}", flush=True)

    model = ResMemWrapper.from_base(base)
    t = time.perf_counter()
    model.build_memory(train, progress=False, **io)
    timings = {"build_memory": time.perf_counter() - t}
    grid = {"k": args.k_grid, "sigma": args.sigma_grid, "temperature": args.temperature_grid}
    results, rows = {}, []

    def report(name, space, setting, chosen_by):
        model.config.residual_space = space
        model.config.k, model.config.sigma, model.config.residual_temperature = setting["k"], setting["sigma"], setting["temperature"]
        if space == "logit":
            model.config.label_smoothing = setting["label_smoothing"]
        t0 = time.perf_counter()
        result = resmem.evaluate(model, test, split="test", progress=False, record=False, **io)
        result.pop("per_class")
        result.update(chosen_by=chosen_by, validation={key: setting.get(key) for key in ("accuracy", "nll", "ece")})
        results[name] = result
        rows.append({"setting": name, "k": result["k"], "sigma": result["sigma"], "temperature": result["temperature"],
                     "label_smoothing": result.get("label_smoothing"), "resmem_accuracy": result["resmem_accuracy"],
                     "ece": result["ece"], "nll": result["nll"], "gain": result["gain"]})
        print(f"{name}: {json.dumps({k: v for k, v in result.items() if k != 'validation'})}", flush=True)
        timings[f"evaluate {name}"] = time.perf_counter() - t0

    # Probability space: tuned by accuracy (model.tune) and by validation NLL (same grid, same neighbours).
    t = time.perf_counter()
    tuned = model.tune(val, **grid, progress=False, set_best=False, **io)
    cache = collect_neighbours(model, val, max(grid["k"]), progress=False, **io)
    prob_rows = probability_space_nll_grid(model, cache, grid)
    timings["tune probability"] = time.perf_counter() - t
    by_acc = dict(tuned.best)
    match = next(r for r in prob_rows if (r["k"], r["sigma"], r["temperature"]) == (by_acc["k"], by_acc["sigma"], by_acc["temperature"]))
    by_acc.update(nll=match["nll"], ece=match["ece"])
    report("ResMem probability space, tuned for accuracy", "probability", by_acc, "validation accuracy")
    report("ResMem probability space, tuned for NLL", "probability", min(prob_rows, key=lambda r: r["nll"]), "validation NLL")

    # Logit space: the same memory, residual_space switched; grid also over label_smoothing.
    model.config.residual_space = "logit"
    t = time.perf_counter()
    tuned_logit = model.tune(val, **grid, label_smoothing=args.smoothing_grid, progress=False, set_best=False, **io)
    timings["tune logit"] = time.perf_counter() - t
    report("ResMem logit space, tuned for accuracy", "logit", tuned_logit.best, "validation accuracy")
    report("ResMem logit space, tuned for NLL", "logit", min(tuned_logit.table, key=lambda r: r["nll"]), "validation NLL")

    # Base model at T = 1 and with temperature scaling (T for the lowest validation NLL, a 1-D search).
    base_val_logits = cache.base_logits.float()
    temps = torch.linspace(0.5, 3.0, 51).tolist()
    best_t = min(temps, key=lambda s: calibration(torch.log_softmax(base_val_logits / s, -1), cache.labels)["nll"])
    model.config.residual_space = "probability"
    test_cache = collect_neighbours(model, test, 1, progress=False, **io)  # the base model's test logits and labels
    test_logits, test_labels = test_cache.base_logits, test_cache.labels
    base_acc = float((test_logits.argmax(-1) == test_labels).float().mean())
    base_rows = []
    for name, temperature in (("base model", 1.0), (f"base model, temperature scaling (T={best_t:.2f} on validation NLL)", best_t)):
        cal = calibration(torch.log_softmax(test_logits.float() / temperature, -1), test_labels)
        results[name] = {"accuracy": base_acc, **cal, "temperature": temperature}
        base_rows.append({"setting": name, "resmem_accuracy": base_acc, "ece": cal["ece"], "nll": cal["nll"]})
    rows = base_rows + rows

    timings = {k: round(v, 1) for k, v in timings.items()}
    timings["total"] = round(time.perf_counter() - started, 1)
    out = {
        "args": vars(args), "results": results, "timings_s": timings,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores visible, torch {torch.__version__} threads {torch.get_num_threads()}",
        "validation_table_logit": tuned_logit.table, "validation_table_probability": prob_rows,
    }
    from resmem.scoring import format_table

    table = format_table(rows, columns=("setting", "k", "sigma", "temperature", "label_smoothing", "resmem_accuracy", "ece", "nll"))
    os.makedirs(args.output_dir, exist_ok=True)
    for name, text in (("calibration.json", json.dumps(out, indent=2, default=str)), ("calibration.md", table)):
        path = os.path.join(args.output_dir, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)  # never a half-written results file
    print(table)
    print(json.dumps(timings))
    return out


if __name__ == "__main__":
    main()
