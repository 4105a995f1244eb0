"""Shared by the bad-input tests: run the CLI in-process, check for one clean error line, count inputs.

``call(argv)`` (``run_cli(*argv)``) and ``assert_clean_error`` are conftest's, the ``assert_clean_error`` (the one
helper of the suite: exit code 2, one ``difflo[ COMMAND]: error: ...`` line, no traceback).
``tally(name)`` counts the inputs each test tried; with ``DIFFLO_INPUT_COUNTS=FILE`` in the
environment the counts are written to FILE as JSON when the test session ends (the README's numbers).
"""
from __future__ import annotations

import atexit
import collections
import json
import os

from hypothesis import HealthCheck, settings

from conftest import assert_clean_error, run_cli  # noqa: F401  (the suite's one CLI-error helper)

COUNTS: collections.Counter = collections.Counter()


def call(argv) -> tuple[int, str, str]:
    return run_cli(*argv)


def fuzz(n: int):
    """Hypothesis settings of these tests: n examples, reproducible (derandomized), no deadline."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.filter_too_much, HealthCheck.data_too_large])


def tally(name: str, n: int = 1) -> None:
    COUNTS[name] += n


@atexit.register
def _write_counts() -> None:
    path = os.environ.get("DIFFLO_INPUT_COUNTS")
    if path and COUNTS:
        with open(path, "w") as f:
            json.dump({"total": sum(COUNTS.values()), **dict(sorted(COUNTS.items()))}, f, indent=1)
