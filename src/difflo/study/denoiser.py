"""A single-step denoiser on MNIST digits: a small UNet trained to map z = x + sigma eps back to x.

The study follows Berkeley CS180/280A Project 5B ("Fun with diffusion models"), Part 1, "Training a
single-step denoising UNet", on difflo's embedded mnist10k digits (train split to train, test split
to evaluate):

1. ``strip``: the noising process z = x + sigma eps, eps ~ N(0, I), for sigma in ``SIGMAS``.
2. ``train``: the UNet D trained at sigma = 0.5 with the L2 loss
   L = E_{x, eps} ||D(x + sigma eps) - x||^2 (mean over pixels); its loss curve, and test digits
   denoised after the first and the last epoch.
3. ``ood``: the sigma = 0.5 model applied at every sigma in ``SIGMAS`` (figure and per-sigma MSE).
4. ``noise``: a fresh UNet trained on z ~ N(0, I) -> x. Here z carries no information about x, so
   the L2-optimal output is the posterior mean E[x | z] = E[x] (the MMSE estimator), i.e. the
   per-pixel mean of the training set: a blurry "average digit". The two are compared.
5. ``lr``: the class-conditional rectified-flow model (``configs/mnist10k-flow.yaml``,
   ``difflo.flow``; Liu et al. 2022) trained twice by ``difflo.train`` with AdamW (Loshchilov &
   Hutter 2019): a constant learning rate vs an exponential decay to lr * min_lr_ratio, both after
   a linear warmup over the first 10% of the steps (the config's 100 warmup steps would be most of
   a short run).

The UNet (Ronneberger, Fischer & Brox 2015, "U-Net"; the project's unconditional UNet):
Conv = Conv3x3 -> BatchNorm -> GELU; ConvBlock = Conv, Conv; DownBlock = stride-2 Conv3x3 ->
BatchNorm -> GELU, ConvBlock; UpBlock = stride-2 ConvTranspose4x4 -> BatchNorm -> GELU, ConvBlock;
Flatten = AvgPool(7) -> GELU (7x7 -> 1x1); Unflatten = ConvTranspose(7, stride 7) -> BatchNorm ->
GELU (1x1 -> 7x7); the skip connections concatenate channels; D is the hidden width.

Pixel range: **[0, 1]** in this study, as in the original (x = (x_difflo + 1) / 2, difflo's
batches being in [-1, 1]); sigma is relative to that range, so every MSE is in [0, 1] pixel units.
The noisy z is not clipped. Everything is seeded: the same flags give the same numbers.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import config as config_mod, data as data_mod
from ..errors import DiffloError
from ..images import grid_image, plot_loss, save_image, to_uint8
from ..sample import pick_device
from ..train import _check_writable, batch_indices, train

SIGMAS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)
PARTS = ("strip", "train", "ood", "noise", "lr")
LR_SCHEDULES = ("constant", "exponential")
FLOW_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "mnist10k-flow.yaml"   # in a source checkout
EVAL_SEED_OFFSET = 1 << 30          # evaluation noise: a generator stream apart from the training steps'
SHOWN = 10                          # digits shown per figure row: the first test digit of each class


@dataclass
class StudyOptions:
    """The flags of ``difflo study denoiser`` (these defaults are the CLI's)."""
    out: Path
    hidden: int = 32                    # UNet hidden width D
    epochs: int = 3                     # epochs of the sigma model
    batch_size: int = 64
    lr: float = 1e-3                    # Adam, both denoisers
    train_sigma: float = 0.5
    noise_epochs: int = 1               # epochs of the pure-noise model
    flow_steps: int = 120               # training steps of each flow run (lr part)
    seed: int = 0
    parts: tuple[str, ...] = PARTS
    limit: int | None = None            # at most this many training digits (None: all 8,000)
    test_images: int = 500              # test digits for the MSE tables (at most 2,000)
    flow_config: str | None = None      # None: the checkout's configs/mnist10k-flow.yaml
    flow_overrides: tuple[str, ...] = field(default_factory=tuple)   # extra key=value for both flow runs
    keep_checkpoints: bool = False      # keep the flow runs' checkpoints (default: deleted after the run)

    def validate(self) -> None:
        """Raise DiffloError naming the first bad value."""
        positive = [("--hidden", self.hidden), ("--epochs", self.epochs), ("--batch-size", self.batch_size),
                    ("--noise-epochs", self.noise_epochs), ("--flow-steps", self.flow_steps),
                    ("--test-images", self.test_images)] + ([("--limit", self.limit)] if self.limit is not None else [])
        for flag, v in positive:
            if v < 1:
                raise DiffloError(f"{flag} must be >= 1, got {v}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise DiffloError(f"--lr must be > 0, got {self.lr}")
        if not (self.train_sigma >= 0 and math.isfinite(self.train_sigma)):
            raise DiffloError(f"--train-sigma must be a noise level >= 0, got {self.train_sigma}")
        if not 0 <= self.seed < 2**62:
            raise DiffloError(f"--seed must be >= 0 and < 2^62, got {self.seed}")
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise DiffloError(f"--parts: unknown part {', '.join(map(repr, unknown)) or '(none given)'}; "
                              f"choose from {','.join(PARTS)} (comma-separated) or 'all'")
        if "ood" in self.parts and "train" not in self.parts:
            raise DiffloError("--parts ood evaluates the model that part 'train' trains; add train to --parts")

    def command(self) -> str:
        """The command line that reruns this study."""
        args = ["difflo", "study", "denoiser", "--out", str(self.out), "--hidden", self.hidden, "--epochs",
                self.epochs, "--batch-size", self.batch_size, "--lr", self.lr, "--train-sigma", self.train_sigma,
                "--noise-epochs", self.noise_epochs, "--flow-steps", self.flow_steps, "--seed", self.seed,
                "--test-images", self.test_images, "--parts", ",".join(self.parts)]
        args += ["--limit", self.limit] if self.limit is not None else []
        args += ["--flow-config", self.flow_config] if self.flow_config else []
        for o in self.flow_overrides:
            args += ["--flow-override", o]
        args += ["--keep-checkpoints"] if self.keep_checkpoints else []
        return shlex.join(str(a) for a in args)


def parse_parts(spec: str) -> tuple[str, ...]:
    """'all' or comma-separated part names -> a tuple in the study's order (validated later)."""
    names = [p.strip() for p in spec.split(",") if p.strip()]
    if names == ["all"]:
        return PARTS
    return tuple(sorted(set(names), key=lambda p: PARTS.index(p) if p in PARTS else len(PARTS)))


# ---------------------------------------------------------------------------------------------
# The UNet
# ---------------------------------------------------------------------------------------------

def conv_bn_gelu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.GELU())


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 convs; the size is kept."""
    return nn.Sequential(conv_bn_gelu(c_in, c_out), conv_bn_gelu(c_out, c_out))


def down_block(c_in: int, c_out: int) -> nn.Sequential:
    """Halve the size (stride-2 conv), then a ConvBlock."""
    return nn.Sequential(conv_bn_gelu(c_in, c_out, stride=2), conv_block(c_out, c_out))


def up_block(c_in: int, c_out: int) -> nn.Sequential:
    """Double the size (stride-2 transposed conv), then a ConvBlock."""
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.GELU(),
                         conv_block(c_out, c_out))


class DenoisingUNet(nn.Module):
    """(B, 1, 28, 28) -> (B, 1, 28, 28): two down blocks, a 7x7 -> 1x1 bottleneck, two up blocks."""

    def __init__(self, hidden: int = 32, channels: int = 1):
        super().__init__()
        D = hidden
        self.inp = conv_block(channels, D)
        self.down1 = down_block(D, D)
        self.down2 = down_block(D, 2 * D)
        self.flatten = nn.Sequential(nn.AvgPool2d(7), nn.GELU())
        self.unflatten = nn.Sequential(nn.ConvTranspose2d(2 * D, 2 * D, 7, 7), nn.BatchNorm2d(2 * D), nn.GELU())
        self.up2 = up_block(4 * D, D)
        self.up1 = up_block(2 * D, D)
        self.head = nn.Sequential(conv_block(2 * D, D), nn.Conv2d(D, channels, 3, 1, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h0 = self.inp(z)                                      # (B, D, 28, 28)
        h1 = self.down1(h0)                                   # (B, D, 14, 14)
        h2 = self.down2(h1)                                   # (B, 2D, 7, 7)
        h = self.unflatten(self.flatten(h2))                  # (B, 2D, 1, 1) -> (B, 2D, 7, 7)
        h = self.up2(torch.cat([h, h2], dim=1))               # (B, 4D, 7, 7) -> (B, D, 14, 14)
        h = self.up1(torch.cat([h, h1], dim=1))               # (B, 2D, 14, 14) -> (B, D, 28, 28)
        return self.head(torch.cat([h, h0], dim=1))           # (B, 2D, 28, 28) -> (B, 1, 28, 28)


# ---------------------------------------------------------------------------------------------
# Data, noise, training, evaluation
# ---------------------------------------------------------------------------------------------

def load_digits(split: str, limit: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """The first ``limit`` mnist10k digits of a split: images (N, 1, 28, 28) in [0, 1], labels (N,)."""
    ds = data_mod.load("mnist10k", split)
    n = len(ds) if limit is None else min(limit, len(ds))
    x, y = ds.batch(np.arange(n))                             # (N, 1, 28, 28) in [-1, 1]
    return (x + 1) / 2, y.numpy()


def eval_noise(shape, seed: int) -> torch.Tensor:
    """The fixed eps ~ N(0, I) used for every evaluation (the same eps at every sigma)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET))


