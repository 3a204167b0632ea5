"""`adapter-server` subcommands of the model area."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    fetch = subparsers.add_parser(
        "fetch-default",
        help="download and convert the embedded default model (once) and print its directory")
    fetch.set_defaults(func=_fetch_default)


def _fetch_default(args: argparse.Namespace) -> int:
    from .default_model import default_model_dir  # noqa: PLC0415

    print(default_model_dir())
    return 0
