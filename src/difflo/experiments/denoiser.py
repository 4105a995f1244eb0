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

The network D is ``difflo.nn.SmallUNet`` (Conv/BatchNorm/GELU, a 7x7 -> 1x1 bottleneck, skip
connections; hidden width D). This module is the experiment, top to bottom: options and constants,
the data, the training loop (:func:`fit`), the evaluation pieces, one function per part, and
:func:`run_study`. The parts write their figures and tables through ``report.py``, which also
makes ``summary.md`` from the results.

Pixel range: **[0, 1]** in this study, as in the original (x = (x_difflo + 1) / 2, difflo's
batches being in [-1, 1]); sigma is relative to that range, so every MSE is in [0, 1] pixel units.
The noisy z is not clipped. Everything is seeded: the same flags give the same numbers.
"""
from __future__ import annotations

import csv
import math
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
from ..images import plot_loss
from ..io import check_writable
from ..model import pick_device
from ..nn import SmallUNet
from ..train import batch_indices, train
from .denoiser_report import plot_lr_runs, plural, save_rows, write_csv, write_results

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
# Data
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


def shown_digits(labels: np.ndarray) -> np.ndarray:
    """Indices of the first test digit of each class (up to SHOWN of them)."""
    first = {}
    for i, c in enumerate(labels.tolist()):
        first.setdefault(c, i)
    return np.array([first[c] for c in sorted(first)][:SHOWN])


# ---------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------

def new_unet(hidden: int, seed: int) -> SmallUNet:
    """A freshly initialised UNet (weights seeded by ``seed``) on the study's device."""
    torch.manual_seed(seed)
    return SmallUNet(hidden).to(pick_device("auto"))


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


# ---------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------

def part_strip(x: torch.Tensor, eps: torch.Tensor, out: Path) -> dict:
    """Rows: z = x + sigma eps for each sigma."""
    save_rows([(f"sigma {s:g}", x + s * eps) for s in SIGMAS], out / "noising_strip.png")
    return {"sigmas": list(SIGMAS), "figure": "noising_strip.png"}


def part_train(o: StudyOptions, train_x, test_x, test_eps, show, out: Path, log) -> tuple[dict, nn.Module]:
    """Train the sigma = train_sigma model; loss curve, test digits after epoch 1 and the last."""
    net = new_unet(o.hidden, o.seed)
    n_params = sum(p.numel() for p in net.parameters())
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

    log(f"train: UNet D={o.hidden} ({n_params:,} parameters) at sigma "
        f"{o.train_sigma:g}, {plural(o.epochs, 'epoch')} on {len(train_x)} digits")
    losses = fit(net, train_x, lambda x, eps: x + o.train_sigma * eps, o.epochs, o.batch_size, o.lr, o.seed,
                 after_epoch)
    per_epoch = len(losses) // o.epochs
    write_csv(out / "train_metrics.csv", ["step", "epoch", "loss"],
              [[k + 1, k // per_epoch + 1, f"{v:.6f}"] for k, v in enumerate(losses)])
    plot_loss(out / "train_metrics.csv", out / "train_loss.png")
    epoch_loss = [float(np.mean(losses[e * per_epoch:(e + 1) * per_epoch])) for e in range(o.epochs)]
    return {"sigma": o.train_sigma, "parameters": n_params,
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


def read_metrics(run_dir: Path) -> dict[str, list[float]]:
    """difflo.train's metrics.csv as columns step, loss, lr."""
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in ("step", "loss", "lr")}


def flow_run(o: StudyOptions, schedule: str, run_dir: Path, log) -> dict:
    """Train the flow model with one LR schedule (difflo.train) into ``run_dir``; its logged curves."""
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
    return {"run_dir": run_dir.name, "steps": o.flow_steps, "lr_first": m["lr"][0],
            "lr_last": m["lr"][-1], "final_loss": m["loss"][-1],
            "loss_last_10pct": float(np.mean(tail)), "metrics": m,
            "config": {"lr": cfg.train.lr, "warmup_steps": cfg.train.warmup_steps,
                       "min_lr_ratio": cfg.train.min_lr_ratio, "batch_size": cfg.train.batch_size,
                       "weight_decay": cfg.train.weight_decay}}


def part_lr(o: StudyOptions, out: Path, log) -> dict:
    """The flow model trained with each LR schedule; both loss and lr curves on one figure."""
    runs = {schedule: flow_run(o, schedule, out / f"lr_{schedule}", log) for schedule in LR_SCHEDULES}
    plot_lr_runs(runs, out / "lr_comparison.png")
    return {"config": o.flow_config or "configs/mnist10k-flow.yaml", "overrides": list(o.flow_overrides),
            "runs": runs}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def check_out(o: StudyOptions) -> Path:
    out = Path(o.out)
    if out.exists() and not out.is_dir():
        raise DiffloError(f"--out {out} is a file; give a directory")
    check_writable(out, "--out folder")
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
    write_results(out, r)
    return r
