"""The shape every raylocal command shares: user mistakes are one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class UsageError(RuntimeError):
    """A file named on the command line is missing or unreadable."""


def run(
    parser: argparse.ArgumentParser,
    main: Callable[[argparse.Namespace], object],
    user_errors: tuple[type[Exception], ...],
    argv: list[str] | None = None,
) -> int:
    """Parse `argv`, call `main`; errors of `user_errors` are reported, not raised (unless --debug)."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except user_errors as error:
        if getattr(args, "debug", False):
            raise
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return 0
