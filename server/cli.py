"""`adapter-server` command line: each area registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from model.cpu_memory import keep_freed_memory

# Modules exposing `register(subparsers)`; each subparser sets `func(args) -> int | None`.
SUBCOMMAND_MODULES = (
    "model.cli",        # generate, fetch-default
    "adapters.cli",     # adapters import/list/show/delete/export
    "server.generate",  # generate
    "server.serve",     # serve
    "server.api_keys",  # keys new/hash
    "server.bench",     # bench
    "training.cli",     # train
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapter-server",
        description="Serve and train LLaMA-Adapter adapters on one frozen LLaMA.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:   # a real missing dependency, not a not-yet-built area
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


def run_command(func, args: argparse.Namespace) -> int:
    """Run a subcommand with logging set up and user-facing errors as one line (exit 2)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: thousands of lines from the bench's HTTP rows.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    keep_freed_memory()     # before any tensor: every subcommand runs forwards on CPU
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        # User-facing failures (bad checkpoint, bad adapter, offline...) are one line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
