"""The training loop, top to bottom (nanoGPT style).

Determinism: batch order comes from a permutation per epoch seeded by (seed, epoch); the noise,
timesteps and label dropout of step k come from a generator seeded by (seed, k); dropout inside the
network from the global RNG, also re-seeded at every step. So a run stopped at step k and resumed
computes exactly the steps an uninterrupted run would (tests/unit/test_train.py pins this).

Gradient accumulation (train.grad_accum = K) splits the batch into K micro-batches of rows: each draws
the noise and timesteps of the whole batch from the same generator state and uses its own rows (as a
data-parallel rank does), so every image gets the draws it gets with K = 1, and the summed gradients
of the K losses / K are the whole batch's up to float summation order (tests/unit/test_grad_accum.py).
"""
from __future__ import annotations

import copy
import csv
import functools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint, config as config_mod, data as data_mod
from . import distributed, guards, allocator, posthoc_ema, precision
from .errors import DiffloError
from .eval.periodic import EVAL_METRICS, PeriodicEval, csv_value
from .images import grid_image, plot_loss, save_image, to_uint8
from .io import check_writable, write_text_atomic
from .model import Model, build_net, pick_device
from .noise_paths import make_path
from .generate import generate

METRICS_FIELDS = ["step", "loss", "lr", "images_per_s", "elapsed_s", *EVAL_METRICS]


