"""`python -m training ...` / `torchrun --nproc_per_node N -m training ...` (same flags as
`adapter-server train`)."""

from __future__ import annotations

import argparse
import sys

from server.cli import run_command

from .cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
