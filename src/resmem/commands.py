"""`resmem tune` and `resmem eval`: one grammar for both tasks (image classifiers and causal LMs).

    resmem eval MODEL (--data-dir DIR | --dataset DIR | --data FILE...) [--split S] [--output-dir D] [--save]
    resmem tune MODEL (--data-dir DIR | --dataset DIR | --data FILE...) [--k ...] [--sigma auto | ...] [--save]

`build_parser` in `resmem.cli` registers both with `add_tune_parser` / `add_eval_parser`; each sets
`handler=run_tune` / `run_eval` (`args -> int` exit status). The parsers know nothing about the model:
the handler reads the saved config, takes the task from `config.task`, refuses options that do not
apply to it (naming the option that does), loads the model and the data, then

- `eval` reports at the model's saved setting only (k, sigma, T and, for an LM, its `distribution`):
  nothing is chosen on the data it reports. Writes eval.json (+ the per-class gain plot for images).
- `tune` is the only command that selects, on a validation split (it refuses a test split), and
  writes tune.json and the sensitivity plot (+ per-class gain for images).

Data: `--data-dir` (image folder, `datasets.load_dataset("imagefolder")`, splits from the sub-folder
names), `--dataset` (a folder written by `save_to_disk`, both tasks), `--data FILE...` (text files
for a causal LM, `load_dataset("text")`; they form the one split named by `--split`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

TEST_SPLIT_NAMES = ("test", "testing")
IMAGE, TEXT, TEXT_CLS = "image-classification", "causal-lm", "text-classification"
AUTO = "auto"

# Defaults that depend on the task: the parsers leave these options at None, so that an option the user
# gave can be told from one they did not (an option of the other task is an error), and fill them in here.
TASK_DEFAULTS = {
    IMAGE: {"batch_size": 256, "label_column": "label", "k": [5, 10, 20, 50, 100], "temperature": [0.5, 1.0, 1.4, 2.0, 3.0]},
    TEXT: {"batch_size": 8, "text_column": "text", "sample_by": "paragraph", "k": [10, 25, 50, 100],
           "lam": [0.25, 0.5, 0.75, 0.9]},
    TEXT_CLS: {"batch_size": 64, "label_column": "label", "text_column": "text", "k": [5, 10, 20, 50, 100],
               "temperature": [0.5, 1.0, 1.4, 2.0, 3.0]},
}

# Options of one task only: dest -> (option, what to use instead with a model of the other task).
IMAGE_ONLY = {
    "data_dir": ("--data-dir", "pass its text files with --data FILE... or a save_to_disk folder with --dataset DIR"),
    "label_column": ("--label-column", "the next token is the label; name the text column with --text-column"),
    "image_column": ("--image-column", "name the text column with --text-column"),
    "image_processor": ("--image-processor", "pass its tokenizer with --tokenizer (default: the model folder's)"),
    "temperature": ("--temperature", "a causal-LM memory's T is fixed when it is built; tune --k, --sigma and --lam "
                    "(compare temperatures with model.build_memories(data, temperatures))"),
}
TEXT_ONLY = {
    "data": ("--data", "pass an image folder with --data-dir DIR or a save_to_disk folder with --dataset DIR"),
    "tokenizer": ("--tokenizer", "pass its image processor with --image-processor (default: the model folder's)"),
    "text_column": ("--text-column", "name the image column with --image-column"),
    "sample_by": ("--sample-by", "it splits text files; images come from --data-dir or --dataset"),
    "max_tokens": ("--max-tokens", "it caps token positions; pass a smaller split to evaluate fewer images"),
    "lam": ("--lam", "the mixture weight belongs to causal LMs; tune --k, --sigma and --temperature"),
    "knn_temperature": ("--knn-temperature", "the kNN-LM belongs to causal LMs; tune --k, --sigma and --temperature"),
}
# A text classifier reads labelled texts from a save_to_disk folder with its tokenizer: no images, no LM options.
TEXT_CLS_REFUSED = {
    "data_dir": ("--data-dir", "pass a save_to_disk folder of texts and labels with --dataset DIR"),
    "data": ("--data", "text files hold no labels: pass a save_to_disk folder of texts and labels with --dataset DIR"),
    "image_column": ("--image-column", "name the text column with --text-column"),
    "image_processor": ("--image-processor", "pass its tokenizer with --tokenizer (default: the model folder's)"),
    **{dest: TEXT_ONLY[dest] for dest in ("sample_by", "max_tokens", "lam", "knn_temperature")},
}
REFUSED = {IMAGE: TEXT_ONLY, TEXT: IMAGE_ONLY, TEXT_CLS: TEXT_CLS_REFUSED}
TASK_NAMES = {IMAGE: "an image classifier", TEXT: "a causal LM", TEXT_CLS: "a text classifier"}


# ------------------------------------------------------------------ parsers
def _sigma_value(text: str):
    """`--sigma` values: numbers, or the word `auto` (a grid in units of `model.sigma_scale()`)."""
    if text.lower() == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid sigma {text!r}: pass numbers > 0 or the word auto") from None


def _knn_temperature_value(text: str):
    """`--knn-temperature` values: numbers, or the word `sigma` (the sigma grid's values)."""
    if text.lower() == "sigma":
        return "sigma"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid knn temperature {text!r}: pass numbers > 0 or the word sigma") from None


def _add_common(p: argparse.ArgumentParser, default_split: str, what: str) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL", help="saved ResMem model folder (or Hub id 'org/name'), either task")
    p.add_argument("--model", dest="model_option", metavar="MODEL", help="same as the positional MODEL (older scripts)")
    both = p.add_argument_group("data (both tasks)", "pass exactly one of --data-dir, --dataset, --data")
    both.add_argument("--dataset", metavar="DIR", help="folder written by datasets' save_to_disk (a Dataset or DatasetDict)")
    both.add_argument("--split", default=default_split,
                      help=f"split to {what}; with --data, the name recorded for the text files (default: %(default)s)")
    both.add_argument("--batch-size", type=int, default=None, help="examples (images) or windows (text) per forward "
                      "pass (default: 256 for images, 8 for text)")
    image = p.add_argument_group("image data", "options for an image classifier (config.task 'image-classification')")
    image.add_argument("--data-dir", metavar="DIR", help="image folder: DIR/<split>/<class name>/<image> (datasets 'imagefolder')")
    image.add_argument("--label-column", default=None, help="column of class ids (default: label)")
    image.add_argument("--image-column", default=None, help="column of images (default: found from the features)")
    image.add_argument("--image-processor", default=None, help="image processor folder or Hub id (default: the model "
                       "folder's, if it has one; not needed when the dataset has a pixel_values column)")
    text = p.add_argument_group("text data (causal LM)", "options for a causal LM (config.task 'causal-lm')")
    text.add_argument("--data", nargs="+", metavar="FILE", help="text file(s) (.txt, .txt.gz) read with "
                      "load_dataset('text'); name MODEL before them (or use --model)")
    text.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: the model folder's)")
    text.add_argument("--text-column", default=None, help="column of texts in --dataset (default: text)")
    text.add_argument("--sample-by", default=None, choices=["line", "paragraph", "document"],
                      help="how --data files are cut into texts (default: paragraph)")
    text.add_argument("--max-tokens", type=int, default=None, help="stop after this many evaluated token positions")
    out = p.add_argument_group("output")
    out.add_argument("--output-dir", default="resmem_report", help="where the JSON and PNG files go (default: %(default)s)")
    out.add_argument("--no-plots", action="store_true", help="write the JSON only (no matplotlib needed)")
    out.add_argument("--save", action="store_true", help="save the model back into MODEL (a local folder) with its "
                     "settings and a model card holding these numbers")
    out.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_tune_parser(subparsers) -> argparse.ArgumentParser:
    """Register `resmem tune` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "tune",
        allow_abbrev=False,
        help="choose k, sigma and T (images) or the mixture weight (LMs) on a validation split; write JSON + plots",
        description=(
            "Choose ResMem's settings on a validation split, from one forward pass and one neighbour search at the "
            "largest k: k, sigma and T for an image classifier; k, sigma and the mixture weight --lam for a causal "
            "LM. The only command that selects anything; it refuses a test split. Writes tune.json (table, best "
            "setting, sensitivity curves) and tune_sensitivity.png (+ tune_per_class_gain.png for images)."
        ),
    )
    _add_common(p, default_split="validation", what="tune on")
    grid = p.add_argument_group("grid")
    grid.add_argument("--k", type=int, nargs="+", default=None,
                      help="neighbour counts (default: 5 10 20 50 100 for images, 10 25 50 100 for text)")
    grid.add_argument("--sigma", type=_sigma_value, nargs="+", default=[AUTO],
                      help="kernel widths, or auto: a grid in units of the median distance from a point to its "
                      "nearest memory key, model.sigma_scale() (default: auto)")
    grid.add_argument("--temperature", type=float, nargs="+", default=None,
                      help="image classifiers: T values (default: 0.5 1 1.4 2 3)")
    grid.add_argument("--lam", "--mixture-lambda", dest="lam", type=float, nargs="*", default=None,
                      help="causal LMs: mixture weights of the base distribution; none at all (--lam) leaves "
                      "config.mixture_lambda (default: 0.25 0.5 0.75 0.9)")
    grid.add_argument("--knn-temperature", dest="knn_temperature", type=_knn_temperature_value, nargs="+", default=None,
                      help="causal LMs: also try the kNN-LM of the same memory (config.distribution knn-lm) at these "
                      "kernel temperatures, or sigma to reuse the sigma grid; chosen when its validation perplexity is "
                      "the lowest (default: not tried unless the model is in the knn-lm mode)")
    grid.add_argument("--objective", choices=("accuracy", "conservative"), default="accuracy",
                      help="accuracy, or conservative: the highest TPR with FPR < --max-fpr (default: %(default)s)")
    grid.add_argument("--max-fpr", type=float, default=0.05, help="FPR bound of the conservative objective (default: %(default)s)")
    p.set_defaults(handler=run_tune)
    return p


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register `resmem eval` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "eval",
        allow_abbrev=False,
        help="base vs ResMem accuracy, TPR / FPR / Gain (+ perplexity for LMs) at the saved setting; write JSON",
        description=(
            "Evaluate a saved ResMem model at its saved setting (k, sigma, T and, for a causal LM, its distribution "
            "and mixture weight): nothing is chosen on the data reported; use `resmem tune` on a validation split for "
            "that. Writes eval.json (+ eval_per_class_gain.png for images)."
        ),
    )
    _add_common(p, default_split="test", what="evaluate")
    p.set_defaults(handler=run_eval)
    return p


# ------------------------------------------------------------------ checks after parsing
def _error(message: str):
    """A user error: `resmem.cli.report_user_errors` prints it as one line and exits with status 2."""
    return SystemExit(f"error: {message}")


def model_path(args: argparse.Namespace) -> str:
    """MODEL, given positionally or with `--model` (not both, unless they agree)."""
    if args.model and args.model_option and args.model != args.model_option:
        raise _error(f"MODEL given twice ({args.model} and --model {args.model_option}): pass one")
    path = args.model or args.model_option
    command = getattr(args, "command", None) or "COMMAND"
    folders = [f for f in (args.data or []) if os.path.isdir(f)]
    if not path and folders:  # `--data FILE... MODEL`: the model folder was read as one more text file
        raise _error(f"--data took the folder {folders[0]} as a text file: name the model first, "
                     f"resmem {command} {folders[0]} --data FILE... (or --model {folders[0]})")
    if not path:
        raise _error(f"name the saved model first: resmem {command} MODEL --data-dir DIR | --dataset DIR | --data FILE... "
                     "(or --model MODEL)")
    return path


def _check_data_source(args: argparse.Namespace) -> None:
    given = [opt for opt, value in (("--data-dir", args.data_dir), ("--dataset", args.dataset), ("--data", args.data))
             if value is not None]
    if len(given) != 1:
        what = "no data" if not given else f"{' and '.join(given)} together"
        raise _error(f"{what}: pass exactly one of --data-dir DIR (image folder), --dataset DIR (save_to_disk folder) "
                     "or --data FILE... (text files, causal LMs)")


def check_task_options(args: argparse.Namespace, task: str) -> None:
    """Refuse an option of the other task, naming what to use instead; fill in the task's defaults."""
    if task not in TASK_NAMES:
        raise _error(f"the saved model's task {task!r} has no command line; expected one of {sorted(TASK_NAMES)}")
    for dest, (option, instead) in REFUSED[task].items():
        if getattr(args, dest, None) is not None:
            raise _error(f"{option} does not apply: the model is {TASK_NAMES[task]} (config.task {task!r}); {instead}")
    for dest, value in TASK_DEFAULTS[task].items():
        if hasattr(args, dest) and getattr(args, dest) is None:
            setattr(args, dest, list(value) if isinstance(value, list) else value)


def _sigma_grid(values: list):
    """`--sigma`: the word auto alone (passed through as "auto"), or numbers."""
    if AUTO in values:
        if len(values) > 1:
            raise _error("--sigma takes numbers or the single word auto, not both")
        return AUTO
    return values


# ------------------------------------------------------------------ loading
def load_task(path: str) -> str:
    """`config.task` of the saved model at `path` (reads config.json only, no weights)."""
    from .configuration_resmem import ResMemConfig
    from .hub import check_model_location

    check_model_location(path)
    if not os.path.isdir(path) and "/" not in path:
        # A bare name is a valid Hub id ("gpt2"), but a resmem model on the Hub is always "org/name": a bare name
        # that is not a folder here is a mistyped folder, not worth transformers' Hub retries.
        raise _error(f"MODEL {path} is not a folder (relative paths start at {os.getcwd()}); pass the folder "
                     "save_pretrained wrote, or a Hub repo id such as 'org/name'")
    return ResMemConfig.from_pretrained(path).task


def load_model(path: str):
    import resmem  # noqa: F401  registers the Auto classes
    from resmem import ResMemWrapper

    return ResMemWrapper.from_pretrained(path)


def check_data_paths(args: argparse.Namespace) -> None:
    """Refuse a missing `--data` file, `--data-dir` or `--dataset` folder (before any weights are loaded)."""
    if args.data is not None:
        missing = [f for f in args.data if not os.path.isfile(f)]
        if missing:
            raise _error(f"--data {missing[0]} is not a file; pass text files (.txt, .txt.gz), or a save_to_disk folder "
                         "with --dataset")
    elif args.data_dir is not None:
        if not os.path.isdir(args.data_dir):
            raise _error(f"--data-dir {args.data_dir} is not a folder; pass a folder of <split>/<class name>/<image> files")
    elif not os.path.isdir(args.dataset):
        raise _error(f"--dataset {args.dataset} is not a folder; pass a folder written by datasets' save_to_disk")


def load_split(args: argparse.Namespace):
    """The data: the `--split` of `--data-dir` (imagefolder) or `--dataset` (load_from_disk), or the `--data` files."""
    import datasets

    check_data_paths(args)
    if args.data is not None:
        return datasets.load_dataset("text", data_files=list(args.data), sample_by=args.sample_by, split="train")
    if args.data_dir is not None:
        data = datasets.load_dataset("imagefolder", data_dir=args.data_dir)
    else:
        data = datasets.load_from_disk(args.dataset)
    if isinstance(data, datasets.DatasetDict):
        if args.split not in data:
            raise _error(f"split {args.split!r} not found; available: {sorted(data)} (pass --split)")
        return data[args.split]
    return data


def image_processor_for(args: argparse.Namespace, dataset, path: str):
    """`--image-processor`, else the model folder's processor, else None (fine for pixel_values datasets)."""
    if "pixel_values" in (dataset.column_names or []):
        return None
    from transformers import AutoImageProcessor

    source = args.image_processor or path
    try:
        return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise _error(
            f"the dataset holds raw images but no image processor was found in {source} ({err}). "
            "Pass --image-processor <folder or Hub id>, or save one next to the model "
            "(image_processor.save_pretrained(model_folder))."
        ) from err


def tokenizer_for(args: argparse.Namespace, model, path: str):
    """`--tokenizer`, else the model folder's; checked against the memory's tokenizer."""
    from transformers import AutoTokenizer

    source = args.tokenizer or path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise _error(f"no tokenizer found in {source} ({err}). Pass --tokenizer <folder or Hub id>, or save it next "
                     "to the model (tokenizer.save_pretrained(model_folder))") from err
    if hasattr(model, "check_tokenizer"):  # causal LMs: the memory's next tokens are ids of one vocabulary
        model.check_tokenizer(tokenizer)
    return tokenizer


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


@contextlib.contextmanager
def progress_bars(show: bool):
    """Hide the transformers and datasets progress bars inside the block when `show` is False (restored after);
    with `show` True, leave them as they are (e.g. hidden by the user's own `disable_progress_bar()`)."""
    if show:
        yield
        return
    from datasets.utils import logging as ds_logging
    from transformers.utils import logging as tf_logging

    before = tf_logging.is_progress_bar_enabled(), ds_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        for module, on in zip((tf_logging, ds_logging), before):
            module.enable_progress_bar() if on else module.disable_progress_bar()


def _prepare(args: argparse.Namespace):
    """`(path, model, data, data_kwargs)` after checking the options against the saved model's task."""
    path = model_path(args)
    _check_data_source(args)
    task = load_task(path)
    check_task_options(args, task)
    check_data_paths(args)
    model = load_model(path)
    data = load_split(args)
    if task == TEXT:
        data_kwargs = dict(tokenizer=tokenizer_for(args, model, path), text_column=args.text_column)
    elif task == TEXT_CLS:
        data = align_labels(data, model, args.label_column)
        data_kwargs = dict(label_column=args.label_column, text_column=args.text_column,
                           tokenizer=tokenizer_for(args, model, path))
    else:
        data = align_labels(data, model, args.label_column)
        data_kwargs = dict(label_column=args.label_column, image_column=args.image_column,
                           image_processor=image_processor_for(args, data, path))
    return path, model, data, data_kwargs


def save_back(model, path: str) -> None:
    """`--save`: write the model (settings, memory, card) back into its local folder; a Hub id is refused."""
    if not os.path.isdir(path):
        raise _error(
            f"--save needs a local model folder; {path} is not one (the report was written, the model not "
            "saved). Drop --save, or upload with model.push_to_hub(repo_id)."
        )
    model.save_pretrained(path)
    print(f"saved the model with these settings and its model card to {path}")


def _is_test_split(name) -> bool:
    return str(name or "").lower() in TEST_SPLIT_NAMES


# ------------------------------------------------------------------ handlers
def run_eval(args: argparse.Namespace) -> int:
    """`resmem eval`: evaluate at the saved setting; returns the exit status."""
    from .evaluation import evaluate
    from .reports import save_eval_report
    from .scoring import format_summary

    with progress_bars(not args.no_progress):
        path, model, data, data_kwargs = _prepare(args)
        result = evaluate(model, data, split=args.split, batch_size=args.batch_size, max_tokens=args.max_tokens,
                           progress=not args.no_progress, **data_kwargs)
    # Per-class gain exists for classifiers only: an LM's report is eval.json alone.
    written = save_eval_report(result, args.output_dir, plots=not args.no_plots and "per_class" in result)
    print(format_summary(result))
    print(json.dumps({"json": written["json"], "plots": written["plots"]}))
    if args.save:
        save_back(model, path)
    return 0


def run_tune(args: argparse.Namespace) -> int:
    """`resmem tune`: choose the setting on a validation split; returns the exit status."""
    if _is_test_split(args.split):
        raise _error("tune chooses hyperparameters, so it must not see the test split; pass --split validation")
    sigma = _sigma_grid(args.sigma)
    from .regression import is_regression
    from .reports import save_tune_report
    from .scoring import format_summary

    temperature_given = getattr(args, "temperature", None) is not None  # before _prepare fills the image default
    with progress_bars(not args.no_progress):
        path, model, data, data_kwargs = _prepare(args)
        if _is_test_split(getattr(data, "split", None)):
            raise _error("this dataset is a test split; tune on a validation split")
        common = dict(k=args.k, sigma=sigma, objective=args.objective, max_fpr=args.max_fpr, batch_size=args.batch_size,
                      split=args.split, **data_kwargs)
        if model.config.task == TEXT:
            knn = args.knn_temperature
            knn = "sigma" if knn and "sigma" in knn else knn  # `--knn-temperature sigma`: the sigma grid
            result = model.tune(data, mixture_lambda=args.lam or None, max_tokens=args.max_tokens, knn_temperature=knn,
                                **common)
        elif is_regression(model.base.config):  # no temperature: residuals y - f(x), tuned by validation MSE
            if temperature_given:
                raise _error("--temperature does not apply: the model is a regressor (problem_type 'regression', no softmax)")
            result = model.tune(data, **common)
        else:
            result = model.tune(data, temperature=args.temperature, **common)
    if model.config.task == TEXT:
        written = save_tune_report(result, args.output_dir, plots=not args.no_plots, title=(
            f"ResMem sensitivity ({args.objective}, {result.num_examples} validation token positions, "
            f"T={model.config.residual_temperature:g})"))
    else:
        written = save_tune_report(result, args.output_dir, model.base.config.num_labels,
                                   getattr(model.config, "id2label", None), plots=not args.no_plots)
    unit = "token positions" if model.config.task == TEXT else "examples"
    summary = format_summary({**result.best, "num_examples": result.num_examples, "unit": unit, "split": args.split})
    print(f"best ({args.objective}): {summary}, {len(result)} combinations")
    print(json.dumps({"json": written["json"], "plots": written["plots"]}))
    if args.save:
        save_back(model, path)
    return 0


__all__ = ["add_eval_parser", "add_tune_parser", "progress_bars", "run_eval", "run_tune"]
