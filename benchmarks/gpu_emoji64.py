"""benchmarks/gpu_emoji64.py: configs/emoji64.yaml (the Difflo system: 64x64 RGB, 98 subcategories,
37.1M parameters) trained for a fixed number of minutes on one device, then its numbers, a grid and a
sample set for FID. Run by benchmarks/gpu.sh's emoji64 section on a lent GPU; on a CPU (tests) with
--steps-cap and tiny --set overrides.

    python benchmarks/gpu_emoji64.py --data gpu-data/emoji64.npz --out OUT --minutes 4 --device cuda

Conventions: the data are the train split packed by benchmarks/pack_emoji64.py (the GPU machine has no
network); training is difflo's own ``difflo.train.train`` on that ArrayDataset (as gpu.sh's CIFAR
section does it), with train.device, train.max_minutes and train.sample_every=0 set and the model kept;
sampling is difflo's own ``difflo sample`` (the run's sample settings: DDIM 100, w 3, EMA weights).
Writes into OUT: emoji64.json and emoji64.txt (images/s from the run's metrics.csv: the median over its
logged windows after the first, which holds cuDNN's autotuning; peak CUDA memory of training and of
sampling, torch.cuda.max_memory_allocated, in MiB; steps, seconds, parameters, precision),
emoji64-metrics.csv (the run's), emoji64-grid.png (one named row per GRID_CLASSES subcategory) and
samples.npz (--n class-balanced samples, uint8, with labels) for `benchmarks/gpu_fid.sh` on a machine
with the Inception weights. The run directory (checkpoints, ~0.6 GB at full size) goes to --run, not OUT.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))          # difflo from this checkout, as benchmarks/gpu.sh runs it

from pack_emoji64 import CONFIG, load_packed  # noqa: E402  (benchmarks/pack_emoji64.py)
from difflo.data import emoji  # noqa: E402

# the grid's rows: a few named subcategories across the emoji categories (common and scarce ones)
GRID_CLASSES = ",".join(emoji.SHOWN_SUBCATEGORIES)
N_SAMPLES = 490                                 # 5 per subcategory: the N of the README's FID and its floor


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="gpu-data/emoji64.npz from benchmarks/pack_emoji64.py")
    p.add_argument("--out", required=True, help="folder for the results (created)")
    p.add_argument("--minutes", type=positive_float, required=True, help="training budget (train.max_minutes)")
    p.add_argument("--device", choices=("cuda", "cpu"), required=True)
    p.add_argument("--steps-cap", type=positive_int, metavar="K",
                   help="stop after K steps if the minutes have not run out (train.steps=K; smoke runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override on top of configs/emoji64.yaml's (e.g. model.channels=8 for a smoke "
                        "run); repeatable")
    p.add_argument("--n", type=positive_int, default=N_SAMPLES,
                   help=f"class-balanced samples for FID (default {N_SAMPLES}, 5 per subcategory)")
    p.add_argument("--classes", default=GRID_CLASSES, help="the grid's rows: subcategory names or indices")
    p.add_argument("--per-class", type=positive_int, default=8, help="grid columns (default 8)")
    p.add_argument("--run", help="run directory (checkpoints; default: a fresh folder under the temp dir)")
    return p.parse_args(argv)


@contextlib.contextmanager
def training_on(dataset):
    """difflo.data.from_config answers ``dataset`` while training (as gpu.sh's CIFAR section does it)."""
    from difflo import data

    original = data.from_config
    data.from_config = lambda cfg: dataset
    try:
        yield
    finally:
        data.from_config = original


def throughput(metrics_csv: Path) -> dict:
    """images/s of the run's logged windows: the median after the first (all of them if only one), and each."""
    with open(metrics_csv, newline="") as f:
        windows = [float(r["images_per_s"]) for r in csv.DictReader(f) if r.get("images_per_s")]
    if not windows:
        return {"images_per_s": None, "windows": []}
    steady = windows[1:] or windows
    return {"images_per_s": round(statistics.median(steady), 1), "windows": windows}


def peak_mib(torch, device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def sample(cli_args: list[str]) -> float:
    """``difflo sample ARGS`` in this process; its wall seconds (a failure exits with its message)."""
    from difflo.cli import main as difflo_main

    t0 = time.time()
    rc = difflo_main(["sample", *cli_args])
    if rc:
        raise SystemExit(rc)
    return round(time.time() - t0, 1)


def run(args) -> dict:
    import torch

    from difflo import config as config_mod, train as train_mod
    from difflo.errors import DataError
    from difflo.model import load_model, pick_device

    device = pick_device(args.device)           # cuda without a GPU: one clear line
    dataset = load_packed(args.data, "train")
    overrides = [f"train.device={args.device}", f"train.max_minutes={args.minutes}", "train.sample_every=0",
                 *([f"train.steps={args.steps_cap}"] if args.steps_cap else []), *args.set]
    cfg = config_mod.load(CONFIG, overrides)
    if dataset.image_size != cfg.data.image_size:
        raise DataError(f"{args.data} holds {dataset.image_size}x{dataset.image_size} images, "
                         f"the config trains at {cfg.data.image_size}; repack it with benchmarks/pack_emoji64.py")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(args.run) if args.run else Path(tempfile.mkdtemp(prefix="gpu-emoji64-"))

    steps = {"n": 0, "first": None, "last": None}

    def on_step(step, net):
        now = time.time()
        steps["n"], steps["last"] = step, now
        steps["first"] = steps["first"] or now

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    with training_on(dataset):
        ckpt = train_mod.train(cfg, run_dir, progress=False, on_step=on_step)
    train_s = time.time() - t0
    train_peak = peak_mib(torch, device)
    if ckpt is None:
        raise SystemExit("gpu_emoji64: error: training stopped before its first step (a signal?); run it again")
    shutil.copyfile(run_dir / "metrics.csv", out / "emoji64-metrics.csv")

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    common = ["--ckpt", str(run_dir), "--device", args.device]
    grid_s = sample([*common, "--grid", str(args.per_class), "--classes", args.classes,
                     "--out", str(out / "emoji64-grid.png")])
    samples_s = sample([*common, "--n", str(args.n), "--out", str(out / "samples.npz")])
    sample_peak = peak_mib(torch, device)

    model = load_model(run_dir, device="cpu")
    env = json.loads((run_dir / "environment.json").read_text())
    return {
        "config": str(CONFIG.relative_to(ROOT)), "overrides": overrides, "data": str(args.data),
        "train_images": len(dataset), "classes": dataset.num_classes,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else env.get("cpu", "cpu"),
        "torch": torch.__version__, "precision": env["precision"]["used"],
        "params": sum(p.numel() for p in model.net.parameters()), "batch_size": cfg.train.batch_size,
        "minutes": args.minutes, "steps": steps["n"], "train_s": round(train_s, 1),
        "images_seen": steps["n"] * cfg.train.batch_size,
        **throughput(out / "emoji64-metrics.csv"),
        "images_per_s_overall": (round((steps["n"] - 1) * cfg.train.batch_size / (steps["last"] - steps["first"]), 1)
                                 if steps["n"] > 1 and steps["last"] > steps["first"] else None),
        "peak_cuda_mib_train": train_peak, "peak_cuda_mib_sample": sample_peak,
        "grid": "emoji64-grid.png", "grid_classes": args.classes, "grid_s": grid_s,
        "samples": "samples.npz", "n_samples": args.n, "samples_s": samples_s,
        "sample_settings": cfg.to_dict()["sample"],
        "run": str(run_dir),
    }


def summary(r: dict) -> str:
    mem = (f"peak CUDA memory {r['peak_cuda_mib_train']:.0f} MiB training, {r['peak_cuda_mib_sample']:.0f} MiB sampling"
           if r["peak_cuda_mib_train"] is not None else "peak CUDA memory: n/a (not on a GPU)")
    ips = f"{r['images_per_s']:.1f}" if r["images_per_s"] is not None else "n/a (no logged window)"
    return (f"emoji64 on {r['device']} ({r['precision']}, torch {r['torch']}): {r['params'] / 1e6:.1f}M parameters, "
            f"batch {r['batch_size']}\n"
            f"{r['steps']} steps ({r['images_seen']} images) in {r['train_s']:.0f} s of a {r['minutes']}-minute budget; "
            f"training {ips} images/s (median of metrics.csv windows after the first; overall "
            f"{r['images_per_s_overall']})\n{mem}\n"
            f"grid ({r['grid']}) in {r['grid_s']} s; {r['n_samples']} class-balanced samples ({r['samples']}) in "
            f"{r['samples_s']} s; FID: bash benchmarks/gpu_fid.sh OUT on a machine with the Inception weights")


def main(argv: list[str] | None = None) -> int:
    from difflo.errors import DiffloError

    args = parse_args(argv)
    try:
        r = run(args)
    except DiffloError as e:
        print(f"gpu_emoji64: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    (out / "emoji64.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    text = summary(r)
    (out / "emoji64.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
