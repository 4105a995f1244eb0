"""``difflo experiment`` (TEMPORARY forwarder; the parser moves here)."""
from __future__ import annotations

from ..experiments.cli import add_parser as register, run


def add_parser(sub) -> None:
    register(sub)
    sub.choices["experiment"].set_defaults(func=run)
