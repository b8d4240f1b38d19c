"""Command line of the search: `raylocal tune`, `python -m raylocal.tune --trials 50`.

Starts (or joins) one Ray instance, synthesizes the data once with Ray Data, runs a Ray Tune
search with Optuna's TPE sampler and ASHA, trains the winner on every worker for the rest of the
time budget, then scores that model on the test split and exports it (`raylocal.pipeline`).
Every flag is a field of `raylocal.settings.Settings`; `raylocal.search(...)` takes the same.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from raylocal.settings import Settings, add_flags


def get_args_parser(prog: str = "raylocal-tune") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Search hyperparameters of a digit localizer (MNIST on 75x75 canvases) with Ray Tune + Optuna, "
        "train the best on every worker, and export it.",
    )
    return add_flags(parser)


def main(args: argparse.Namespace) -> dict[str, Any]:
    from raylocal.pipeline import run

    return run(Settings.from_args(args))


def user_errors() -> tuple[type[Exception], ...]:
    from raylocal.config import ConfigError
    from raylocal.export import ExportError
    from raylocal.mnist import IdxFormatError, MnistHashError, MnistNotFoundError

    return (ConfigError, ExportError, IdxFormatError, MnistHashError, MnistNotFoundError)


def cli(argv: list[str] | None = None, prog: str = "raylocal-tune") -> int:
    from raylocal.cli import run

    return run(get_args_parser(prog), main, user_errors, argv)


if __name__ == "__main__":
    sys.exit(cli())