def fit(net: nn.Module, images: torch.Tensor, make_input, epochs: int, batch_size: int, lr: float, seed: int,
        after_epoch=None) -> list[float]:
    """Adam on the L2 loss mean((net(z) - x)^2) with z = make_input(x, eps); returns the loss of every step.

    Batch order is difflo.train's (a permutation per epoch seeded by (seed, epoch)); the eps of step k
    comes from a generator seeded by (seed, k). ``after_epoch(epoch)`` runs after each epoch (1-based)."""
    device = next(net.parameters()).device
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    per_epoch = max(1, len(images) // batch_size)
    losses = []
    for step in range(epochs * per_epoch):
        net.train()
        x = images[batch_indices(step, len(images), batch_size, seed)].to(device)           # (B, 1, 28, 28)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        z = make_input(x, torch.randn(x.shape, generator=gen).to(device))                   # (B, 1, 28, 28)
        loss = F.mse_loss(net(z), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % per_epoch == 0 and after_epoch is not None:
            after_epoch((step + 1) // per_epoch)
    return losses


@torch.no_grad()
def denoise(net: nn.Module, z: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """net(z) in eval mode (BatchNorm running statistics), in batches; (N, 1, 28, 28) -> same, on CPU."""
    net.eval()
    device = next(net.parameters()).device
    return torch.cat([net(z[i:i + batch_size].to(device)).cpu() for i in range(0, len(z), batch_size)])


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.mse_loss(a.float(), b.float()).item()


def new_unet(hidden: int, seed: int) -> DenoisingUNet:
    torch.manual_seed(seed)
    return DenoisingUNet(hidden).to(pick_device("auto"))


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def save_rows(rows: list[tuple[str, torch.Tensor]], path: Path) -> None:
    """A labelled grid, one row per (label, (N, 1, H, W) images in [0, 1]); every row as long as the
    first, except the last, which may be shorter."""
    images = torch.cat([x for _, x in rows]).clamp(0, 1) * 2 - 1              # to difflo's [-1, 1]
    save_image(grid_image(to_uint8(images), len(rows[0][1]), [label for label, _ in rows]), path)


def write_text(path: Path, text: str) -> None:
    """Write atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)


def read_metrics(run_dir: Path) -> dict[str, list[float]]:
    """difflo.train's metrics.csv as columns step, loss, lr."""
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in ("step", "loss", "lr")}


# ---------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------

def shown_digits(labels: np.ndarray) -> np.ndarray:
    """Indices of the first test digit of each class (up to SHOWN of them)."""
    first = {}
    for i, c in enumerate(labels.tolist()):
        first.setdefault(c, i)
    return np.array([first[c] for c in sorted(first)][:SHOWN])


def part_strip(x: torch.Tensor, eps: torch.Tensor, out: Path) -> dict:
    """Rows: z = x + sigma eps for each sigma."""
    save_rows([(f"sigma {s:g}", x + s * eps) for s in SIGMAS], out / "noising_strip.png")
    return {"sigmas": list(SIGMAS), "figure": "noising_strip.png"}


def part_train(o: StudyOptions, train_x, test_x, test_eps, show, out: Path, log) -> tuple[dict, nn.Module]:
    """Train the sigma = train_sigma model; loss curve, test digits after epoch 1 and the last."""
    net = new_unet(o.hidden, o.seed)
    z_test = test_x + o.train_sigma * test_eps                                          # (N, 1, 28, 28)
    test_mse = {}

    def after_epoch(epoch: int) -> None:
        if epoch in (1, o.epochs):
            x_hat = denoise(net, z_test)                                                # (N, 1, 28, 28)
            test_mse[epoch] = mse(x_hat, test_x)
            rows = [("clean", test_x[show]), (f"noisy {o.train_sigma:g}", z_test[show]),
                    (f"denoised ep {epoch}", x_hat[show])]
            if epoch == 1:
                save_rows(rows, out / "denoised_epoch1.png")
            if epoch == o.epochs:
                save_rows(rows, out / "denoised_last.png")
        log(f"  epoch {epoch}/{o.epochs}" + (f": test MSE {test_mse[epoch]:.4f}" if epoch in test_mse else ""))

    log(f"train: UNet D={o.hidden} ({sum(p.numel() for p in net.parameters()):,} parameters) at sigma "
        f"{o.train_sigma:g}, {plural(o.epochs, 'epoch')} on {len(train_x)} digits")
    losses = fit(net, train_x, lambda x, eps: x + o.train_sigma * eps, o.epochs, o.batch_size, o.lr, o.seed,
                 after_epoch)
    per_epoch = len(losses) // o.epochs
    write_csv(out / "train_metrics.csv", ["step", "epoch", "loss"],
              [[k + 1, k // per_epoch + 1, f"{v:.6f}"] for k, v in enumerate(losses)])
    plot_loss(out / "train_metrics.csv", out / "train_loss.png")
    epoch_loss = [float(np.mean(losses[e * per_epoch:(e + 1) * per_epoch])) for e in range(o.epochs)]
    return {"sigma": o.train_sigma, "parameters": sum(p.numel() for p in net.parameters()),
            "steps": len(losses), "steps_per_epoch": per_epoch, "epoch_mean_loss": epoch_loss,
            "final_step_loss": losses[-1], "test_mse_epoch1": test_mse[1], "test_mse_last": test_mse[o.epochs],
            "test_mse_noisy_input": mse(z_test, test_x)}, net


def part_ood(net: nn.Module, test_x, test_eps, show, out: Path) -> list[dict]:
    """The trained model at every sigma: figure rows noisy/denoised per sigma, per-sigma MSE table."""
    rows, table = [], []
    for s in SIGMAS:
        z = test_x + s * test_eps                                                      # (N, 1, 28, 28)
        x_hat = denoise(net, z)
        table.append({"sigma": s, "mse_noisy": mse(z, test_x), "mse_denoised": mse(x_hat, test_x)})
        rows += [(f"{s:g} noisy", z[show]), (f"{s:g} denoised", x_hat[show])]
    save_rows(rows, out / "ood.png")
    write_csv(out / "ood_mse.csv", ["sigma", "mse_noisy", "mse_denoised"],
              [[r["sigma"], f"{r['mse_noisy']:.6f}", f"{r['mse_denoised']:.6f}"] for r in table])
    return table


def part_noise(o: StudyOptions, train_x, test_x, out: Path, log) -> dict:
    """Train on z ~ N(0, I) -> x; compare the outputs on fresh noise with the per-pixel training mean."""
    net = new_unet(o.hidden, o.seed)
    log(f"noise: UNet D={o.hidden} trained on pure noise -> digit, {plural(o.noise_epochs, 'epoch')}")
    losses = fit(net, train_x, lambda x, eps: eps, o.noise_epochs, o.batch_size, o.lr, o.seed)
    mean = train_x.mean(dim=0, keepdim=True)                                          # (1, 1, 28, 28)
    x_hat = denoise(net, eval_noise((o.test_images, 1, 28, 28), o.seed + 1))          # (N, 1, 28, 28)
    save_rows([("from pure noise", x_hat[:SHOWN]), ("training mean", mean)], out / "pure_noise.png")
    per_epoch = len(losses) // o.noise_epochs
    return {"samples": len(x_hat), "mse_to_train_mean": mse(x_hat, mean.expand_as(x_hat)),
            "mse_output_average_to_train_mean": mse(x_hat.mean(dim=0, keepdim=True), mean),
            "output_std_across_noise": x_hat.std(dim=0).mean().item(),
            "mse_test_to_train_mean": mse(test_x, mean.expand_as(test_x)),
            "last_epoch_mean_loss": float(np.mean(losses[-per_epoch:])), "steps": len(losses)}


def flow_config_path(o: StudyOptions) -> Path:
    if o.flow_config:
        return Path(o.flow_config)
    return FLOW_CONFIG if FLOW_CONFIG.is_file() else Path("configs/mnist10k-flow.yaml")


def part_lr(o: StudyOptions, out: Path, log) -> dict:
    """Train the flow model with each LR schedule (difflo.train); both loss and lr curves on one figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for schedule in LR_SCHEDULES:
        run_dir = out / f"lr_{schedule}"
        overrides = [f"train.steps={o.flow_steps}", f"train.lr_schedule={schedule}", "train.sample_every=0",
                     f"train.ckpt_every={o.flow_steps}", f"train.seed={o.seed}",
                     f"train.warmup_steps={max(1, o.flow_steps // 10)}",          # warmup: 10% of the run
                     f"train.log_every={max(1, o.flow_steps // 50)}", *o.flow_overrides]
        cfg = config_mod.load(flow_config_path(o), overrides)
        log(f"lr: flow model, {schedule} learning rate, {o.flow_steps} steps -> {run_dir}")
        train(cfg, run_dir, log=lambda msg: log(f"  {msg}"), progress=False)
        if not o.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        if (run_dir / "samples").is_dir() and not any((run_dir / "samples").iterdir()):
            (run_dir / "samples").rmdir()
        m = read_metrics(run_dir)
        tail = [v for s, v in zip(m["step"], m["loss"]) if s > 0.9 * o.flow_steps] or m["loss"][-1:]
        runs[schedule] = {"run_dir": run_dir.name, "steps": o.flow_steps, "lr_first": m["lr"][0],
                          "lr_last": m["lr"][-1], "final_loss": m["loss"][-1],
                          "loss_last_10pct": float(np.mean(tail)), "metrics": m}
        runs[schedule]["config"] = {"lr": cfg.train.lr, "warmup_steps": cfg.train.warmup_steps,
                                    "min_lr_ratio": cfg.train.min_lr_ratio, "batch_size": cfg.train.batch_size,
                                    "weight_decay": cfg.train.weight_decay}

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for schedule, r in runs.items():
        ax_loss.plot(r["metrics"]["step"], r["metrics"]["loss"], lw=1.4, label=f"{schedule} lr")
        ax_lr.plot(r["metrics"]["step"], r["metrics"]["lr"], lw=1.4, label=f"{schedule} lr")
    ax_loss.set(xlabel="step", ylabel="flow-matching loss (logged mean)", yscale="log",
                title="class-conditional flow model, AdamW")
    ax_lr.set(xlabel="step", ylabel="learning rate", yscale="log", title="learning rate")
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, out / "lr_comparison.png")
    return {"config": o.flow_config or "configs/mnist10k-flow.yaml", "overrides": list(o.flow_overrides),
            "runs": runs}


# ---------------------------------------------------------------------------------------------
# Summary and driver
# ---------------------------------------------------------------------------------------------

def fmt(v: float) -> str:
    """A number in the summary: 4 significant digits."""
    return f"{v:.4g}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def summary_markdown(o: StudyOptions, r: dict) -> str:
    """The summary; every number comes from ``r`` (the results.json dict)."""
    t = r["timing_s"]
    lines = ["# Single-step denoiser study", "",
             f"Command: `{r['command']}`", "",
             f"Seed {o.seed}; wall time {t['total']:.0f} s ("
             + ", ".join(f"{p} {t[p]:.0f} s" for p in o.parts) + f") on {r['device']} "
             f"with {r['torch_threads']} torch threads. Data: mnist10k, {r['train_digits']} training digits, "
             f"{r['test_digits']} test digits for the MSE tables. Pixel range **[0, 1]** (sigma relative to "
             f"it, z = x + sigma eps, not clipped); every MSE is the mean over pixels and images in [0, 1] "
             f"units. Figures show the first test digit of each class.", ""]
    if "strip" in r:
        lines += ["## Noising strip", "", "![noising strip](noising_strip.png)", "",
                  "Rows: z = x + sigma eps for sigma = " + ", ".join(f"{s:g}" for s in r["strip"]["sigmas"])
                  + " (the same eps in every row).", ""]
    if "train" in r:
        tr = r["train"]
        lines += [f"## Training at sigma = {tr['sigma']:g}", "",
                  f"UNet with hidden width D = {o.hidden} ({tr['parameters']:,} parameters), Adam lr {o.lr:g}, "
                  f"batch {o.batch_size}, {plural(o.epochs, 'epoch')} ({tr['steps']} steps), L2 loss.", "",
                  "![training loss](train_loss.png)", "",
                  "| epoch | mean training loss |", "|---|---|"]
        lines += [f"| {e + 1} | {fmt(v)} |" for e, v in enumerate(tr["epoch_mean_loss"])]
        last = (f", after epoch {o.epochs} {fmt(tr['test_mse_last'])} ("
                + ("lower" if tr["test_mse_last"] < tr["test_mse_epoch1"] else "not lower") + " than after epoch 1)"
                if o.epochs > 1 else "")
        lines += ["", f"Test MSE at sigma {tr['sigma']:g}: noisy input {fmt(tr['test_mse_noisy_input'])}, denoised "
                  f"after epoch 1 {fmt(tr['test_mse_epoch1'])}{last}.", "",
                  "![denoised after epoch 1](denoised_epoch1.png)", "",
                  f"![denoised after epoch {o.epochs}](denoised_last.png)", "",
                  "Rows: clean test digits, noisy input, denoised output.", ""]
    if "ood" in r:
        table = r["ood"]
        best = min(table, key=lambda row: row["mse_denoised"])
        trained = next((row for row in table if row["sigma"] == o.train_sigma), None)
        lines += [f"## Out of distribution: the sigma = {o.train_sigma:g} model at every sigma", "",
                  "![out of distribution](ood.png)", "",
                  "| sigma | MSE noisy input | MSE denoised |", "|---|---|---|"]
        lines += [f"| {row['sigma']:g} | {fmt(row['mse_noisy'])} | {fmt(row['mse_denoised'])} |" for row in table]
        top = table[-1]
        helped = [f"{row['sigma']:g}" for row in table if row["mse_denoised"] < row["mse_noisy"]]
        lines += ["", f"(also in `ood_mse.csv`). The denoised MSE is lowest at sigma {best['sigma']:g} "
                  f"({fmt(best['mse_denoised'])})"
                  + (f"; at the training sigma it is {fmt(trained['mse_denoised'])}" if trained else "")
                  + f"; at sigma {top['sigma']:g} it is {fmt(top['mse_denoised'])}, "
                  + f"{top['mse_denoised'] / best['mse_denoised']:.1f}x the lowest. The output is closer to the "
                  f"clean digit than the input was at sigma " + (", ".join(helped) or "none") + ". Rows of the "
                  f"figure: noisy input and denoised output for each sigma.", ""]
    if "noise" in r:
        nz = r["noise"]
        lines += ["## Denoising pure noise", "", "![pure noise](pure_noise.png)", "",
                  f"A fresh UNet (D = {o.hidden}) trained {plural(o.noise_epochs, 'epoch')} ({nz['steps']} steps) "
                  f"to map "
                  f"z ~ N(0, I) to a training digit. z says nothing about x, so the L2-optimal output is E[x], "
                  f"the per-pixel mean of the training set (bottom row). On {nz['samples']} fresh noise inputs:", "",
                  f"- MSE between the outputs and the training-set mean: **{fmt(nz['mse_to_train_mean'])}** "
                  f"(MSE between the average output and the mean: {fmt(nz['mse_output_average_to_train_mean'])}; "
                  f"per-pixel standard deviation of the outputs across inputs: "
                  f"{fmt(nz['output_std_across_noise'])});",
                  f"- for scale, the MSE between a test digit and the mean (about the smallest loss a pure-noise "
                  f"denoiser can reach) is {fmt(nz['mse_test_to_train_mean'])}; the model's mean training loss in "
                  f"its last epoch was {fmt(nz['last_epoch_mean_loss'])}.", "",
                  f"The outputs are {nz['mse_test_to_train_mean'] / max(nz['mse_to_train_mean'], 1e-12):.1f}x "
                  f"closer (in MSE) to the training mean than test digits are.", ""]
    if "lr" in r:
        runs = r["lr"]["runs"]
        c = next(iter(runs.values()))["config"]
        lines += ["## Learning rate: exponential decay vs constant (flow model, AdamW)", "",
                  "![lr comparison](lr_comparison.png)", "",
                  f"The class-conditional flow model of `{r['lr']['config']}` trained {o.flow_steps} steps per "
                  f"run by difflo.train (AdamW, weight decay {c['weight_decay']:g}, batch {c['batch_size']}, "
                  f"lr {c['lr']:g} after {c['warmup_steps']} warmup steps; exponential: decays to lr x "
                  f"{c['min_lr_ratio']:g} at the last step)"
                  + (f", overrides {', '.join(r['lr']['overrides'])}" if r["lr"]["overrides"] else "")
                  + ". Both runs see the same batches and noise (same seed). Run directories: "
                  + ", ".join(f"`{v['run_dir']}/`" for v in runs.values()) + ".", "",
                  "| lr schedule | lr at first / last log | final logged loss | mean loss, last 10% of steps |",
                  "|---|---|---|---|"]
        lines += [f"| {s} | {v['lr_first']:.3g} / {v['lr_last']:.3g} | {fmt(v['final_loss'])} | "
                  f"{fmt(v['loss_last_10pct'])} |" for s, v in runs.items()]
        (a, ra), (b, rb) = runs.items()
        diff = rb["loss_last_10pct"] - ra["loss_last_10pct"]
        lines += ["", f"Over the last 10% of steps the {b} schedule's mean loss minus the {a} schedule's: "
                  f"{diff:+.4f} ({100 * diff / ra['loss_last_10pct']:+.1f}%).", ""]
    return "\n".join(lines)


def check_out(o: StudyOptions) -> Path:
    out = Path(o.out)
    if out.exists() and not out.is_dir():
        raise DiffloError(f"--out {out} is a file; give a directory")
    _check_writable(out)
    if "lr" in o.parts:
        for schedule in LR_SCHEDULES:
            if (out / f"lr_{schedule}" / "checkpoints").exists():
                raise DiffloError(f"{out / f'lr_{schedule}'} already holds a flow run with checkpoints; "
                                  f"delete it or choose another --out")
    return out


def run_study(o: StudyOptions, log=print) -> dict:
    """Run the selected parts into ``o.out``; returns the results (also written to results.json)."""
    o.validate()
    out = check_out(o)
    start = time.time()
    if "lr" in o.parts:                                    # fail on a bad flow config before training anything
        config_mod.load(flow_config_path(o), list(o.flow_overrides))          # (train() validates the rest)
    train_x, _ = load_digits("train", o.limit)                                  # (N, 1, 28, 28) in [0, 1]
    test_x, test_y = load_digits("test", o.test_images)
    test_eps = eval_noise(test_x.shape, o.seed)                                 # (N, 1, 28, 28)
    show = shown_digits(test_y)
    r = {"command": o.command(), "options": {k: (list(v) if isinstance(v, tuple) else v)
                                             for k, v in asdict(o).items() if k != "out"},
         "out": str(out), "pixel_range": [0.0, 1.0], "device": str(pick_device("auto")),
         "torch_threads": torch.get_num_threads(), "train_digits": len(train_x), "test_digits": len(test_x),
         "timing_s": {}}

    def timed(part: str, fn):
        t0 = time.time()
        value = fn()
        r["timing_s"][part] = time.time() - t0
        return value

    if "strip" in o.parts:
        r["strip"] = timed("strip", lambda: part_strip(test_x[show], test_eps[show], out))
    if "train" in o.parts:
        r["train"], net = timed("train", lambda: part_train(o, train_x, test_x, test_eps, show, out, log))
        if "ood" in o.parts:
            r["ood"] = timed("ood", lambda: part_ood(net, test_x, test_eps, show, out))
    if "noise" in o.parts:
        r["noise"] = timed("noise", lambda: part_noise(o, train_x, test_x, out, log))
    if "lr" in o.parts:
        r["lr"] = timed("lr", lambda: part_lr(o, out, log))
    r["timing_s"]["total"] = time.time() - start
    write_text(out / "results.json", json.dumps(r, indent=1) + "\n")
    write_text(out / "summary.md", summary_markdown(o, r))
    return r
