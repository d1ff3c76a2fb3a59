"""`resmem tune` and `resmem eval`: subcommands for the `resmem` console entry point.

Wire them into `resmem.cli.build_parser` with::

    from .commands import add_eval_parser, add_tune_parser
    add_tune_parser(subparsers)
    add_eval_parser(subparsers)

Each registers `handler=run_tune` / `run_eval` (`args -> int` exit status). Both load a saved model
folder (or Hub id) and a dataset: an image folder (`--data-dir`, read with
`datasets.load_dataset("imagefolder", data_dir=...)`, splits from the sub-folder names) or a folder
written by `save_to_disk` (`--dataset`). They write their JSON and PNG plots side by side in
`--output-dir`. `tune` refuses the test split: hyperparameters are chosen on validation data only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TEST_SPLIT_NAMES = ("test", "testing")


# ------------------------------------------------------------------ parsers
def _add_common(p: argparse.ArgumentParser, default_split: str) -> None:
    p.add_argument("model", help="saved ResMem model folder (or Hub id 'org/name')")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="image folder: <dir>/<split>/<class name>/<image> (datasets 'imagefolder')")
    source.add_argument("--dataset", help="folder written by datasets' save_to_disk (a Dataset or DatasetDict)")
    p.add_argument("--split", default=default_split, help="split to use (default: %(default)s)")
    p.add_argument("--label-column", default="label", help="column of class ids (default: %(default)s)")
    p.add_argument("--image-column", default=None, help="column of images (default: found from the features)")
    p.add_argument(
        "--image-processor",
        default=None,
        help="image processor folder or Hub id (default: the model folder's, if it has one; "
        "not needed when the dataset has a pixel_values column)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="examples per forward pass (default: %(default)s)")
    p.add_argument("--output-dir", default="resmem_report", help="where the JSON and PNG files go (default: %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="write the JSON only (no matplotlib needed)")
    p.add_argument(
        "--save",
        action="store_true",
        help="save the model back into MODEL (a local folder) with the new settings and a model card holding these numbers",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_tune_parser(subparsers) -> argparse.ArgumentParser:
    """Register `resmem tune` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "tune",
        help="grid-search k, sigma and T on a validation split (one neighbour search), write JSON + plots",
        description=(
            "Choose ResMem's k, sigma and temperature on a validation split: one forward pass and one neighbour "
            "search at the largest k, then every combination scored from the cache. Writes tune.json (full table, "
            "best setting, sensitivity curves, per-class gain) and tune_sensitivity.png / tune_per_class_gain.png."
        ),
    )
    _add_common(p, default_split="validation")
    p.add_argument("--k", type=int, nargs="+", default=[5, 10, 20, 50, 100], help="k values (default: %(default)s)")
    p.add_argument("--sigma", type=float, nargs="+", default=[0.1, 0.3, 0.7, 1.0, 2.0], help="sigma values (default: %(default)s)")
    p.add_argument("--temperature", type=float, nargs="+", default=[0.5, 1.0, 1.4, 2.0, 3.0], help="T values (default: %(default)s)")
    p.add_argument("--objective", choices=("accuracy", "conservative"), default="accuracy", help="(default: %(default)s)")
    p.add_argument("--max-fpr", type=float, default=0.05, help="FPR bound of the conservative objective (default: %(default)s)")
    p.set_defaults(handler=run_tune)
    return p


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register `resmem eval` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "eval",
        help="base vs ResMem accuracy, TPR / FPR / Gain and per-class gain on a split, write JSON + plot",
        description="Evaluate a ResMem model with its saved k, sigma and T; writes eval.json and eval_per_class_gain.png.",
    )
    _add_common(p, default_split="test")
    p.set_defaults(handler=run_eval)
    return p


# ------------------------------------------------------------------ shared steps
def load_split(args: argparse.Namespace):
    """The dataset split named by `--split` from `--data-dir` (imagefolder) or `--dataset` (load_from_disk)."""
    import datasets

    if args.data_dir is not None:
        if not os.path.isdir(args.data_dir):
            raise SystemExit(f"error: --data-dir {args.data_dir} is not a folder; pass a folder of <split>/<class name>/<image> files")
        data = datasets.load_dataset("imagefolder", data_dir=args.data_dir)
    else:
        if not os.path.isdir(args.dataset):
            raise SystemExit(f"error: --dataset {args.dataset} is not a folder; pass a folder written by datasets' save_to_disk")
        data = datasets.load_from_disk(args.dataset)
    if isinstance(data, datasets.DatasetDict):
        if args.split not in data:
            raise SystemExit(f"error: split {args.split!r} not found; available: {sorted(data)} (pass --split)")
        return data[args.split]
    return data


