"""Whether other processes shared the CPU while this one measured something.

A throughput (images/s, minutes to a budget) means something only on an otherwise idle machine. On
Linux the kernel counts every core's busy time (``/proc/stat``: user, nice, system, irq, softirq and
steal, the time a hypervisor gave the core to another machine); this process's own CPU time
(``os.times``: user + system, all its threads) is the part that was ours. The rest, over the wall time
and the number of cores, is the share of the machine that others took:

    other share = (busy_cores_seconds - own_cpu_seconds) / (wall_seconds * cores)

0 on an idle machine, 0.5 when another process kept one of two cores busy. Where ``/proc/stat`` is
missing (not Linux) the share is None: unknown, and said so.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

STAT = Path("/proc/stat")
DISTURBED = 0.10          # others took more than 10 % of the machine: a throughput is not comparable


def busy_seconds(stat: Path = STAT) -> float | None:
    """All cores' busy CPU seconds since boot (None without /proc/stat)."""
    try:
        fields = stat.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (ticks + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class OtherLoad:
    """Measures the share of the machine other processes used from construction (or ``restart``)
    until ``share()`` is asked; ``clock``/``stat`` are injectable for tests."""

    def __init__(self, stat: Path = STAT, clock=time.monotonic, own=own_seconds, cores: int | None = None):
        self.stat, self.clock, self.own = stat, clock, own
        self.cores = cores or os.cpu_count() or 1
        self.restart()

    def restart(self) -> None:
        self.t0, self.busy0, self.own0 = self.clock(), busy_seconds(self.stat), self.own()

    def share(self) -> float | None:
        busy = busy_seconds(self.stat)
        wall = self.clock() - self.t0
        if busy is None or self.busy0 is None or wall <= 0:
            return None
        others = (busy - self.busy0) - (self.own() - self.own0)
        return min(1.0, max(0.0, others / (wall * self.cores)))


def describe(share: float | None) -> str:
    if share is None:
        return "other processes' CPU use unknown (no /proc/stat)"
    return f"other processes used {100 * share:.0f} % of the {os.cpu_count()} cores"
