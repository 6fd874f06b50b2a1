"""``pyserve`` console script: one sub-command per module in :mod:`pyserve.cli`.

Each sub-command module defines ``add_parser(subparsers)`` (registers its arguments and sets
``func``) and ``run(args) -> int``. Errors a user can fix are printed as one line on stderr with exit
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pyserve._version import __version__
from pyserve.cli import UsageError

__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]

# Sub-command name -> module under pyserve.cli. Modules are imported lazily so that, e.g.,
# `pyserve infer` never imports torch and `pyserve compress` never imports grpc.
COMMANDS = {
    "compress": "pyserve.cli.compress",
    "inspect": "pyserve.cli.inspect",
    "evaluate": "pyserve.cli.evaluate",
    "serve": "pyserve.cli.serve",
    "infer": "pyserve.cli.infer",
    "export": "pyserve.cli.export",
    "traffic": "pyserve.cli.traffic",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pyserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"pyserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed it: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit would fail on the closed pipe
        return 1


if __name__ == "__main__":
    sys.exit(main())
