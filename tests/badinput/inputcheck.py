"""Shared by the bad-input tests: run the CLI in-process, check for one clean error line, count inputs.

``call(argv)`` runs ``difflo.cli.main`` with stdout/stderr captured (argparse errors raise
SystemExit). ``assert_clean_error`` checks the contract of every bad input: exit code 2, exactly
one line on stderr of the form ``difflo[ COMMAND]: error: ...``, and no traceback.
``tally(name)`` counts the inputs each test tried; with ``DIFFLO_INPUT_COUNTS=FILE`` in the
environment the counts are written to FILE as JSON when the test session ends (the README's numbers).
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import io
import json
import os
import re

from hypothesis import HealthCheck, settings

from difflo.cli import main

COUNTS: collections.Counter = collections.Counter()
ERROR_LINE = re.compile(r"^difflo( [\w-]+)*: error: \S")


def fuzz(n: int):
    """Hypothesis settings of these tests: n examples, reproducible (derandomized), no deadline."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.filter_too_much, HealthCheck.data_too_large])


def tally(name: str, n: int = 1) -> None:
    COUNTS[name] += n


def call(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def assert_clean_error(code, err: str, *needles: str) -> str:
    """Exit 2, one `difflo...: error: ...` line, no traceback; returns the line."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and ERROR_LINE.match(lines[0]), (code, err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@atexit.register
def _write_counts() -> None:
    path = os.environ.get("DIFFLO_INPUT_COUNTS")
    if path and COUNTS:
        with open(path, "w") as f:
            json.dump({"total": sum(COUNTS.values()), **dict(sorted(COUNTS.items()))}, f, indent=1)
