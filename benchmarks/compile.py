#!/usr/bin/env python
"""torch.compile (Inductor) against eager on the demo model: compile time against the time it saves.

    python benchmarks/compile.py            # a 64-image guided grid (DDIM 50) and a 5-minute training budget

For inference (128 images per call: a 64-image grid with guidance) and for a training step (batch 64), the
first compiled call (compilation included) and the steady per-call time of each; the break-even number of
calls; and what that means for a 64-image DDIM-50 grid (50 calls) and for the demo's 5 minutes of training.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from difflo import config as config_mod, allocator, precision  # noqa: E402
from difflo.model import build_net  # noqa: E402
from difflo.noise_paths import make_path  # noqa: E402
from timing import median_time  # noqa: E402  (benchmarks/timing.py)


def main() -> int:
    allocator.tune_malloc()
    cfg = config_mod.Config()
    path = make_path(cfg.diffusion)
    print(f"# torch.compile vs eager, demo model, {time.strftime('%Y-%m-%d')}, {precision.cpu_model()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| phase | eager s/call | first compiled call s | compiled s/call | speed-up | break-even calls | "
          "verdict |")
    print("|---|---|---|---|---|---|---|")
    for phase in ("inference (128 images)", "training step (batch 64)"):
        rows = {}
        for mode in ("eager", "compiled"):
            torch.manual_seed(0)
            torch._dynamo.reset()
            net = build_net(cfg)
            fwd = torch.compile(net) if mode == "compiled" else net
            opt = torch.optim.AdamW(net.parameters(), foreach=True)
            B = 128 if phase.startswith("inference") else 64
            x, y = torch.randn(B, 1, 28, 28), torch.randint(0, 11, (B,))
            g = torch.Generator().manual_seed(0)

            def call():
                if phase.startswith("inference"):
                    with torch.no_grad():
                        fwd(x, torch.full((B,), 500.0), y)
                else:
                    loss = path.training_loss(fwd, x, y, cfg.diffusion, g)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            t0 = time.perf_counter()
            call()
            first = time.perf_counter() - t0
            rows[mode] = (first, median_time(call, repeats=5, warmup=0))
        (_, eager), (first, comp) = rows["eager"], rows["compiled"]
        saved = eager - comp
        even = (first - comp) / saved if saved > 0 else float("inf")
        budget = 50 if phase.startswith("inference") else 300 / eager
        verdict = "pays" if even < budget else "does not pay"
        what = "a DDIM-50 grid" if phase.startswith("inference") else "5 minutes of training"
        print(f"| {phase} | {eager:.3f} | {first:.1f} | {comp:.3f} | {eager / comp:.2f}x | {even:.0f} | "
              f"{verdict} within {what} ({budget:.0f} calls) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
