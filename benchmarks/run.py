#!/usr/bin/env python
"""difflo against diffusers, in one run: training and inference throughput of the UNet at matched size
(measured alternately, medians, as a ratio), achieved GFLOP/s against the machine's measured fp32 matmul
peak, peak memory (RSS) per batch size, wall time of a 64-image sample grid per sampler, and the number
of network calls guidance costs.

    python benchmarks/run.py                     # the full run: run it alone on the machine (many minutes)
    python benchmarks/run.py --quick             # a smoke run of a few seconds: tiny sizes, numbers meaningless
    python benchmarks/run.py --batch-sizes 32,64 --repeats 7 --json out.json --threads 2

Prints a table and writes JSON (default benchmarks/results.json).

What is measured
* The matched pair: difflo's UNet and diffusers' UNet2DModel with the same widths, blocks per level,
  attention resolutions and heads, class embedding, time embedding (equal parameter counts; the FLOP
  counts are printed and must match).
* A training step is what each library's own training code does: difflo's loss
  (difflo.diffusion.training_loss), AdamW and EMA as in difflo.train; diffusers' DDPMScheduler.add_noise,
  MSE, torch AdamW (defaults) and diffusers.training_utils.EMAModel, as in diffusers' training examples.
  Both clip the gradient norm to 1. Inference: one no-grad network evaluation of a batch.
* Alternation: after warmup, repeat r runs difflo then diffusers (even r) or diffusers then difflo (odd r),
  each for --steps-per-repeat steps; images/s per repeat, median over repeats.
* FLOPs: torch.utils.flop_counter.FlopCounterMode over one forward (+ backward) pass; the fused CPU
  attention kernel, which the counter does not know, is counted with its matmul FLOPs. Achieved GFLOP/s =
  FLOPs per image x images/s; peak = the best of several n x n fp32 matmuls (2 n^3 FLOPs each).
* Memory: the peak resident set size (ru_maxrss) of a fresh subprocess per (model, batch, phase): after
  imports and model construction ("baseline"), after 3 training steps ("train"), after 3 guided
  sampling steps of the batch ("sample": one network call of 2B per step).
* Sample grid: difflo's `generate` (as `difflo sample`) of 64 class-conditional images with guidance
  w = 3, per sampler; the network calls are counted (one batched call of 2 x 64 per step).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))          # run from a checkout without installing

import torch  # noqa: E402

TARGETS = {"train_ratio_default": 1.3, "train_ratio_same": 1.1, "infer_ratio_default": 1.5, "infer_ratio_same": 1.2,
           "sample_evals_over_train_img": 3.0}

# The matched size (the diffusers reference: 32/64/128 channels, 2 blocks per level, attention at 8x8,
# 3.9M parameters, 32x32x3 images), and a tiny one for --quick.
FULL = dict(image_size=32, in_channels=3, num_classes=10, channels=(32, 64, 128), layers=2, attn=(8,), heads=4,
            batch_sizes=(32, 64, 128), warmup=2, repeats=5, steps_per_repeat=3, matmul_n=2048, matmul_repeats=10,
            grid_images=64, grid=(("ddpm", 1000), ("ddim", 50), ("dpmpp", 20)))
QUICK = dict(image_size=8, in_channels=3, num_classes=3, channels=(8, 16), layers=1, attn=(4,), heads=2,
             batch_sizes=(2,), warmup=1, repeats=2, steps_per_repeat=1, matmul_n=64, matmul_repeats=3,
             grid_images=4, grid=(("ddpm", 6), ("ddim", 4), ("dpmpp", 3)))


# --------------------------------------------------------------------------- the two models
def difflo_net(s: dict):
    from difflo.nn import UNet, UNetConfig
    mult = tuple(c // s["channels"][0] for c in s["channels"])
    return UNet(UNetConfig(in_channels=s["in_channels"], image_size=s["image_size"], num_classes=s["num_classes"],
                           channels=s["channels"][0], channel_mult=mult, num_res_blocks=s["layers"],
                           attn_resolutions=tuple(s["attn"]), attn_heads=s["heads"]))


def diffusers_net(s: dict):
    from diffusers import UNet2DModel
    res = [s["image_size"] // 2**i for i in range(len(s["channels"]))]
    down = tuple("AttnDownBlock2D" if r in s["attn"] else "DownBlock2D" for r in res)
    up = tuple("AttnUpBlock2D" if r in s["attn"] else "UpBlock2D" for r in reversed(res))
    groups = min(32, s["channels"][0])
    return UNet2DModel(sample_size=s["image_size"], in_channels=s["in_channels"], out_channels=s["in_channels"],
                       block_out_channels=tuple(s["channels"]), layers_per_block=s["layers"],
                       down_block_types=down, up_block_types=up, num_class_embeds=s["num_classes"] + 1,
                       attention_head_dim=s["channels"][-1] // s["heads"], norm_num_groups=groups)


class Trainer:
    """One model's training step and inference call, as its own library's training code does it."""

    def __init__(self, name: str, s: dict, device: torch.device, compile_: bool = False, precision: str = "fp32"):
        torch.manual_seed(0)
        self.name, self.s, self.device, self.precision = name, s, device, precision
        self.amp = {"fp32": None, "bf16": torch.bfloat16}[precision]      # autocast dtype (weights stay fp32)
        self.net = (difflo_net(s) if name == "difflo" else diffusers_net(s)).to(device)
        self.params = sum(p.numel() for p in self.net.parameters())
        self.fwd = torch.compile(self.net) if compile_ else self.net
        if name == "difflo":
            import copy

            from difflo.diffusion import DiscreteSchedule
            from difflo.train import ema_update
            self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4, foreach=True)   # as difflo.train
            self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
            self.ema_update = ema_update
            self.sched = DiscreteSchedule.from_name("linear", 1000)
        else:
            from diffusers import DDPMScheduler
            from diffusers.training_utils import EMAModel
            self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4)                  # torch defaults
            self.ema = EMAModel(self.net.parameters(), decay=0.999)
            self.sched = DDPMScheduler(num_train_timesteps=1000)
        self.step_count = 0

    def batch(self, B: int):
        g = torch.Generator().manual_seed(B)
        c, n = self.s["in_channels"], self.s["image_size"]
        x0 = torch.randn(B, c, n, n, generator=g).to(self.device)                  # (B, C, H, W)
        y = torch.randint(0, self.s["num_classes"] + 1, (B,), generator=g).to(self.device)
        return x0, y

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    def loss(self, x0, y):
        with self.autocast():
            return self._loss(x0, y)

    def _loss(self, x0, y):
        if self.name == "difflo":
            from difflo.diffusion import training_loss
            gen = torch.Generator(self.device).manual_seed(self.step_count)
            return training_loss(self.fwd, x0, y, self.sched, "eps", generator=gen)
        import torch.nn.functional as F
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (x0.shape[0],), device=self.device)
        pred = self.fwd(self.sched.add_noise(x0, noise, t), t, class_labels=y).sample
        return F.mse_loss(pred.float(), noise.float())

    def train_step(self, x0, y) -> None:
        self.net.train()
        loss = self.loss(x0, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        if self.name == "difflo":
            self.ema_update(self.ema, self.net, 0.999)
        else:
            self.ema.step(self.net.parameters())
        self.step_count += 1

    @torch.no_grad()
    def infer(self, x, y) -> torch.Tensor:
        self.net.eval()
        t = torch.full((x.shape[0],), 500, device=self.device)
        with self.autocast():
            if self.name == "difflo":
                return self.fwd(x, t.float(), y).float()
            return self.fwd(x, t, class_labels=y).sample.float()


# --------------------------------------------------------------------------- measurements
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_gflops(fn, flops: float, repeats: int, device: torch.device) -> float:
    fn()
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    return best


def matmul_peak(n: int, repeats: int, device: torch.device, dtype=torch.float32) -> float:
    """The best GFLOP/s of an n x n matmul (2 n^3 FLOPs) in dtype."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    return _best_gflops(lambda: a @ b, 2 * n**3, repeats, device)


