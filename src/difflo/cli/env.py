"""``difflo env``: what difflo decides on this machine and why, without training anything.

Prints the CPU (model, the flags that matter for speed, torch's CPU capability), the threads, the
allocator setting (:mod:`difflo.allocator`), what ``precision: auto`` runs here with its measured
bf16/fp32 ratios (:mod:`difflo.precision`), the memory layout training batches take in that type, the
GPU if any, the cache folder, and how to override each decision. ``--remeasure`` times bf16 against fp32
again and stores the new answer; ``--json`` prints the same as one JSON object (for bug reports and
benchmark logs).
"""
from __future__ import annotations

import json
import os
import platform

from .. import __version__, allocator, precision
from ..io import cache_home

OVERRIDES = (
    ("precision", "--precision fp32|bf16 (sample, edit, eval), train.precision=fp32|bf16, or "
                  f"{precision.AUTO_ENV}=fp32|bf16 to make auto take one without measuring"),
    ("layout", f"{precision.LAYOUT_ENV}=contiguous|channels_last (the training batch's memory layout)"),
    ("threads", "OMP_NUM_THREADS=N (torch's intra-op threads)"),
    ("allocator", "DIFFLO_MALLOC_TUNING=0|heap|threshold (or any MALLOC_* variable of glibc)"),
    ("cache", "XDG_CACHE_HOME=DIR (classifiers, decoded data, FID statistics, the precision measurement)"),
)


def add_parser(sub) -> None:
    e = sub.add_parser("env", help="what difflo chose on this machine (precision, threads, allocator) and why")
    e.add_argument("--remeasure", action="store_true",
                   help="time bf16 against fp32 again (on an idle machine) and store the new answer")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=run)


def facts(remeasure: bool = False) -> dict:
    """Everything ``difflo env`` prints, as a dict."""
    import torch

    cpu = torch.device("cpu")
    flags = precision.cpu_flags()
    measured = None
    if remeasure or (precision.forced_auto() is None and (flags is None or set(flags) & set(precision.CPU_BF16_FLAGS))):
        measured = precision.bf16_ratios(remeasure=remeasure)
    auto = precision.resolve("auto", cpu, log=lambda *a: None)
    layout, layout_why = precision.training_layout(auto, cpu)
    out = {
        "difflo": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "cpu": precision.cpu_model(), "cpu_flags": precision.speed_flags(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "allocator": allocator.tune_malloc(),
        "precision_auto": {"used": auto.used, "why": auto.why,
                           "bf16_over_fp32_time": measured,
                           "min_speedup": precision.BF16_MIN_SPEEDUP,
                           "stored_in": str(precision.precision_file())},
        "layout": {"used": layout, "why": layout_why},
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cache": str(cache_home()),
        "environment": {k: os.environ[k] for k in (precision.AUTO_ENV, "OMP_NUM_THREADS", "DIFFLO_MALLOC_TUNING",
                                                   "XDG_CACHE_HOME", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                        if k in os.environ},
        "overrides": dict(OVERRIDES),
    }
    if out["cuda"]:
        out["precision_auto_cuda"] = str(precision.resolve("auto", torch.device("cuda"), log=lambda *a: None))
    return out


def run(args) -> int:
    f = facts(args.remeasure)
    if args.json:
        print(json.dumps(f, indent=1))
        return 0
    p = f["precision_auto"]
    ratios = p["bf16_over_fp32_time"]
    lines = [
        f"difflo {f['difflo']}, torch {f['torch']}, Python {f['python']}",
        f"cpu          {f['cpu']}; {f['cores']} cores; flags: {' '.join(f['cpu_flags']) or 'none of note'}; "
        f"torch capability {f['cpu_capability']}",
        f"threads      {f['threads']} (torch intra-op)",
        f"allocator    {f['allocator']}",
        f"precision    auto -> {p['used']} on the CPU ({p['why']})",
        "             bf16/fp32 time: " + (", ".join(f"{k} {v:.3g}" for k, v in ratios.items()) if ratios else
                                           "not measured") + f"; bf16 needs >= {p['min_speedup']:g}x; "
        f"stored in {p['stored_in']}",
        f"layout       training batches {f['layout']['used']} in {p['used']} ({f['layout']['why']})",
    ]
    if f["cuda"]:
        lines.append(f"gpu          {f['cuda']}: auto -> {f['precision_auto_cuda']}")
    lines.append(f"cache        {f['cache']}")
    if f["environment"]:
        lines.append("environment  " + " ".join(f"{k}={v}" for k, v in f["environment"].items()))
    lines.append("override:")
    lines += [f"  {what:<11} {how}" for what, how in OVERRIDES]
    print("\n".join(lines))
    return 0
