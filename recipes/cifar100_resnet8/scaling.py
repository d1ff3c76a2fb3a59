"""The paper's two scaling studies (sec. 4.3, Figure 3) with the CIFAR recipe: training-set size and network size.

Runs `train.py` once per setting, each into its own folder, then writes a table and a Figure-3 style plot of
DeepNet and ResMem test accuracy:

    python recipes/cifar100_resnet8/scaling.py --output-dir outputs/cifar10_scaling \\
        --fractions 0.1 0.25 0.5 1.0 --blocks-per-stage 1 2 3 --size-fraction 0.25 \\
        --plot outputs/cifar10_scaling/scaling.png -- \\
        --data-dir /tmp/cifar/cifar10 --epochs 12 --warmup-epochs 1 --milestones 5 9 11 --tune-on-validation 0.1 --cpu

Everything after `--` goes to every `train.py` run unchanged (data, schedule, tuning). The training-fraction
study trains CIFAR-ResNet8 on a class-balanced random share of the training images (after the validation carve,
so every point is tuned on the same validation images); the network-size study trains CIFAR-ResNet 6n+2
(n basic blocks per stage: 8, 14, 20, ...) on `--size-fraction` of them. A setting whose folder already holds a
`results.json` made with the same arguments is read, not rerun, so an interrupted study resumes where it
stopped. `--smoke` runs both studies on the tiny synthetic folder of `train.py --smoke` in seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402  (the recipe's own train.py, next to this file)

IGNORED_WHEN_RESUMING = {"output_dir", "save_model"}


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    forwarded = []
    if "--" in argv:
        cut = argv.index("--")
        argv, forwarded = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="outputs/cifar_scaling")
    p.add_argument("--fractions", type=float, nargs="*", default=[0.1, 0.25, 0.5, 1.0],
                   help="training fractions of the training-set-size study (empty: skip the study)")
    p.add_argument("--blocks-per-stage", type=int, nargs="*", default=[1, 2, 3],
                   help="basic blocks per stage of the network-size study: 1, 2, 3 -> ResNet8, 14, 20 (empty: skip)")
    p.add_argument("--size-fraction", type=float, default=1.0, help="training fraction of the network-size study")
    p.add_argument("--equal-steps", action="store_true",
                   help="scale --epochs, --warmup-epochs and --milestones by 1/fraction, so every training fraction "
                        "gets as many SGD steps as the full training set (by default each gets the same epochs)")
    p.add_argument("--plot", help="where to write the PNG (default: <output-dir>/scaling.png)")
    p.add_argument("--smoke", action="store_true", help="both studies on train.py's tiny synthetic folder")
    args = p.parse_args(argv)
    args.forwarded = forwarded
    if args.smoke:
        args.forwarded = ["--smoke", *forwarded]
        args.fractions, args.blocks_per_stage, args.size_fraction = [0.5, 1.0], [1, 2], 1.0
    return args


def run_name(blocks: int, fraction: float) -> str:
    return f"resnet{6 * blocks + 2}_fraction{fraction:g}"


def settings(args) -> dict[str, tuple[int, float]]:
    """{run name: (blocks per stage, training fraction)}; a setting in both studies runs once."""
    runs = {run_name(1, f): (1, f) for f in args.fractions}
    runs.update({run_name(b, args.size_fraction): (b, args.size_fraction) for b in args.blocks_per_stage})
    return runs


def train_argv(args, blocks: int, fraction: float, folder: str) -> list[str]:
    argv = [*args.forwarded, "--depths", str(blocks), str(blocks), str(blocks),
            "--train-fraction", f"{fraction:g}", "--output-dir", folder]
    if args.equal_steps and fraction < 1.0:
        schedule = train.parse_args(args.forwarded)  # later flags override earlier ones
        argv += ["--epochs", str(round(schedule.epochs / fraction)),
                 "--warmup-epochs", f"{schedule.warmup_epochs / fraction:g}",
                 "--milestones", *[str(round(m / fraction)) for m in schedule.milestones]]
    return argv


def finished(folder: str, argv: list[str]) -> dict | None:
    """The saved results of `folder` if they were made with the arguments `argv` would use, else None."""
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    wanted = vars(train.parse_args(argv))
    defaults = vars(train.parse_args([]))
    for key, value in wanted.items():
        if key in IGNORED_WHEN_RESUMING:
            continue
        # a key missing from an older results.json counts as that older run's default
        if saved["args"].get(key, defaults[key]) != value:
            return None
    return saved


def row(name: str, blocks: int, fraction: float, results: dict) -> dict:
    test = results["test"]
    return {
        "run": name, "depth": 6 * blocks + 2, "blocks_per_stage": blocks, "train_fraction": fraction,
        "train_examples": results.get("train_examples"), "parameters": results.get("parameters"),
        "base_accuracy": test["base_accuracy"], "resmem_accuracy": test["resmem_accuracy"],
        "tpr": test["tpr"], "fpr": test["fpr"], "gain": test["gain"],
        "k": results["hyperparameters"]["k"], "sigma": results["hyperparameters"]["sigma"],
        "temperature": results["hyperparameters"]["temperature"],
        "epochs": results["args"]["epochs"], "test_examples": test["num_examples"],
        "gain_se": gain_standard_error(test, test["num_examples"]),
        "minutes": round(results["timings_s"]["total"] / 60, 1),
    }


def gain_standard_error(r: dict, n: int) -> float:
    """Standard error of the paired accuracy difference ResMem - DeepNet on `n` test examples.

    Per example the difference is +1 (fixed: TPR), -1 (broken: FPR) or 0, so its variance is
    TPR + FPR - Gain^2.
    """
    return math.sqrt(max(0.0, r["tpr"] + r["fpr"] - r["gain"] ** 2) / n)


def count(value) -> str:
    return "?" if value is None else f"{value:,}"  # "?" for results.json files written before these were recorded


def markdown_table(rows: list[dict]) -> str:
    lines = ["| run | train images | params | epochs | DeepNet test | ResMem test | TPR | FPR | Gain (± s.e.) | rel. error reduction | k, sigma, T | wall minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reduction = (r["resmem_accuracy"] - r["base_accuracy"]) / max(1e-12, 1 - r["base_accuracy"])
        lines.append(
            f"| {r['run']} | {count(r['train_examples'])} | {count(r['parameters'])} | {r['epochs']} | {r['base_accuracy']:.2%} | "
            f"{r['resmem_accuracy']:.2%} | {r['tpr']:.2%} | {r['fpr']:.2%} | {r['gain']:+.2%} ± {r['gain_se']:.2%} | {reduction:.1%} | "
            f"{r['k']}, {r['sigma']:g}, {r['temperature']:g} | {r['minutes']} |")
    return "\n".join(lines) + "\n"


def plot(fraction_rows: list[dict], size_rows: list[dict], path: str, title: str = "") -> str:
    """Figure-3 style PNG, one column per study (training fraction, depth): DeepNet and ResMem test accuracy
    on top, ResMem's gain in points with its 95% interval (paired, +-1.96 s.e.) below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(rows, x, label) for rows, x, label in (
        (fraction_rows, "train_fraction", "fraction of the training set"),
        (size_rows, "depth", "CIFAR-ResNet depth (6n+2)"),
    ) if rows]
    fig, axes = plt.subplots(2, len(panels), figsize=(5.2 * len(panels), 6.4), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]}, sharex="col")
    for column, (rows, x, label) in enumerate(panels):
        top, bottom = axes[0][column], axes[1][column]
        rows = sorted(rows, key=lambda r: r[x])
        xs = [r[x] for r in rows]
        top.plot(xs, [100 * r["base_accuracy"] for r in rows], "o-", label="DeepNet")
        top.plot(xs, [100 * r["resmem_accuracy"] for r in rows], "s-", label="ResMem")
        top.set_ylabel("test accuracy (%)")
        top.grid(alpha=0.3)
        top.legend(loc="lower right")
        bottom.errorbar(xs, [100 * r["gain"] for r in rows], yerr=[196 * r["gain_se"] for r in rows],
                        fmt="s-", color="tab:orange", capsize=4)
        bottom.axhline(0.0, color="gray", linewidth=0.8)
        bottom.set_ylabel("ResMem gain (points, 95% CI)")
        bottom.set_xlabel(label)
        bottom.grid(alpha=0.3)
        bottom.set_xticks(xs)
        bottom.set_xticklabels([f"{v:g}" if x == "train_fraction" else f"ResNet{v}" for v in xs])
    if title:  # wrapped to the figure's width (one column is narrow)
        lines = [part for line in title.splitlines() for part in textwrap.wrap(line, width=60 * len(panels))]
        fig.suptitle("\n".join(lines), fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    smoke_dir = None
    if args.smoke and args.output_dir == "outputs/cifar_scaling":
        smoke_dir = tempfile.TemporaryDirectory(prefix="resmem-scaling-smoke-")
        args.output_dir = smoke_dir.name
    try:
        results = {}
        for name, (blocks, fraction) in settings(args).items():
            folder = os.path.join(args.output_dir, name)
            argv_run = train_argv(args, blocks, fraction, folder)
            saved = finished(folder, argv_run)
            if saved is not None:
                print(f"[scaling] {name}: reusing {folder}/results.json (same arguments)")
            else:
                print(f"[scaling] {name}: train.py {' '.join(argv_run)}")
                saved = train.main(argv_run)
            results[name] = row(name, blocks, fraction, saved)
        fraction_rows = [results[run_name(1, f)] for f in args.fractions]
        size_rows = [results[run_name(b, args.size_fraction)] for b in args.blocks_per_stage]
        summary = {"forwarded_to_train": args.forwarded, "training_fraction": fraction_rows, "network_size": size_rows}
        if train_is_main_process():
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "scaling.json"), "w") as f:
                json.dump(summary, f, indent=2)
            sections = [(f"Training fraction (CIFAR-ResNet8{', equal steps' if args.equal_steps else ''})", fraction_rows),
                        (f"Network size (training fraction {args.size_fraction:g})", size_rows)]
            text = "\n".join(f"## {title}\n\n{markdown_table(rows)}" for title, rows in sections if rows)
            with open(os.path.join(args.output_dir, "scaling.md"), "w") as f:
                f.write(text)
            title = "train.py " + " ".join(a for a in args.forwarded if a != "--cpu")
            if args.equal_steps:
                title += "\n(--equal-steps: epochs, warm-up and milestones x 1/fraction)"
            summary["plot"] = plot(fraction_rows, size_rows, args.plot or os.path.join(args.output_dir, "scaling.png"),
                                   title=title)
            print(text)
            print(f"[scaling] wrote {args.output_dir}/scaling.json, scaling.md and {summary['plot']}")
        return summary
    finally:
        if smoke_dir is not None:
            smoke_dir.cleanup()


def train_is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


if __name__ == "__main__":
    main()