def load_model(args: argparse.Namespace):
    import resmem  # noqa: F401  registers the Auto classes
    from resmem import ResMemWrapper

    return ResMemWrapper.from_pretrained(args.model)


def image_processor_for(args: argparse.Namespace, dataset):
    """`--image-processor`, else the model folder's processor, else None (fine for pixel_values datasets)."""
    if "pixel_values" in (dataset.column_names or []):
        return None
    from transformers import AutoImageProcessor

    source = args.image_processor or args.model
    try:
        return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise SystemExit(
            f"error: the dataset holds raw images but no image processor was found in {source} ({err}). "
            "Pass --image-processor <folder or Hub id>, or save one next to the model "
            "(image_processor.save_pretrained(model_folder))."
        ) from err


def align_labels(dataset, model, label_column: str):
    """Map a ClassLabel column's names onto the model's `label2id` when both name the same classes."""
    feature = dataset.features.get(label_column) if dataset.features else None
    names = getattr(feature, "names", None)
    label2id = getattr(model.config, "label2id", None) or {}
    if not names or not set(names) <= set(label2id):
        return dataset
    mapping = [int(label2id[name]) for name in names]
    if mapping == list(range(len(names))):
        return dataset
    import datasets

    dataset = dataset.cast_column(label_column, datasets.Value("int64"))
    return dataset.map(lambda y: {label_column: mapping[y]}, input_columns=label_column, desc="Mapping labels to the model's ids")


def _prepare(args):
    if args.no_progress:
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()
    model = load_model(args)
    dataset = load_split(args)
    dataset = align_labels(dataset, model, args.label_column)
    data_kwargs = dict(label_column=args.label_column, image_column=args.image_column, image_processor=image_processor_for(args, dataset))
    return model, dataset, data_kwargs


def save_back(model, path: str) -> None:
    """`--save`: write the model (settings, memory, card) back into its local folder; a Hub id is refused."""
    if not os.path.isdir(path):
        raise SystemExit(
            f"error: --save needs a local model folder; {path} is not one (the report was written, the model not "
            "saved). Drop --save, or upload with model.push_to_hub(repo_id)."
        )
    model.save_pretrained(path)
    print(f"saved the model with these settings and its model card to {path}")


# ------------------------------------------------------------------ handlers
def run_tune(args: argparse.Namespace) -> int:
    """`resmem tune`: returns the exit status."""
    if args.split.lower() in TEST_SPLIT_NAMES:
        raise SystemExit("error: tune chooses hyperparameters, so it must not see the test split; pass --split validation")
    from .reports import save_tune_report
    from .scoring import format_summary

    model, dataset, data_kwargs = _prepare(args)
    if str(getattr(dataset, "split", "") or "").lower() in TEST_SPLIT_NAMES:
        raise SystemExit("error: this dataset is a test split; tune on a validation split")
    result = model.tune(
        dataset,
        k=args.k,
        sigma=args.sigma,
        temperature=args.temperature,
        objective=args.objective,
        max_fpr=args.max_fpr,
        batch_size=args.batch_size,
        split=args.split,
        **data_kwargs,
    )
    written = save_tune_report(
        result, args.output_dir, model.base.config.num_labels, getattr(model.config, "id2label", None), plots=not args.no_plots
    )
    summary = format_summary({**result.best, "num_examples": result.num_examples, "split": args.split})
    print(f"best ({args.objective}): {summary}, {len(result)} combinations")
    print(json.dumps({"json": written["json"], "plots": written["plots"]}))
    if args.save:
        save_back(model, args.model)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """`resmem eval`: returns the exit status."""
    from .evaluation import evaluate
    from .reports import save_eval_report
    from .scoring import format_summary

    model, dataset, data_kwargs = _prepare(args)
    result = evaluate(model, dataset, batch_size=args.batch_size, split=args.split, **data_kwargs)
    written = save_eval_report(result, args.output_dir, plots=not args.no_plots)
    print(format_summary(result))
    print(json.dumps({"json": written["json"], "plots": written["plots"]}))
    if args.save:
        save_back(model, args.model)
    return 0


def main(argv=None) -> int:
    """Stand-alone entry point (`python -m resmem.commands tune ...`) until the commands are wired into `resmem`."""
    parser = argparse.ArgumentParser(prog="resmem")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_tune_parser(subparsers)
    add_eval_parser(subparsers)
    args = parser.parse_args(argv)
    from .cli import report_user_errors

    return report_user_errors(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["add_eval_parser", "add_tune_parser", "main", "run_eval", "run_tune"]
