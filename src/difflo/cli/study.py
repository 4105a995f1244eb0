"""``difflo study`` (TEMPORARY forwarder; the parser moves here)."""
from __future__ import annotations

from ..study.cli import add_parser as register, run


def add_parser(sub) -> None:
    register(sub)
    sub.choices["study"].set_defaults(func=run)
