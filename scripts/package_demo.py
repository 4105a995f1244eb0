"""Package the demo checkpoint that ships with difflo (``--ckpt demo``): the EMA weights of a run,
with the sampling defaults of today's config, into ``src/difflo/assets/demo/`` (ema.safetensors +
manifest.json; the raw weights and optimizer state are left out, so it is 4.5 MB).

The shipped model was trained with the demo's recipe for the 700 steps the 5-minute demo reaches
on a 2-core CPU (benchmarks/demo_defaults.sh, candidate "base"):

    difflo train --config configs/mnist10k.yaml --out runs/demo-defaults/base \\
        train.steps=700 train.ckpt_every=700 train.sample_every=0 train.precision=fp32
    python scripts/package_demo.py runs/demo-defaults/base

Its measured quality (README "Quick start") comes from ``difflo eval model --ckpt demo --n 1000 ...``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from difflo import config as config_mod
from difflo.checkpoint import load_weights, resolve_weights, sha256_file, weights_metadata
from difflo.data.idx import MNIST_CLASSES

OUT = Path(__file__).resolve().parent.parent / "src" / "difflo" / "assets" / "demo"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="the run to package (its newest checkpoint's EMA weights)")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    src = resolve_weights(a.run, ema=True)
    state, cfg_dict, meta = load_weights(src)
    cfg = config_mod.from_dict(cfg_dict)
    cfg.sample = config_mod.Config().sample            # today's sampling defaults (DDPM 50, w = 2)
    if cfg.data.name == "mnist10k" and not cfg.data.classes:
        cfg.data.classes = tuple(MNIST_CLASSES)
    a.out.mkdir(parents=True, exist_ok=True)
    step = int(meta.get("step", 0))
    save_file({k: v.contiguous() for k, v in state.items()}, str(a.out / "ema.safetensors"),
              metadata=weights_metadata(cfg.to_dict(), step, "ema"))
    manifest = {"step": step, "source": str(src), "sha256": {"ema.safetensors": sha256_file(a.out / "ema.safetensors")}}
    (a.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {a.out} (EMA weights of {src}, step {step})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
