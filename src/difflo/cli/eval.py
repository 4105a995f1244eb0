"""``difflo eval`` (TEMPORARY forwarder; the parser moves here)."""
from __future__ import annotations

from ..eval.cli import add_parser as register, run


def add_parser(sub) -> None:
    register(sub)
    sub.choices["eval"].set_defaults(func=run)
