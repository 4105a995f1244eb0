"""``difflo`` command line: train, sample, demo, data, edit, eval, experiment, study, serve, export, ema, distill, env.

One module per subcommand (``cli/train.py``, ``cli/sample.py``, ...), each with ``add_parser(sub)``
that sets ``func=run`` (``main`` calls ``args.func(args)``; a command with subcommands of its own
gives each its own function, which ``run`` calls, e.g. ``eval.run_fid``). The modules parse
arguments and call the library (``difflo.generate``, ``difflo.edit.techniques``, ...), never each
other's parsers. Choices come from the registries that own them (``samplers.SAMPLERS``, ``schedules.SPACINGS``, ``editing.VIEWS``).

Every user error (bad config, missing checkpoint, class out of range, unwritable output...) is
printed as one line ``difflo: error: ...`` with exit code 2; never a traceback. SIGINT/SIGTERM
during ``train``/``demo`` training write a checkpoint, print how to resume and exit with 130/143.
"""
from __future__ import annotations

import argparse
import errno
import sys

from .. import __version__, allocator
from ..errors import DiffloError
from . import data, demo, distill, edit, ema, env, eval, experiment, export, sample, serve, study, train

SUBCOMMANDS = (train, sample, demo, data, edit, eval, experiment, study, serve, export, ema, distill,
               env)   # in --help order


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: ``difflo CMD: error: ... (see difflo CMD --help)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="difflo", description="Train and sample class-conditional diffusion models.")
    p.add_argument("--version", action="version", version=f"difflo {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return p


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def one_line(message: str) -> str:
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    allocator.tune_malloc()                     # large tensors stay in the heap between ops (difflo.allocator)
    try:
        return args.func(args)
    except DiffloError as e:
        print(f"difflo: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:                     # the disk filled up or became read-only mid-run
        if e.errno not in DISK_ERRNOS:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"difflo: error: {e.strerror}{where}; free disk space or fix the permissions, then run again "
              f"(difflo train: with --resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difflo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
