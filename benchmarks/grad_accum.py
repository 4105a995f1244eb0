#!/usr/bin/env python
"""Gradient accumulation: peak memory and step time of `difflo train` for train.grad_accum = 1, 2, 4 at one
batch size (the same update each time; only the micro-batch the network sees shrinks).

    python benchmarks/grad_accum.py                     # the demo config (mnist10k UNet), batch 256, K = 1, 2, 4
    python benchmarks/grad_accum.py --batch 512 --k 1,2,4,8 --steps 12 --repeats 3 --set train.precision=fp32
    python benchmarks/grad_accum.py --quick             # a smoke run of seconds: tiny model, numbers meaningless

Each measurement is a fresh process running difflo.train.train (data, model, AdamW, EMA: the real loop) for
--steps steps; peak memory is its VmHWM (peak RSS; ru_maxrss would carry the parent's peak over fork, see
benchmarks/run.py) and, on CUDA, torch.cuda.max_memory_allocated; the step time is the median interval
between updates (train's on_step hook) after the first --warmup steps. Runs alternate their order every
repeat; the table shows medians. The peak RSS includes the process's fixed part (Python, torch, the data
set, weights and optimizer state), so the differences between rows are what accumulation saves.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))          # run from a checkout without installing

from run import peak_rss_mb  # noqa: E402  (benchmarks/run.py: VmHWM of this process)
from timing import child_json  # noqa: E402

QUICK = ["model.channels=8", "model.channel_mult=[1,2]", "model.attn_resolutions=[14]"]


def child(k: int, batch: int, steps: int, warmup: int, overrides: list[str]) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import torch
    from difflo import config as config_mod
    from difflo.train import train

    cfg = config_mod.load(None, [f"train.batch_size={batch}", f"train.grad_accum={k}", f"train.steps={steps}",
                                 f"train.log_every={steps}", f"train.ckpt_every={steps}", "train.sample_every=0",
                                 *overrides])
    stamps = []
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / "run", log=lambda *a: None, progress=False,
              on_step=lambda step, net: stamps.append(time.perf_counter()))
        env = json.loads((Path(tmp) / "run" / "environment.json").read_text())
    dt = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
    res = {"k": k, "peak_rss_mb": peak_rss_mb(), "s_per_step": statistics.median(dt),
           "precision": env["precision"]["used"], "device": env["device"], "threads": env["threads"]}
    if torch.cuda.is_available() and env["device"].startswith("cuda"):
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(res))


def measure(k: int, a) -> dict:
    cmd = [sys.executable, __file__, "--child", str(k), "--batch", str(a.batch), "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--set", *a.set]
    return child_json(cmd, f"K={k}: the training process")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256, help="train.batch_size (the global batch of every row)")
    ap.add_argument("--k", default="1,2,4", help="train.grad_accum values, comma-separated")
    ap.add_argument("--steps", type=int, default=10, help="training steps per measurement")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the step time")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value",
                    help="config overrides, e.g. train.precision=fp32")
    ap.add_argument("--quick", action="store_true", help="tiny model, batch 16, 4 steps, 1 repeat (a smoke run)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:
        a.batch, a.steps, a.warmup, a.repeats, a.set = 16, 4, 1, 1, QUICK + a.set
    if a.child is not None:
        child(a.child, a.batch, a.steps, a.warmup, a.set)
        return 0
    ks = [int(k) for k in a.k.split(",")]
    if a.steps < a.warmup + 2:
        raise SystemExit(f"--steps {a.steps} leaves no interval to time after --warmup {a.warmup}")
    runs = {k: [] for k in ks}
    for r in range(a.repeats):
        for k in (ks if r % 2 == 0 else ks[::-1]):
            runs[k].append(measure(k, a))
    med = {k: {f: statistics.median(x[f] for x in v) for f in v[0] if isinstance(v[0][f], (int, float))}
           for k, v in runs.items()}
    first = runs[ks[0]][0]
    from difflo import precision
    print(f"# difflo train, batch {a.batch}, {' '.join(a.set) or 'demo config'}, {first['precision']} on "
          f"{first['device']}, {first['threads']} threads, {time.strftime('%Y-%m-%d')}, {precision.cpu_model()}, "
          f"{os.cpu_count()} CPUs; median of {a.repeats}, step time over steps {a.warmup + 2}..{a.steps}")
    cuda = "peak_cuda_mb" in med[ks[0]]
    print(f"| grad_accum | micro-batch | peak RSS MB | vs K={ks[0]} |" + (" peak CUDA MB |" if cuda else "")
          + " s/step | images/s |")
    print("|---|---|---|---|" + ("---|" if cuda else "") + "---|---|")
    for k, m in med.items():
        print(f"| {k} | {a.batch // k} | {m['peak_rss_mb']:.0f} | {m['peak_rss_mb'] - med[ks[0]]['peak_rss_mb']:+.0f} |"
              + (f" {m['peak_cuda_mb']:.0f} |" if cuda else "")
              + f" {m['s_per_step']:.3f} | {a.batch / m['s_per_step']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
