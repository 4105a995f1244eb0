"""Shared by the benchmark scripts: the median wall time of a call."""
from __future__ import annotations

import statistics
import time


def median_time(fn, repeats: int = 7, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def child_json(cmd: list[str], what: str) -> dict:
    """Run a measuring child process (its own peak memory) and return the JSON of its last stdout line;
    a failed child stops the benchmark with ``what`` and the end of its stderr."""
    import json
    import subprocess
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{what} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])
