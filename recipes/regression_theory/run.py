"""The paper's Section 5 stylized regression in simulation: a linear base outside the target's class, plus ResMem.

Hardware: CPU only (2 cores are plenty); the full run takes a few minutes, `--smoke` (the test suite) seconds.
Launch:   nice -n 10 python recipes/regression_theory/run.py            # writes recipes/regression_theory/results/
Expected: the base model's excess risk stays at its misspecification error for every n; ResMem's falls like
          n^(-2/(d+2)) (the k-NN rate for a Lipschitz residual in d dimensions), see docs/regression_theory.md.

Setting (per dimension d and seed):

    x ~ Uniform([-1, 1]^d),   y = <w*, x> + g(x) + eps,   g(x) = sin(3 x_1) + 0.5 cos(2 x_d),   eps ~ N(0, 0.5^2)

The base model is the least-squares linear model (with intercept) fitted on the n training points, wrapped as a
tiny `PreTrainedModel` regressor (`problem_type="regression"`, `num_labels=1`). ResMem is the library's public
path: `ResMemWrapper.from_base(base, layer="head:input")` (key = the input x itself), `build_memory` on the same
n points (residuals y_i - f(x_i)), predictions `f(x) + sum_i w_i r_i`, scored with `resmem.evaluate` on a test
set whose labels are the noiseless regression function f*(x) = <w*, x> + g(x), so its "MSE" is the excess risk
E[(prediction - f*(x))^2] (the test risk is that plus the noise variance 0.25).

Two ResMem settings, neither chosen on the test sample:
  * theorem schedule: k_n = ceil(n^(2/(d+2))), sigma_n = 2 (k_n / n)^(1/d) (the k-NN radius in a cube of side 2),
    the bias-variance balance of k-NN regression that gives the n^(-2/(d+2)) rate;
  * validation-tuned: `model.tune(val, k=[1, 2, 4, ..., 1024], sigma=10 values log-spaced from
    0.5 * model.sigma_scale(val) to 2)` on an independent validation sample of max(100, min(2000, n / 4)) noisy
    points (MSE objective), then evaluated on the test set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import logging as hf_logging

import resmem
from resmem import ResMemWrapper
from resmem.atomic import write_json_atomic, write_text_atomic

NOISE_STD = 0.5
SIGMA_GRID_SIZE = 10


class StylizedLinearConfig(PreTrainedConfig):
    model_type = "resmem_stylized_linear"
    input_dim: int = 2


class StylizedLinearRegressor(PreTrainedModel):
    """`f(x) = <theta, x> + b`: one `nn.Linear` head on the raw input (`pixel_values` `(B, d)`)."""

    config_class = StylizedLinearConfig
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        self.head = nn.Linear(config.input_dim, config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        pass  # the weights are set by least squares

    def forward(self, pixel_values, labels=None, **kwargs):
        return ImageClassifierOutput(logits=self.head(pixel_values.flatten(1)))


AutoConfig.register(StylizedLinearConfig.model_type, StylizedLinearConfig, exist_ok=True)
AutoModelForImageClassification.register(StylizedLinearConfig, StylizedLinearRegressor, exist_ok=True)


def target(x: np.ndarray) -> np.ndarray:
    """f*(x) = <w*, x> + g(x), w* = 1/sqrt(d) (1, ..., 1): `(n, d)` -> `(n,)`."""
    d = x.shape[1]
    return x.sum(axis=1) / math.sqrt(d) + np.sin(3 * x[:, 0]) + 0.5 * np.cos(2 * x[:, -1])


def sample(rng, n: int, d: int, noise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(-1, 1, size=(n, d))
    y = target(x) + (NOISE_STD * rng.normal(size=n) if noise else 0.0)
    return x.astype(np.float32), y.astype(np.float32)


def as_dataset(x: np.ndarray, y: np.ndarray) -> datasets.Dataset:
    """`pixel_values` `(d,)` lists + float `label`, built through arrow (fast for large n)."""
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    return datasets.Dataset(pa.table({"pixel_values": pixels, "label": pa.array(y)}))


def fit_linear(x: np.ndarray, y: np.ndarray) -> StylizedLinearRegressor:
    """Ordinary least squares with intercept (float64), copied into the tiny regressor."""
    design = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1).astype(np.float64)
    coef = np.linalg.lstsq(design, y.astype(np.float64), rcond=None)[0]
    model = StylizedLinearRegressor(StylizedLinearConfig(input_dim=x.shape[1], num_labels=1, problem_type="regression"))
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor(coef[None, :-1], dtype=torch.float32))
        model.head.bias.copy_(torch.tensor(coef[-1:], dtype=torch.float32))
    return model.eval()


def theorem_schedule(n: int, d: int) -> tuple[int, float]:
    k = min(n, math.ceil(n ** (2 / (d + 2))))
    return k, 2.0 * (k / n) ** (1 / d)


def one_run(n: int, d: int, seed: int, test: datasets.Dataset, tune_grid: list[int]) -> dict:
    rng = np.random.default_rng([seed, d, n])
    x, y = sample(rng, n, d)
    base = fit_linear(x, y)
    k, sigma = theorem_schedule(n, d)
    model = ResMemWrapper.from_base(base, k=k, sigma=sigma, layer="head:input")
    model.build_memory(as_dataset(x, y), batch_size=4096, progress=False)
    scheduled = resmem.evaluate(model, test, batch_size=4096, progress=False, record=False)
    x_val, y_val = sample(rng, max(100, min(2000, n // 4)), d)
    val = as_dataset(x_val, y_val)
    ks = [v for v in tune_grid if v <= n]
    # sigma from half the median validation-to-nearest-key distance up to the cube's side (2): the bandwidth the
    # bias-variance balance needs grows to many nearest-neighbour distances as n grows (sigma="auto" stops at 4x).
    scale = model.sigma_scale(val, batch_size=4096)
    sigmas = np.geomspace(0.5 * scale, 2.0, SIGMA_GRID_SIZE).tolist()
    tuned_result = model.tune(val, k=ks, sigma=sigmas, batch_size=4096, progress=False)
    tuned = resmem.evaluate(model, test, batch_size=4096, progress=False, record=False)
    return {
        "n": n, "d": d, "seed": seed, "k": k, "sigma": sigma,
        "base_excess": scheduled["base_mse"], "resmem_excess": scheduled["mse"],
        "tuned_excess": tuned["mse"], "tuned_k": tuned_result.best["k"], "tuned_sigma": tuned_result.best["sigma"],
    }


def mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


def slope(ns, values) -> float:
    """Least-squares slope of log(values) against log(n)."""
    return float(np.polyfit(np.log(ns), np.log(values), 1)[0])


def summarise(runs: list[dict], fit_from: int, fit_from_late: int) -> tuple[list[dict], list[dict]]:
    rows, slopes = [], []
    for d in sorted({r["d"] for r in runs}):
        ns = sorted({r["n"] for r in runs if r["d"] == d})
        for n in ns:
            group = [r for r in runs if r["d"] == d and r["n"] == n]
            row = {"d": d, "n": n, "seeds": len(group), "k": group[0]["k"], "sigma": group[0]["sigma"]}
            for key in ("base_excess", "resmem_excess", "tuned_excess"):
                row[key + "_mean"], row[key + "_se"] = mean_se([r[key] for r in group])
            row["tuned_k_median"] = float(np.median([r["tuned_k"] for r in group]))
            row["tuned_sigma_median"] = float(np.median([r["tuned_sigma"] for r in group]))
            rows.append(row)
        seeds = sorted({r["seed"] for r in runs if r["d"] == d})
        for start in dict.fromkeys((fit_from, fit_from_late)):
            fit_ns = [n for n in ns if n >= start]
            if len(fit_ns) < 2:
                continue
            entry = {"d": d, "predicted": -2 / (d + 2), "fit_n": [min(fit_ns), max(fit_ns)]}
            for key in ("base_excess", "resmem_excess", "tuned_excess"):  # one slope per seed, then mean +- s.e.
                per_seed = [
                    slope(fit_ns, [next(r[key] for r in runs if r["d"] == d and r["n"] == n and r["seed"] == s) for n in fit_ns])
                    for s in seeds
                ]
                entry[key + "_slope_mean"], entry[key + "_slope_se"] = mean_se(per_seed)
            slopes.append(entry)
    return rows, slopes


def markdown(rows: list[dict], slopes: list[dict], noise_var: float) -> str:
    lines = [
        "| d | n | k_n | sigma_n | base excess risk | ResMem excess risk (theorem k_n, sigma_n) | ResMem excess risk (tuned on validation) | tuned k (median) | base test risk | ResMem test risk |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['d']} | {r['n']:,} | {r['k']} | {r['sigma']:.3g} | {r['base_excess_mean']:.4f} ± {r['base_excess_se']:.4f} "
            f"| {r['resmem_excess_mean']:.4f} ± {r['resmem_excess_se']:.4f} | {r['tuned_excess_mean']:.4f} ± {r['tuned_excess_se']:.4f} "
            f"| {r['tuned_k_median']:g} | {r['base_excess_mean'] + noise_var:.4f} | {r['resmem_excess_mean'] + noise_var:.4f} |"
        )
    lines += ["", "| d | fitted n range | predicted slope -2/(d+2) | ResMem slope (theorem schedule) | ResMem slope (tuned) | base slope |",
              "|---|---|---|---|---|---|"]
    for s in slopes:
        lines.append(
            f"| {s['d']} | {s['fit_n'][0]:,}-{s['fit_n'][1]:,} | {s['predicted']:.3f} | {s['resmem_excess_slope_mean']:.3f} ± "
            f"{s['resmem_excess_slope_se']:.3f} | {s['tuned_excess_slope_mean']:.3f} ± {s['tuned_excess_slope_se']:.3f} | "
            f"{s['base_excess_slope_mean']:.3f} ± {s['base_excess_slope_se']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], slopes: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["d"] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(5.2 * len(dims), 4.2), squeeze=False)
    for ax, d in zip(axes[0], dims):
        sub = [r for r in rows if r["d"] == d]
        ns = np.array([r["n"] for r in sub], dtype=float)
        for key, label, marker in (("base_excess", "base (least-squares linear)", "s"),
                                   ("resmem_excess", "ResMem, theorem k_n, sigma_n", "o"),
                                   ("tuned_excess", "ResMem, tuned on validation", "^")):
            mean = np.array([r[key + "_mean"] for r in sub])
            se = np.array([r[key + "_se"] for r in sub])
            ax.errorbar(ns, mean, yerr=se, marker=marker, capsize=3, label=label)
        s = next(s for s in slopes if s["d"] == d)  # the first (wider) fit range
        anchor = np.array([r["resmem_excess_mean"] for r in sub])[len(sub) // 2]
        ref = anchor * (ns / ns[len(sub) // 2]) ** s["predicted"]
        ax.plot(ns, ref, "k--", lw=1, label=f"n^({s['predicted']:.2f}) (theorem rate)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training sample size n")
        ax.set_ylabel("excess test risk E[(pred - f*)^2]")
        ax.set_title(f"d = {d}: measured ResMem slope {s['resmem_excess_slope_mean']:.2f} vs {s['predicted']:.2f}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ns", type=int, nargs="+", default=[125 * 2**j for j in range(8)])  # 125 .. 16,000
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--fit-from", type=int, default=500, help="fit the log-log slope over n >= this")
    parser.add_argument("--fit-from-late", type=int, default=2000, help="and over n >= this (closer to the asymptote)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--smoke", action="store_true", help="3 sample sizes, 2 seeds, d=2 (seconds; run by the tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.dims, args.ns, args.seeds, args.n_test, args.fit_from, args.fit_from_late = [2], [200, 800, 3200], 2, 500, 0, 0
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    os.makedirs(args.out_dir, exist_ok=True)
    tune_grid = [2**j for j in range(11)]  # 1 .. 1024
    start = time.time()
    runs = []
    for d in args.dims:
        x_test, f_test = sample(np.random.default_rng([10_000, d]), args.n_test, d, noise=False)
        test = as_dataset(x_test, f_test)  # noiseless labels: resmem.evaluate's MSE is the excess risk
        for n in args.ns:
            for seed in range(args.seeds):
                runs.append(one_run(n, d, seed, test, tune_grid))
            last = runs[-args.seeds:]
            print(f"d={d} n={n:>6} k={last[0]['k']:>4} base {np.mean([r['base_excess'] for r in last]):.4f} "
                  f"ResMem {np.mean([r['resmem_excess'] for r in last]):.4f} tuned {np.mean([r['tuned_excess'] for r in last]):.4f} "
                  f"({time.time() - start:.0f}s)", flush=True)
    rows, slopes = summarise(runs, args.fit_from, args.fit_from_late)
    noise_var = NOISE_STD**2
    table = markdown(rows, slopes, noise_var)
    print(table)
    meta = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "wall_seconds": round(time.time() - start, 1),
            "noise_variance": noise_var, "n_test": args.n_test, "seeds": args.seeds, "threads": args.threads}
    write_json_atomic(os.path.join(args.out_dir, "regression_theory.json"), {"meta": meta, "rows": rows, "slopes": slopes, "runs": runs})
    write_text_atomic(os.path.join(args.out_dir, "regression_theory.md"), table)
    plot(rows, slopes, os.path.join(args.out_dir, "regression_theory.png"))
    print(f"wrote {args.out_dir} in {meta['wall_seconds']}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