def conv_peak(repeats: int, device: torch.device, quick: bool) -> float:
    """The best fp32 GFLOP/s of a 3x3 conv, 64 -> 64 channels, 32x32, batch 64, in channels_last."""
    B, C, H = (4, 16, 8) if quick else (64, 64, 32)
    import torch.nn.functional as F
    x = torch.randn(B, C, H, H, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, C, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return _best_gflops(lambda: F.conv2d(x, w, padding=1), 2 * B * C * C * 9 * H * H, repeats, device)


def limits(s: dict, device: torch.device, quick: bool, bf16: bool) -> dict:
    """The machine's limit as the best of an fp32 matmul, a channels_last conv and (where bf16 units are
    listed) a bf16 matmul."""
    out = {"fp32_matmul": matmul_peak(s["matmul_n"], s["matmul_repeats"], device),
           "channels_last_conv": conv_peak(s["matmul_repeats"], device, quick)}
    if bf16:
        out["bf16_matmul"] = matmul_peak(s["matmul_n"], s["matmul_repeats"], device, torch.bfloat16)
    out["limit"] = max(out.values())
    return out


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    aten = torch.ops.aten
    custom = {}
    for name, f in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flops),
                    ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward_flops)):
        if hasattr(aten, name):
            custom[getattr(aten, name)] = f
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        fn()
    return counter.get_total_flops()


