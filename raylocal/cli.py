"""The `raylocal` command, and the shape every raylocal command shares: user mistakes are one
line on stderr and exit code 2.

`raylocal tune ...` runs `raylocal.tune`'s command line, and so on; each module also runs on its
own (`python -m raylocal.tune`, `raylocal-tune`). Commands are imported only when chosen, so
`--help` and `--version` need neither torch nor Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

COMMANDS = {
    "tune": "search hyperparameters, train the winner, export it",
    "evaluate": "score an exported model on the test split",
    "predict": "run an exported model on image files",
    "report": "the report of a search folder: trials table, plots, report.md",
    "serve": "serve an exported model over HTTP with Ray Serve",
}


class UsageError(RuntimeError):
    """A file named on the command line is missing or unreadable."""


def run(
    parser: argparse.ArgumentParser,
    main: Callable[[argparse.Namespace], object],
    user_errors: tuple[type[Exception], ...] | Callable[[], tuple[type[Exception], ...]],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse `argv`, call `main`; errors of `user_errors` are reported, not raised (unless --debug).
    `user_errors` may be a function, called only when an error needs it (its imports can be heavy)."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except Exception as error:
        expected = user_errors() if callable(user_errors) else user_errors
        if not isinstance(error, expected) or getattr(args, "debug", False):
            raise
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("raylocal")
    except PackageNotFoundError:
        return "unknown (not installed)"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raylocal", description="Hyperparameter search, training, export and serving of a digit localizer.",
        epilog="`raylocal COMMAND --help` shows a command's flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, about in COMMANDS.items():
        commands.add_parser(name, help=about, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = get_args_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help, --version, or a one-line error naming the commands
    module = importlib.import_module(f"raylocal.{argv[0]}")
    return module.cli(argv[1:], prog=f"raylocal {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