def lr_at(step: int, t: config_mod.TrainConfig, elapsed: float = 0.0) -> float:
    """1) linear warmup over warmup_steps, then 2) constant, or a decay to lr * min_lr_ratio at the
    end: cosine, or exponential (lr * min_lr_ratio^progress). The end is the last step, or with
    train.max_minutes the time budget if that comes first: progress = max(steps done, time used)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    if t.max_minutes is not None:
        progress = max(progress, min(1.0, elapsed / (60 * t.max_minutes)))
    if t.lr_schedule == "exponential":
        return t.lr * t.min_lr_ratio ** progress
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_decay_at(step: int, t: config_mod.TrainConfig) -> float:
    """EMA decay with warmup (as in TensorFlow's ExponentialMovingAverage num_updates):
    min(decay, (1 + k) / (10 + k)), so early averages are not dominated by the random init."""
    return min(t.ema_decay, (1 + step) / (10 + step)) if t.ema_warmup else t.ema_decay


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of step's batch: epoch e = step // (n // B) is a permutation seeded by (seed, e)."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = _permutation(n, seed, epoch)
    if batch_size > n:                                    # tiny data sets: sample with repeats
        return np.random.default_rng([seed, epoch, 1]).choice(n, batch_size)
    return perm[k * batch_size:(k + 1) * batch_size].copy()          # the cached order stays read-only


@functools.lru_cache(maxsize=1)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order, computed once per epoch rather than at every step (read-only)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.flags.writeable = False
    return perm


def resolve(cfg: config_mod.Config, dataset: data_mod.ArrayDataset) -> config_mod.Config:
    """Fill in what the data decides (channels, size, classes) and validate."""
    cfg = copy.deepcopy(cfg)
    cfg.model.in_channels = dataset.channels
    cfg.model.image_size = dataset.image_size
    cfg.model.num_classes = dataset.num_classes
    cfg.data.classes = tuple(dataset.classes)       # names travel with the model (grids, --classes, serve)
    cfg.validate()
    return cfg


def _start_metrics(metrics_path: Path, step: int) -> None:
    """A fresh metrics.csv, or on resume the old one without the rows logged after ``step``."""
    if step == 0 or not metrics_path.exists():
        with open(metrics_path, "w", newline="") as f:
            csv.writer(f).writerow(METRICS_FIELDS)
    else:                                    # drop rows logged after the checkpoint we resume from
        with open(metrics_path) as f:
            header, *rows = [r for r in csv.reader(f)] or [[]]
        rows = [r for r in rows if len(r) == len(header) and r[0].isdigit()]   # a row cut by a kill
        with open(metrics_path, "w", newline="") as f:       # columns by name: an older run's file gains
            w = csv.writer(f)                                # the columns added since, empty
            w.writerow(METRICS_FIELDS)
            w.writerows([dict(zip(header, r)).get(k, "") for k in METRICS_FIELDS] for r in rows if int(r[0]) <= step)


# ----------------------------------------------------------------------------- what the loop calls
def environment(device: torch.device, prec: precision.Precision, layout: tuple[str, str]) -> dict:
    """RUN/environment.json: where and how the last (re)start trained (the precision and the batch's
    memory layout chosen, and why)."""
    return {"precision": {"asked": prec.asked, "used": prec.used, "why": prec.why},
            "layout": {"used": layout[0], "why": layout[1]}, "device": str(device),
            "cpu": precision.cpu_model(), "cpu_flags": precision.speed_flags(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "malloc": allocator.tune_malloc(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def tensorboard(log: tuple[str, ...]):
    """torch's SummaryWriter class when train.log has tensorboard, else None. Looked up when training
    starts, so a missing package is one error line then, not a failure at the first log row."""
    if "tensorboard" not in log:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DiffloError('train.log has tensorboard but the tensorboard package is not installed: '
                          'pip install "difflo[tensorboard]" (or drop tensorboard from train.log)') from None
    return SummaryWriter


def append_metrics(metrics_path: Path, row: list, tb=None) -> None:
    """A metrics.csv row; with a SummaryWriter ``tb``, its filled-in numbers also as TensorBoard scalars
    (tags: the column names; elapsed_s is TensorBoard's own wall time)."""
    with open(metrics_path, "a", newline="") as f:
        csv.writer(f).writerow(row)
    if tb is not None:
        for name, value in zip(METRICS_FIELDS, row):
            if name not in ("step", "elapsed_s") and value != "":
                tb.add_scalar(name, float(value), int(row[0]))


def save(run_dir: Path, step: int, cfg_dict: dict, net, ema, opt, scaler, keep: int, posthoc=None) -> Path:
    """A checkpoint of step (weights, EMA, optimizer, grad scaler, post-hoc EMA averages), then the loss plot."""
    state = {"optimizer": opt.state_dict(), "step": step}
    if scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    if posthoc is not None:
        state["posthoc"] = posthoc.state_dict()
    path = checkpoint.save_checkpoint(run_dir, step, cfg_dict, net.state_dict(), ema.state_dict(), state, keep=keep)
    plot_loss(run_dir / "metrics.csv", run_dir / "loss.png")
    return path


def sample_grid(run_dir: Path, step: int, ema, cfg: config_mod.Config, per_class: int = 8, tb=None) -> None:
    """RUN/samples/step_N.png: per_class EMA samples of every class, with the run's own sample settings
    (cfg.sample: what ``difflo sample`` gives by default); also to TensorBoard (``tb``) as "samples"."""
    n_cls = max(cfg.model.num_classes, 1)
    labels = torch.arange(n_cls).repeat_interleave(per_class)
    model = Model(ema, cfg)
    imgs = generate(model, labels, seeds=range(len(labels)), settings=cfg.sample)
    grid = grid_image(to_uint8(imgs), per_class, [model.class_label(c) for c in range(n_cls)]
                      if cfg.model.num_classes else None)                                 # names, if known
    save_image(grid, run_dir / "samples" / f"step_{step:07d}.png")
    if tb is not None:
        tb.add_image("samples", np.asarray(grid), step, dataformats="HWC")       # grid_image is RGB


def eval_row(step: int, elapsed: float, res: dict) -> list:
    """A metrics.csv row of an evaluation: no loss, the scores in their columns."""
    return [step, "", "", "", f"{elapsed:.1f}"] + [csv_value(k, res[k]) if k in res else "" for k in EVAL_METRICS]


# ----------------------------------------------------------------------------- the loop
def train(cfg: config_mod.Config, run_dir: str | Path, resume: bool = False, progress: bool | None = None,
          log=print, on_step=None) -> Path | None:
    """Train a model as configured into ``run_dir``; returns the last checkpoint directory.

    ``on_step(step, net)``, if given, is called on rank 0 after every update with the number of steps
    done and the raw network (e.g. to keep extra EMA copies, as ``difflo experiment`` does)."""
    run_dir = Path(run_dir)
    t = cfg.train
    allocator.tune_malloc()                              # large tensors stay in the heap (difflo.allocator)
    ddp = distributed.setup(pick_device(t.device))   # torchrun: this process's rank and device
    device = ddp.device
    prec = precision.resolve(t.precision, device, log, "train.precision")   # auto: bf16 where the hardware has it
    layout = precision.training_layout(prec, device)  # the batch's memory layout, which every activation keeps
    layout_format = precision.LAYOUTS[layout[0]]
    rows = ddp.rows(t.batch_size)                     # this process's rows of the global batch
    micro = ddp.micro_batches(t.batch_size, t.grad_accum)   # ... split into train.grad_accum micro-batches
    summary_writer = tensorboard(t.log)               # train.log: [csv, tensorboard]; a missing package fails here
    if not ddp.main:                                  # logging, samples, checkpoints: rank 0 only
        log, progress = (lambda *a, **k: None), False
    dataset = data_mod.from_config(cfg.data)
    cfg = resolve(cfg, dataset)

    # 1) The run directory: refuse to overwrite a run unless resuming it.
    existing = checkpoint.list_checkpoints(run_dir)
    if existing and not resume:
        raise DiffloError(f"{run_dir} already holds a run (checkpoint {existing[-1].name}); "
                          f"pass --resume to continue it or choose another --out")
    if ddp.main:
        check_writable(run_dir)
        (run_dir / "samples").mkdir(exist_ok=True)

    # 2) Model, EMA copy, optimizer, the path (which knows its own training loss).
    torch.manual_seed(t.seed)
    net = build_net(cfg).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay,
                            foreach=True)              # one multi-tensor kernel per op (same numbers as the loop)
    path = make_path(cfg.diffusion)
    n_params = sum(p.numel() for p in net.parameters())
    model = ddp.wrap(net)                             # DistributedDataParallel when data-parallel
    if t.compile:
        model = precision.compile_net(model, device)
    scaler = precision.grad_scaler(prec, device)
    guards.check_free_space(run_dir, n_params, t.keep_checkpoints, 4 * n_params * len(t.posthoc_ema))

    # 3) Resume: weights, EMA, optimizer and step from the last complete checkpoint.
    step = 0
    if resume and existing:
        ckpt = checkpoint.latest_intact(existing, log)          # a corrupt newest one: the previous
        state, saved_cfg, _ = checkpoint.load_weights(ckpt / "model.safetensors")
        saved = config_mod.from_dict(saved_cfg).to_dict()     # keys added since the run wrote it at their defaults
        if saved["model"] != cfg.to_dict()["model"] or saved["diffusion"] != cfg.to_dict()["diffusion"]:
            raise DiffloError(f"--resume: the model/diffusion config differs from the run's ({ckpt}); "
                              f"resume with the run's own config ({run_dir / 'config.yaml'})")
        net.load_state_dict(state)
        ema.load_state_dict(checkpoint.load_weights(ckpt / "ema.safetensors")[0])
        ts = checkpoint.load_train_state(ckpt)
        opt.load_state_dict(ts["optimizer"])
        if "scaler" in ts:
            scaler.load_state_dict(ts["scaler"])
        step = int(ts["step"])
        log(f"resuming {run_dir} from step {step} ({ckpt.name})")
    cfg_dict = cfg.to_dict()
    posthoc = None                                         # train.posthoc_ema: power-function EMAs (rank 0)
    if t.posthoc_ema and ddp.main:
        posthoc = posthoc_ema.PowerEMA(net, t.posthoc_ema, t.posthoc_every or t.ckpt_every,
                                       run_dir / posthoc_ema.SNAPSHOT_DIR, cfg_dict)
        if step:                                           # resumed: continue the checkpoint's averages
            posthoc.load_state_dict(ts.get("posthoc"), step, ckpt)
    metrics_path = run_dir / "metrics.csv"
    if ddp.main:
        write_text_atomic(run_dir / "config.yaml", config_mod.dump(cfg))
        write_text_atomic(run_dir / "environment.json", json.dumps(environment(device, prec, layout), indent=1))
        _start_metrics(metrics_path, step)
    tb = None                                              # RUN/tensorboard/ event files (rank 0)
    if summary_writer is not None and ddp.main:            # resume: events after step are dropped, as csv rows are
        tb = summary_writer(str(run_dir / "tensorboard"), purge_step=step + 1 if step else None)

    def checkpoint_now(step: int) -> None:                 # rank 0 writes; the others only keep count
        if ddp.main:
            save(run_dir, step, cfg_dict, net, ema, opt, scaler, t.keep_checkpoints, posthoc)
            if tb is not None:
                tb.flush()

    # 4) Loop state.
    if progress is None:
        progress = sys.stderr.isatty()
    start = time.time()                                     # wall clock of this process's training
    window_t, window_loss, window_n = start, 0.0, 0         # the loss/throughput log window
    last_saved = step                                       # the step of the newest checkpoint
    evaluator: PeriodicEval | None = None                   # built at the first evaluation (eval.every)
    guard = guards.NonFiniteGuard(t.max_nonfinite_steps, run_dir, t.lr, log)
    log(f"training {n_params / 1e6:.2f}M-parameter UNet on {dataset.name} ({len(dataset)} images, "
        f"{cfg.model.image_size}x{cfg.model.image_size}x{cfg.model.in_channels}) on {device}, "
        f"precision {prec}, layout {layout[0]}, steps {step}..{t.steps}, run dir {run_dir}"
        + (f", data-parallel over {ddp.world} processes ({ddp.backend}), {rows.stop - rows.start} of the "
           f"{t.batch_size} images per step each" if ddp.active else ""))
    bar = tqdm(total=t.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)

    # 5) The loop.
    net.train()
    while step < t.steps and not guards.stop_requested():         # SIGINT/SIGTERM: save, stop (guards.py)
        lr = lr_at(step, t, time.time() - start)
        for g in opt.param_groups:
            g["lr"] = lr
        gen = torch.Generator(device).manual_seed(t.seed * 1_000_003 + step)
        x0, y = dataset.batch(batch_indices(step, len(dataset), t.batch_size, t.seed), device, gen)  # (B, C, H, W)
        x0 = x0.contiguous(memory_format=layout_format)
        torch.manual_seed((t.seed * 1_000_003 + step) * ddp.world + ddp.rank)   # dropout
        drop = torch.rand(y.shape, generator=gen, device=device) < t.label_dropout
        y = torch.where(drop, torch.full_like(y, cfg.model.num_classes), y)    # null class for CFG
        draws = gen.get_state()                         # the noise and timesteps of the whole batch come next
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for i, part in enumerate(micro):                # train.grad_accum micro-batches of this rank's rows
            gen.set_state(draws)                        # each draws for the whole batch and uses its rows
            with ddp.grad_sync(model, i == len(micro) - 1):    # DDP all-reduces after the last one only
                with precision.autocast(prec, device):
                    part_loss = path.training_loss(model, x0, y, cfg.diffusion, gen, part,
                                                   offset_noise=t.offset_noise) / len(micro)
                scaler.scale(part_loss).backward()      # the gradients add up in .grad
            loss = loss + part_loss.detach()            # the mean loss over this rank's rows
        finite = scaler.is_enabled() or guard.check(step, loss, net)   # NaN/inf: skip the update (guards.py);
                                                                        # with fp16 the grad scaler skips them
        if t.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip)
        if finite:
            scaler.step(opt)
            scaler.update()
        if ddp.main:                                    # decay 1.0: a skipped step leaves the EMA as is
            ema_update(ema, net, ema_decay_at(step, t) if finite else 1.0)
        step += 1
        if posthoc is not None:
            posthoc.update(step)
        if on_step is not None and ddp.main:
            on_step(step, net)
        window_loss, window_n = window_loss + loss.detach().double(), window_n + 1   # no host sync per step

        # 5a) Log the window's mean loss and throughput.
        if step % t.log_every == 0 or step == t.steps:
            window_loss = ddp.mean(window_loss).item()       # the mean over ranks; syncs once per log
            now = time.time()
            ips = window_n * t.batch_size / (now - window_t)
            if ddp.main:
                append_metrics(metrics_path, [step, f"{window_loss / window_n:.6f}", f"{lr:.3g}", f"{ips:.1f}",
                                              f"{now - start:.1f}"] + [""] * len(EVAL_METRICS), tb)
            bar.set_postfix(loss=f"{window_loss / window_n:.4f}", img_s=f"{ips:.0f}")
            window_t, window_loss, window_n = now, 0.0, 0
        bar.update(1)

        # 5b) Checkpoint, sample grid, evaluation.
        out_of_time = t.max_minutes is not None and time.time() - start > 60 * t.max_minutes
        if t.max_minutes is not None:
            out_of_time = ddp.any(out_of_time)              # every rank stops at the same step
        if posthoc is not None and (step % posthoc.every == 0 or step == t.steps or out_of_time):
            posthoc.snapshot(step)
        if step % t.ckpt_every == 0 or step == t.steps or out_of_time:
            checkpoint_now(step)
            last_saved = step
        if t.sample_every and step % t.sample_every == 0 and ddp.main:
            sample_grid(run_dir, step, ema, cfg, tb=tb)
        if cfg.eval.every and step % cfg.eval.every == 0:
            t_eval = time.time()
            if ddp.main:                                    # rank 0 evaluates; the others wait for it
                evaluator = evaluator or PeriodicEval(cfg, run_dir, device, log)
                res = evaluator(Model(ema, cfg), step)      # score the EMA weights
                append_metrics(metrics_path, eval_row(step, time.time() - start, res), tb)
                if evaluator.is_best(res):                  # keep the best checkpoint in RUN/best
                    if last_saved != step:
                        checkpoint_now(step)
                        last_saved = step
                    evaluator.keep_best(checkpoint.list_checkpoints(run_dir)[-1], res, step)
            ddp.barrier()
            window_t += time.time() - t_eval                # evaluation time is not training throughput
        if out_of_time:
            log(f"stopping at step {step}: train.max_minutes={t.max_minutes} reached")
            break
    bar.close()
    if last_saved != step:
        checkpoint_now(step)
    if tb is not None:
        tb.close()
    ddp.barrier()                                           # rank 0 has written the last checkpoint
    ddp.close()
    ckpts = checkpoint.list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None           # None: stopped by a signal before the first step


def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net for parameters (one multi-tensor lerp); buffers are copied."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)
        for be, b in zip(ema.buffers(), net.buffers()):
            be.copy_(b)