def flops_per_image(tr: Trainer, B: int) -> tuple[float, float]:
    """(training, inference) GFLOP per image: forward + backward, and forward alone."""
    x0, y = tr.batch(B)

    def train_pass():
        tr.net.train()
        tr.loss(x0, y).backward()

    fwd = tr.fwd
    tr.fwd = tr.net                    # count the eager module (a compiled one hides its ops)
    try:
        train = count_flops(train_pass)
        tr.net.zero_grad(set_to_none=True)
        infer = count_flops(lambda: tr.infer(x0, y))
    finally:
        tr.fwd = fwd
    return train / B / 1e9, infer / B / 1e9


def throughput(trainers: dict, B: int, s: dict, device: torch.device, kind: str) -> dict[str, list[float]]:
    """Images/s per repeat for each model, the models alternating (order flipped every repeat)."""
    names = list(trainers)
    data = {n: trainers[n].batch(B) for n in names}

    def run(n: str) -> None:
        x0, y = data[n]
        if kind == "train":
            trainers[n].train_step(x0, y)
        else:
            trainers[n].infer(x0, y)

    for n in names:                                 # warmup (allocator, oneDNN primitives, compilation)
        for _ in range(s["warmup"]):
            run(n)
    rates = {n: [] for n in names}
    for r in range(s["repeats"]):
        for n in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(s["steps_per_repeat"]):
                run(n)
            sync(device)
            rates[n].append(B * s["steps_per_repeat"] / (time.perf_counter() - t0))
    return rates


