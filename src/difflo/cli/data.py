"""``difflo data`` (TEMPORARY forwarder; the parser moves here)."""
from __future__ import annotations

from ..data.cli import add_parser as register, run


def add_parser(sub) -> None:
    register(sub)
    sub.choices["data"].set_defaults(func=run)
