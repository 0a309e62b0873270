"""The ``latticewatch`` command line: ``main([...]) -> exit code``.

One module per command group registers its commands (``register(sub)``); this module builds
the top parser, sets up logging and applies the one error policy: a
`~latticewatch.errors.LatticewatchError` — or an `OSError`, e.g. a file the user named that is
not there — becomes one ``error: <message>`` line on stderr and exit code 2, never a traceback
(``-vv`` logs it). Exit code 1 means the command did its work but some files or frames failed,
each named on stderr. The codes are defined once, in `latticewatch.cli.common`. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from latticewatch import __version__
from latticewatch.cli import archive, batch, bench, calibrate, daemon, evaluate, models, process, simulate, sort, train
from latticewatch.cli import compile as compile_plans  # the module's own name would hide the builtin here
from latticewatch.cli.common import EXIT_OK, EXIT_USAGE, fail
from latticewatch.errors import LatticewatchError

__all__ = ["Parser", "build_parser", "main"]

log = logging.getLogger(__name__)

#: Command groups in the order ``latticewatch --help`` lists them: analysing files, the daemon,
#: the archive, profiles and their training, then speed.
COMMAND_GROUPS = (process, batch, sort, daemon, archive, models, evaluate, calibrate, train, simulate, bench,
                  compile_plans)


class Parser(argparse.ArgumentParser):
    """argparse with the one message format: a bad option is one ``error:`` line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``latticewatch`` parser with every command (no command's heavy imports happen here)."""
    parser = Parser(
        prog="latticewatch",
        description="Live analysis of HRTEM micrographs of nanoparticles: U-Net segmentation of crystalline "
        "particles, region measurement in nm, stacking-fault classification, archive. Exit codes: 0 done; "
        "1 done, but some files or frames failed (each named on stderr); 2 a user error (bad option, file, "
        "profile or config), named on stderr.",
    )
    parser.add_argument("--version", action="version", version=f"latticewatch {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``latticewatch`` command; returns its exit code.

    Examples
    --------
    >>> main(["check-config", "/nonexistent/lw.toml"])  # doctest: +SKIP
    error: /nonexistent/lw.toml: cannot read: No such file or directory
    2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in trained models' manifests
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BrokenPipeError:  # `latticewatch … --json | head`: the reader left; nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return EXIT_OK
    except (LatticewatchError, OSError) as err:
        log.debug("%s failed", args.command, exc_info=True)
        return fail(err)