def grid_timings(s: dict, device: torch.device, grid_model: str) -> list[dict]:
    """Wall time of a class-conditional grid (w = 3) per sampler, with the network calls counted.
    ``grid_model``: "demo", difflo's default config (28x28x1, 1.1M parameters), or "bench", the matched
    model (random weights either way: the time does not depend on them)."""
    from difflo import config as config_mod
    from difflo.model import Model, build_net
    from difflo.generate import SampleSettings, generate

    cfg = config_mod.Config()
    if grid_model == "bench":
        cfg.model = difflo_net(s).cfg
    torch.manual_seed(0)
    net = build_net(cfg).to(device).eval()
    calls = []
    net.register_forward_pre_hook(lambda m, args: calls.append(int(args[0].shape[0])))
    n = s["grid_images"]
    labels = torch.arange(n) % cfg.model.num_classes
    out = []
    for sampler, steps in s["grid"]:
        calls.clear()
        sync(device)
        t0 = time.perf_counter()
        generate(Model(net, cfg), labels, range(n), SampleSettings(sampler=sampler, steps=steps, w=3.0), batch_size=n)
        sync(device)
        wall = time.perf_counter() - t0
        out.append({"sampler": sampler, "steps": steps, "images": n, "wall_s": wall,
                    "network_calls": len(calls), "calls_per_step": len(calls) / steps,
                    "batch_per_call": sorted(set(calls)), "model_params": sum(p.numel() for p in net.parameters()),
                    "model": f"{cfg.model.image_size}x{cfg.model.image_size}x{cfg.model.in_channels}, channels "
                             f"{cfg.model.channels} x {list(cfg.model.channel_mult)}"})
    return out


