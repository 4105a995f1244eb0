#!/usr/bin/env python
"""Allocation churn: `difflo sample` on the demo model with each allocator setting, in one run.

    python benchmarks/malloc.py                 # --n 100 (500 images per network call), 2 repeats
    python benchmarks/malloc.py --n 20 --repeats 1

Each run is a fresh `difflo sample` process (random weights of the demo config: the time does not
depend on them); wall time, user and system CPU time and minor page faults come from wait4's rusage.
Settings (difflo.allocator): `off` (DIFFLO_MALLOC_TUNING=0: glibc's defaults), `env` (the glibc
environment variables of shared/README.md, set from outside), and each of allocator.SETTINGS. Runs
alternate their order every repeat; the table shows the median per setting.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from difflo import allocator, precision  # noqa: E402

ENV_VARS = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296",
            "MALLOC_TOP_PAD_": "1073741824"}


def cpu_line() -> str:
    return f"{precision.cpu_model()}, {os.cpu_count()} CPUs, flags: {' '.join(precision.speed_flags()) or '-'}"


def make_ckpt(d: Path) -> Path:
    """A demo-config checkpoint (1 training step: the weights do not matter for the time)."""
    from difflo import config as config_mod
    from difflo.train import train
    cfg = config_mod.Config()
    cfg.train.steps, cfg.train.sample_every = 1, 0
    return train(cfg, d / "run", log=lambda *a: None, progress=False)


def run(setting: str, ckpt: Path, n: int, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS and k != "DIFFLO_MALLOC_TUNING"}
    if setting == "env":
        env.update(ENV_VARS)
    else:
        env["DIFFLO_MALLOC_TUNING"] = "0" if setting == "off" else setting
    cmd = [sys.executable, "-m", "difflo", "sample", "--ckpt", str(ckpt), "--n", str(n), "--out", str(out),
           "--seed", "0"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{setting}: difflo sample failed: {p.stderr.read().decode()[-500:]}")
    return {"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "faults": ru.ru_minflt}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    settings = ["off", "env", *allocator.SETTINGS]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = make_ckpt(tmp)
        rows = {s: [] for s in settings}
        for r in range(a.repeats):
            for s in (settings if r % 2 == 0 else settings[::-1]):
                rows[s].append(run(s, ckpt, a.n, tmp / f"{s}.npz"))
    print(f"# difflo sample --n {a.n} (demo model, DDIM 50, w 3), {time.strftime('%Y-%m-%d')}, {cpu_line()}, "
          f"median of {a.repeats}")
    print("| malloc setting | wall s | user s | system s | system / user | minor faults | wall vs off |")
    print("|---|---|---|---|---|---|---|")
    med = {s: {k: statistics.median(x[k] for x in v) for k in v[0]} for s, v in rows.items()}
    for s, m in med.items():
        print(f"| {s} | {m['wall']:.1f} | {m['user']:.1f} | {m['sys']:.1f} | {m['sys'] / m['user']:.2f} | "
              f"{m['faults'] / 1e6:.2f}M | {med['off']['wall'] / m['wall']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
