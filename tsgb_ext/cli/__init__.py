"""The ``tsgb`` command line.

    tsgb demo --out DIR [--top-k 3] [--device auto|cpu|cuda] [--backend auto|native|hooks]
    tsgb explain INPUT... --out DIR [...]
    tsgb eval grid|pointing DIR [...]
    python -m tsgb_ext.cli demo --out DIR

One module per command (:mod:`.demo`, :mod:`.explain`, :mod:`.eval`), each with
``register(subparsers)`` (its options; ``set_defaults(func=run)``) and ``run(args) -> int``;
add a command by adding a module and listing it in :data:`COMMANDS`. Shared checks are in
:mod:`._common`; the output folder of ``explain`` (shards, index, lock, resume) is the map store
of :mod:`tsgb_ext.io.store`. Nothing else in tsgb_ext imports this package.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import demo, eval as eval_, explain
from ._common import CLIError

#: the commands, in the order ``tsgb --help`` lists them
COMMANDS = (demo, explain, eval_)

__all__ = ["main", "build_parser", "CLIError", "COMMANDS"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = argparse.ArgumentParser(
        prog="tsgb", description="Target-Selective Gradient Backprop (TSGB) saliency maps.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None, hooks=None) -> int:
    """Run the ``tsgb`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.
    ``hooks``: a :class:`tsgb_ext.io.StoreHooks` for tests (failpoints of ``explain``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.hooks = hooks
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        parser.exit(2, f"{parser.prog} {args.command}: error: {e}\n")


if __name__ == "__main__":  # pragma: no cover  (python -m tsgb_ext.cli runs __main__.py)
    sys.exit(main())