# --------------------------------------------------------------------------- peak RSS in fresh processes
def rss_child(model: str, phases: list[str], B: int, quick: bool, device: str) -> None:
    """Runs in a fresh process: build the model, run each phase, print the peak RSS of each (and the CUDA
    peak). Several phases in one process (the smoke run) reset the peak in between (Linux clear_refs)."""
    s = QUICK if quick else FULL
    dev = torch.device(device)
    tr = Trainer(model, s, dev)
    x0, y = tr.batch(B)
    res = {}
    for i, phase in enumerate(phases):
        if i:
            reset_peak_rss()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
        if phase == "train":
            for _ in range(3):
                tr.train_step(x0, y)
        elif phase == "sample":                      # 3 guided steps: one network call of 2B each
            x = torch.randn_like(x0)
            null = torch.full_like(y, s["num_classes"])
            for _ in range(3):
                both = tr.infer(torch.cat([x, x]), torch.cat([y, null]))
                cond, uncond = both.chunk(2)
                x = x - 0.01 * (uncond + 3.0 * (cond - uncond))
        res[phase] = {"peak_rss_mb": peak_rss_mb()}
        if dev.type == "cuda":
            res[phase]["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    print(json.dumps(res))


def peak_rss_mb() -> float:
    """This process's peak resident set size. Linux: VmHWM (ru_maxrss would report the parent's peak too:
    the kernel carries it over fork and exec); elsewhere ru_maxrss (bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024                        # kB
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")                     # Linux >= 4.0: VmHWM = VmRSS


def memory(s: dict, quick: bool, device: str, models: list[str]) -> list[dict]:
    """Peak RSS per (model, batch, phase): a fresh process per measurement; in the smoke run (where Linux
    can reset the peak) one process per model runs baseline, sample, train in that order."""
    one_process = quick and os.access("/proc/self/clear_refs", os.W_OK)
    jobs = []
    for m in models:
        for B in s["batch_sizes"]:
            if one_process:
                jobs.append((m, ["baseline", "sample", "train"], B))
            else:
                jobs += [(m, [phase], B) for phase in ("baseline", "sample", "train")
                         if phase != "baseline" or B == s["batch_sizes"][0]]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", device, "--threads", str(torch.get_num_threads())]
    cmd += ["--quick"] if quick else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    procs = []
    for m, phases, B in jobs:
        p = subprocess.Popen(cmd + ["--rss-child", m, ",".join(phases), str(B)], stdout=subprocess.PIPE, text=True,
                             env=env)
        if not quick:                              # one at a time, except in the smoke run
            p.wait()
        procs.append(p)
    out = {}
    for (m, phases, B), p in zip(jobs, procs):
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"memory measurement {m}/{phases}/batch {B} failed (exit {p.returncode})")
        for phase, r in json.loads(stdout.strip().splitlines()[-1]).items():
            for BB in (s["batch_sizes"] if phase == "baseline" else [B]):
                row = out.setdefault((m, BB), {"model": m, "batch": BB, "one_process": one_process})
                row[f"{phase}_rss_mb" if phase == "baseline" else f"{phase}_peak_rss_mb"] = r["peak_rss_mb"]
                if "peak_cuda_mb" in r:
                    row[f"{phase}_peak_cuda_mb"] = r["peak_cuda_mb"]
    return [out[k] for k in sorted(out, key=lambda k: (k[1], k[0]))]


# --------------------------------------------------------------------------- sampling vs training
def sampling_vs_training(device: torch.device, quick: bool) -> dict:
    """The demo model (difflo's default config) at difflo's auto precision: training images/s (batch 64,
    difflo's step) and guided DDIM network evaluations/s (images through the network per second; 250
    images per call of 2 x 250 with w = 3, as `difflo sample`)."""
    from difflo import config as config_mod
    from difflo.model import Model, build_net
    from difflo.noise_paths import make_path
    from difflo.precision import resolve
    from difflo.generate import SampleSettings, generate

    cfg = config_mod.Config()
    prec = resolve("auto", device, log=lambda *a: None)
    torch.manual_seed(0)
    net = build_net(cfg).to(device)
    B, n, steps = (4, 4, 2) if quick else (64, 250, 10)
    size, c = cfg.model.image_size, cfg.model.in_channels
    path = make_path(cfg.diffusion)
    opt = torch.optim.AdamW(net.parameters(), foreach=True)
    x0, y = torch.randn(B, c, size, size, device=device), torch.randint(0, 10, (B,), device=device)

    def train_step():
        with torch.autocast(device.type, dtype=prec.dtype, enabled=prec.dtype is not None):
            loss = path.training_loss(net, x0, y, cfg.diffusion, torch.Generator(device).manual_seed(0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        train_step()
    sync(device)
    t0 = time.perf_counter()
    k = 2 if quick else 8
    for _ in range(k):
        train_step()
    sync(device)
    train_ips = k * B / (time.perf_counter() - t0)
    calls = []
    net.eval().register_forward_pre_hook(lambda m, args: calls.append(int(args[0].shape[0])))
    settings = SampleSettings(sampler="ddim", steps=steps, w=3.0, precision="auto")
    labels = torch.arange(n) % 10
    generate(Model(net, cfg), labels[:4], range(4), SampleSettings(sampler="ddim", steps=1, w=3.0))   # warm-up
    calls.clear()
    sync(device)
    t0 = time.perf_counter()
    generate(Model(net, cfg), labels, range(n), settings, batch_size=n)
    sync(device)
    evals_s = sum(calls) / (time.perf_counter() - t0)
    return {"precision": str(prec), "train_batch": B, "train_img_s": train_ips, "sample_images": n,
            "sample_batch_per_call": 2 * n, "sample_evals_s": evals_s, "ratio": evals_s / train_ips}


# --------------------------------------------------------------------------- report
ENV_PREFIXES = ("OMP_", "MKL_", "OPENBLAS_", "GOMP_", "KMP_", "MALLOC_", "DIFFLO_", "ONEDNN_", "DNNL_")


def machine(device: torch.device) -> dict:
    from difflo import allocator, precision
    info = {"platform": platform.platform(), "cpu": precision.cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_flags": precision.speed_flags(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "device": str(device), "malloc": allocator.tune_malloc(),
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
            "difflo_auto_precision": str(precision.resolve("auto", device, log=lambda *a: None))}
    try:
        import diffusers
        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def table(res: dict) -> str:
    m = res["machine"]
    lim = res["limits"]
    lines = [f"difflo vs diffusers UNet2DModel - {res['date']} - {m['cpu']} ({m['torch_threads']} threads, "
             f"{m['device']}; flags {' '.join(m['cpu_flags']) or '-'}; torch {m['torch_cpu_capability']})"
             + (" [QUICK: meaningless]" if res["quick"] else ""),
             "environment: " + (", ".join(f"{k}={v}" for k, v in m["env"].items()) or "(no BLAS/OpenMP/malloc "
                                                                                    "variables set)")
             + f"; malloc tuning: {m['malloc']}; difflo precision auto = {m['difflo_auto_precision']}",
             "limit: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in lim.items() if k != "limit")
             + f" GFLOP/s -> {lim['limit']:.1f}"]
    for name, d in res["models"].items():
        lines.append(f"{name:9s}: {d['params'] / 1e6:.3f}M params, {d['train_gflop_per_image']:.3f} GFLOP/image "
                     f"training (fwd+bwd), {d['infer_gflop_per_image']:.3f} GFLOP/image inference")
    keys = list(res["throughput"][0]["train_img_s"])
    lines += ["", "| batch | phase | " + " | ".join(f"{k} img/s" for k in keys) + " | "
              + " | ".join(r for r in res["ratio_names"]) + " | best % of limit |",
              "|---|---|" + "---|" * (len(keys) + len(res["ratio_names"]) + 1)]
    for r in res["throughput"]:
        for kind in ("train", "infer"):
            ips = r[f"{kind}_img_s"]
            ratios = r[f"{kind}_ratios"]
            lines.append(f"| {r['batch']} | {kind} | " + " | ".join(f"{ips[k]:.1f}" for k in keys) + " | "
                         + " | ".join(f"{ratios[n]:.2f}" for n in res["ratio_names"]) + " | "
                         + f"{100 * max(r[f'{kind}_peak_fraction'].values()):.0f}% |")
    lines.append("(medians over alternating repeats; ratios are difflo / diffusers images/s)")
    sv = res.get("sampling")
    if sv:
        lines += ["", f"demo model at difflo's auto precision ({sv['precision']}): training {sv['train_img_s']:.1f} "
                      f"img/s (batch {sv['train_batch']}); guided DDIM {sv['sample_evals_s']:.1f} network "
                      f"evaluations/s ({sv['sample_batch_per_call']} per call) = {sv['ratio']:.2f}x training"]
    lines += ["", f"| batch | model | peak RSS MB: baseline | train | sample |", "|---|---|---|---|---|"]
    for r in res["memory"]:
        lines.append(f"| {r['batch']} | {r['model']} | {r['baseline_rss_mb']:.0f} | {r['train_peak_rss_mb']:.0f} | "
                     f"{r['sample_peak_rss_mb']:.0f} |")
    if res["grid"]:
        g0 = res["grid"][0]
        lines += ["", f"sample grid: {g0['images']} images, w = 3, difflo generate(), model {g0['model']}"]
    for g in res["grid"]:
        lines.append(f"  {g['sampler']:>6} {g['steps']:>5} steps: {g['wall_s']:>8.2f} s, {g['network_calls']} network "
                     f"calls ({g['calls_per_step']:g} per step, batch {g['batch_per_call']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, a few seconds, numbers meaningless")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"), help="where to write the results")
    p.add_argument("--batch-sizes", help="comma-separated (default 32,64,128)")
    p.add_argument("--repeats", type=int, help="alternating repeats per measurement (default 5)")
    p.add_argument("--steps-per-repeat", type=int, help="steps timed per repeat (default 3)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core; --quick: 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile both networks")
    p.add_argument("--grid-model", choices=["demo", "bench"], default="demo",
                   help="model for the sample-grid timings: the default difflo config (demo) or the matched one")
    p.add_argument("--skip-grid", action="store_true", help="no sample-grid timings")
    p.add_argument("--skip-memory", action="store_true", help="no peak-RSS measurements")
    p.add_argument("--rss-child", nargs=3, metavar=("MODEL", "PHASES", "BATCH"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads or a.quick:
        torch.set_num_threads(a.threads or 1)      # the smoke run: one thread, robust on a loaded machine
    from difflo import allocator as difflo_memory, precision
    difflo_memory.tune_malloc()                    # as the difflo CLI does (DIFFLO_MALLOC_TUNING=0 to compare)
    if a.rss_child:
        rss_child(a.rss_child[0], a.rss_child[1].split(","), int(a.rss_child[2]), a.quick, a.device)
        return 0

    s = dict(QUICK if a.quick else FULL)
    if a.batch_sizes:
        s["batch_sizes"] = tuple(int(b) for b in a.batch_sizes.split(","))
    for key in ("repeats", "steps_per_repeat"):
        if getattr(a, key):
            s[key] = getattr(a, key)
    device = torch.device(a.device)
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "quick": a.quick,
           "machine": machine(device), "targets": TARGETS, "compile": a.compile,
           "settings": {k: v for k, v in s.items() if k != "grid"} | {"grid": [list(g) for g in s["grid"]]}}
    # bf16 is measured where the hardware lists it (or on CUDA); elsewhere it is emulated (~100x slower).
    bf16 = device.type == "cuda" or bool(set(res["machine"]["cpu_flags"]) & set(precision.CPU_BF16_FLAGS))
    print("measuring the machine's limits ...", file=sys.stderr)
    res["limits"] = limits(s, device, a.quick, bf16)
    auto = precision.resolve("auto", device, log=lambda *a: None).used
    precs = ["fp32", "bf16"] if bf16 else ["fp32"]
    trainers = {f"{n}@{pr}": Trainer(n, s, device, a.compile, pr) for n in ("difflo", "diffusers") for pr in precs}
    res["ratio_names"] = [f"default (difflo@auto={auto} / diffusers@fp32)"] + [f"same ({pr})" for pr in precs]
    ratio_pairs = {res["ratio_names"][0]: (f"difflo@{auto}", "diffusers@fp32")}
    ratio_pairs.update({f"same ({pr})": (f"difflo@{pr}", f"diffusers@{pr}") for pr in precs})
    res["models"] = {}
    for n in ("difflo", "diffusers"):
        tg, ig = flops_per_image(trainers[f"{n}@fp32"], s["batch_sizes"][0])
        res["models"][n] = {"params": trainers[f"{n}@fp32"].params, "train_gflop_per_image": tg,
                            "infer_gflop_per_image": ig}
    res["throughput"] = []
    for B in s["batch_sizes"]:
        print(f"throughput at batch {B} ...", file=sys.stderr)
        row = {"batch": B}
        for kind in ("train", "infer"):
            rates = throughput(trainers, B, s, device, kind)
            med = {n: statistics.median(v) for n, v in rates.items()}
            gf = {n: med[n] * res["models"][n.split("@")[0]][f"{kind}_gflop_per_image"] for n in med}
            row[f"{kind}_img_s"] = med
            row[f"{kind}_img_s_repeats"] = rates
            row[f"{kind}_ratios"] = {name: med[a_] / med[b_] for name, (a_, b_) in ratio_pairs.items()}
            row[f"{kind}_gflops"] = gf
            row[f"{kind}_peak_fraction"] = {n: gf[n] / res["limits"]["limit"] for n in gf}
        res["throughput"].append(row)
    del trainers
    print("sampling vs training throughput (demo model) ...", file=sys.stderr)
    res["sampling"] = sampling_vs_training(device, a.quick)
    res["memory"] = []
    if not a.skip_memory:
        print("peak memory in fresh processes ...", file=sys.stderr)
        res["memory"] = memory(s, a.quick, a.device, ["difflo", "diffusers"])
    if not a.skip_grid:
        print("sample-grid timings ...", file=sys.stderr)
    res["grid"] = [] if a.skip_grid else grid_timings(s, device, "bench" if a.quick else a.grid_model)
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
