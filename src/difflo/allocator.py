"""Keep glibc's allocator from returning large tensors' memory to the kernel at every op.

glibc serves allocations above its mmap threshold (dynamic, at most 32 MB) with a fresh ``mmap``
and unmaps them on ``free``, so every page of every large activation faults again at every op:
sampling the demo model spent 0.62 (200 images per network call) to 0.91 (500 per call) seconds of
system time per second of user time (benchmarks/malloc.txt). :func:`tune_malloc` sets, through
``mallopt``, what the environment variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` /
``MALLOC_TOP_PAD_`` would. ``heap`` (the default) serves every block from the heap (no mmap), never trims the heap's top and
pads it by 256 MB, so freed blocks of any size are reused; ``threshold`` only fixes the mmap
threshold at its largest, 32 MB (glibc's dynamic threshold starts at 128 kB), which is enough at
200 images per network call but not at 500, where activations exceed 32 MB.
The peak footprint is unchanged (freed blocks are reused, not added), but the process does not
shrink back between ops.

It runs once per process (the CLI, ``train`` and ``generate`` call it), only where the C library is
glibc, and not when ``DIFFLO_MALLOC_TUNING=0`` (benchmarks compare with and without) or when the
user already set one of those variables. The choice of settings is measured by
``benchmarks/malloc.py``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
SETTINGS = {                                   # benchmarks/malloc.py measures these against each other
    "heap": ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 1 << 62), (M_TOP_PAD, 256 << 20)),
    "threshold": ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 62), (M_TOP_PAD, 256 << 20)),
}
DEFAULT = "heap"            # measured (benchmarks/malloc.txt): "threshold" still faults on blocks > 32 MB

_state: dict = {}


def glibc():
    """The C library as a ctypes handle if it is glibc, else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        return libc
    except (OSError, AttributeError):
        return None


def tune_malloc(setting: str | None = None) -> str:
    """Apply the allocator setting once per process; returns what was done (for logs and benchmarks)."""
    if "done" in _state:
        return _state["done"]
    setting = setting or os.environ.get("DIFFLO_MALLOC_TUNING", DEFAULT)
    if setting in ("0", "off"):
        result = "off (DIFFLO_MALLOC_TUNING=0)"
    elif any(v in os.environ for v in ENV):
        result = "off (MALLOC_* set in the environment)"
    elif setting not in SETTINGS:
        result = f"off (unknown DIFFLO_MALLOC_TUNING={setting!r}; choose {', '.join(SETTINGS)} or 0)"
    elif (libc := glibc()) is None:
        result = "off (not glibc)"
    else:
        ok = all(libc.mallopt(param, ctypes.c_int(min(value, 2**31 - 1))) == 1 for param, value in SETTINGS[setting])
        result = setting if ok else f"partly ({setting}: mallopt refused a value)"
    _state["done"] = result
    return result
