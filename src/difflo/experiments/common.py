"""What every experiment shares: options, cached training runs with extra EMA copies, measuring a
sampler setting (distance, class accuracy, NFE, wall time), and the report writer.

Trained models are cached in ``--runs`` under ``<label>-<hash of the resolved config>``: a second
experiment (or a re-run) that needs the same model reuses it, an interrupted one resumes it. Every
cached run also keeps, at ``snapshots`` evenly spaced steps, its checkpoint (raw weights and the
config's EMA) and extra EMA copies without warmup at ``EMA_DECAYS`` (``ema_tracks/``), so the EMA
experiment and the "no EMA early" failure mode need no extra training.
"""
from __future__ import annotations

import copy
import csv
import fcntl
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .. import checkpoint, config as config_mod, data as data_mod, guards
from ..errors import DiffloError
from ..eval import fid as fid_mod
from ..eval.evaluate import balanced_labels
from ..eval.periodic import Judge
from ..images import grid_image, save_image, to_uint8
from ..io import atomic_path, check_writable, pyplot, write_text_atomic
from ..model import Model, load_model, pick_device
from ..noise_paths import PATHS
from ..generate import generate, settings_for
from ..train import ema_update, resolve, train

EMA_DECAYS = (0.99, 0.999, 0.9999)       # extra EMA copies kept by every cached run (plain, no warmup)


@dataclass
class Options:
    """The flags shared by every ``difflo experiment`` (these defaults are the CLI's)."""
    out: Path
    config: str | None = None                  # None: difflo's defaults (the mnist10k demo model)
    overrides: tuple[str, ...] = ()
    runs: Path = Path("runs") / "experiment-models"   # trained-model cache, shared by experiments
    train_steps: int = 300                     # training steps of every model an experiment trains
    snapshots: int = 3                         # evenly spaced checkpoints (and EMA copies) per run
    n: int = 200                               # samples per measured setting, class-balanced
    eval_steps: int = 10                       # sampler steps where steps are not what is varied
    seed: int = 0
    device: str = "auto"
    progress: bool = False
    extra: dict = field(default_factory=dict)  # experiment-specific lists (e.g. ws, step counts)


def base_config(opts: Options) -> config_mod.Config:
    """The config every experiment starts from, with the training length and bookkeeping fixed."""
    cfg = config_mod.load(opts.config, list(opts.overrides))
    cfg.train.steps = opts.train_steps
    cfg.train.sample_every = 0
    cfg.eval.every = 0
    cfg.train.ckpt_every = snapshot_every(opts)
    cfg.train.keep_checkpoints = opts.snapshots + 1
    cfg.train.max_minutes = None
    cfg.train.device = opts.device
    cfg.validate()
    return cfg


def snapshot_every(opts: Options) -> int:
    return max(1, math.ceil(opts.train_steps / max(1, opts.snapshots)))


def digest(cfg: config_mod.Config) -> str:
    """The cache key of a training config: its sections that shape the model, without bookkeeping, and
    without keys at their default value, so a new option (at its default) keeps existing runs valid."""
    d, default = cfg.to_dict(), config_mod.Config().to_dict()
    for k in ("device", "log_every", "progress", "log"):
        d["train"].pop(k, None)
    d.pop("sample", None)
    d.pop("eval", None)
    d = {sec: {k: v for k, v in vals.items() if default.get(sec, {}).get(k, object()) != v}
         if isinstance(vals, dict) else vals for sec, vals in d.items()}
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


class EmaTracker:
    """Extra EMA copies (no warmup) of the raw weights, written at every checkpoint step to
    ``RUN/ema_tracks/step_N.safetensors`` (keys ``"<decay>/<parameter>"``), so a resumed run continues
    them exactly from the last snapshot."""

    def __init__(self, run_dir: Path, every: int, last: int, decays=EMA_DECAYS):
        self.dir, self.every, self.last, self.decays = Path(run_dir) / "ema_tracks", every, last, decays
        self.dir.mkdir(parents=True, exist_ok=True)
        self.emas: dict | None = None

    def _start(self, step: int, net: torch.nn.Module) -> None:
        """At the first update the copies start from the weights; a resumed run loads its snapshot."""
        self.emas = {d: copy.deepcopy(net).eval().requires_grad_(False) for d in self.decays}
        if step <= 1:
            return
        path = self.dir / f"step_{step - 1:07d}.safetensors"
        if not path.is_file():
            raise DiffloError(f"{path} is missing: the run in {self.dir.parent} cannot continue its EMA copies; "
                              f"delete that run directory so the experiment trains it again")
        state, _ = checkpoint.read_safetensors(path, "EMA snapshot")
        for d, ema in self.emas.items():
            ema.load_state_dict({k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{d}/")})

    def __call__(self, step: int, net: torch.nn.Module) -> None:
        if self.emas is None:
            self._start(step, net)
        for d, ema in self.emas.items():
            ema_update(ema, net, d)
        if step % self.every == 0 or step == self.last or guards.stop_requested():   # the loop saves then too
            tensors = {f"{d}/{k}": v.detach().cpu().contiguous() for d, ema in self.emas.items()
                       for k, v in ema.state_dict().items()}
            path = self.dir / f"step_{step:07d}.safetensors"
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp))


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in checkpoint.list_checkpoints(run_dir)]


@dataclass
class Run:
    """A trained (or reused) model: its run directory, config and training wall time. ``cfg.train.steps`` is the
    step the experiment trained it to: checkpoints after it (a ``difflo train --resume`` in the cache directory with
    more steps) are not this experiment's model and are never read."""
    dir: Path
    cfg: config_mod.Config
    train_seconds: float

    def steps(self) -> list[int]:
        return [k for k in checkpoint_steps(self.dir) if k <= self.cfg.train.steps]

    def model(self, step: int | None = None, weights: str = "ema", device="cpu") -> Model:
        """weights: "raw", "ema" (the config's, with warmup) or an extra decay such as "0.999"."""
        step = self.steps()[-1] if step is None else step
        ckpt = self.dir / "checkpoints" / f"step_{step:07d}"
        if weights in ("raw", "ema"):
            return load_model(ckpt, ema=weights == "ema", device=device)
        base = load_model(ckpt, ema=False, device=device)
        state, _ = checkpoint.read_safetensors(self.dir / "ema_tracks" / f"step_{step:07d}.safetensors")
        own = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{weights}/")}
        if not own:
            raise DiffloError(f"no EMA copy with decay {weights} in {self.dir}/ema_tracks")
        base.net.load_state_dict(own)
        return base

    def loss_curve(self) -> tuple[np.ndarray, np.ndarray]:
        steps, losses = [], []
        with open(self.dir / "metrics.csv") as f:
            for row in csv.DictReader(f):
                if row.get("loss"):
                    steps.append(int(row["step"]))
                    losses.append(float(row["loss"]))
        return np.array(steps), np.array(losses)


def trained(opts: Options, cfg: config_mod.Config, label: str, log=print) -> Run:
    """Train ``cfg`` into the cache (or reuse / resume the cached run) and return it. A lock file makes a
    second process that needs the same model wait for it instead of training it twice."""
    runs = Path(opts.runs)
    check_writable(runs, "model cache", "choose another --runs")
    h = digest(cfg)
    with open(runs / ".lock", "w") as lock:                 # the same config under another label is the same run
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = sorted(p for p in runs.glob(f"*-{h}") if p.is_dir())
        run_dir = found[0] if found else runs / f"{label}-{h}"
        run_dir.mkdir(exist_ok=True)
    with open(run_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"experiment: waiting for another process training {run_dir}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        done = checkpoint_steps(run_dir)
        if done and done[-1] > cfg.train.steps and cfg.train.steps not in done:
            raise DiffloError(f"the cached run {run_dir} was trained on past {cfg.train.steps} steps (to {done[-1]}) "
                              f"and no longer has its step-{cfg.train.steps} checkpoint: delete that run directory so "
                              f"the experiment trains it again")
        reused = cfg.train.steps in done
        if not reused:
            log(f"experiment: training {label} ({cfg.train.steps} steps) -> {run_dir}")
            tracker = EmaTracker(run_dir, cfg.train.ckpt_every, cfg.train.steps)
            ckpt = train(cfg, run_dir, resume=bool(done), progress=opts.progress, log=log, on_step=tracker)
            if guards.stop_requested():                  # SIGINT/SIGTERM: resumable, not scored half-trained
                raise guards.Stopped(ckpt)
        else:
            log(f"experiment: reusing {label} from {run_dir}")
    secs = 0.0
    with open(run_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("loss") and row.get("elapsed_s") and int(row["step"]) <= cfg.train.steps:
                secs = float(row["elapsed_s"])
    saved = config_mod.load(run_dir / "config.yaml")
    saved.train.steps = cfg.train.steps              # a later resume in the cache rewrote it
    return Run(run_dir, saved, secs)


def train_resolved(cfg: config_mod.Config) -> config_mod.Config:
    return resolve(cfg, data_mod.from_config(cfg.data))


class CountingNet(torch.nn.Module):
    """Wraps a network and counts its calls (one call = one batched network evaluation)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


def measure(model: Model, judge, n: int, seed: int = 0, batch_size: int = 250, **settings) -> dict:
    """Sample n class-balanced images with ``settings`` (sampler, steps, w, eta, ...) and score them:
    {metric, class_accuracy, nfe (network calls per image), seconds, images (uint8), labels}."""
    counter = CountingNet(model.net)
    labels = balanced_labels(n, model.num_classes)
    t0 = time.perf_counter()
    x = generate(Model(counter, model.cfg), labels, [seed + i for i in range(n)], settings_for(model, **settings),
                 batch_size=batch_size)
    seconds = time.perf_counter() - t0
    images = to_uint8(x)
    res = judge.score(images, labels.numpy())
    res.update(nfe=counter.calls / math.ceil(n / batch_size), seconds=seconds, images=images,
               labels=labels.numpy())
    return res


def class_variance(images: np.ndarray, labels: np.ndarray) -> float:
    """Diversity: the per-pixel variance across samples of one class (pixels in [0, 1]), averaged over
    pixels and the classes with at least two samples (nan when none has: e.g. N = 98 samples of 98 classes)."""
    x = np.asarray(images, np.float64) / 255.0
    per = [x[labels == c].var(axis=0).mean() for c in np.unique(labels) if np.sum(labels == c) >= 2]
    return float(np.mean(per)) if per else float("nan")


SHOWN_CLASSES = 10                       # figures show at most this many classes (all of mnist's 10)


def shown_classes(num_classes: int, k: int = SHOWN_CLASSES) -> list[int]:
    """The classes a figure shows: all of them up to ``k``, else ``k`` spread evenly over the class
    list (emoji's 98 subcategories: 0, 11, 22, ..., 97), so a grid stays readable."""
    if num_classes <= k:
        return list(range(max(num_classes, 1)))
    return sorted({int(round(i)) for i in np.linspace(0, num_classes - 1, k)})


def firsts(res: dict, classes: list[int]) -> np.ndarray:
    """The first sample of each of ``classes`` in a :func:`measure` result (one grid row)."""
    return np.stack([res["images"][np.flatnonzero(res["labels"] == c)[0]] for c in classes])


def class_caption(model: Model, classes: list[int]) -> str:
    """'classes 0-9' or the shown classes' names, for a figure caption."""
    if classes == list(range(len(classes))) and not model.class_names:
        return f"classes 0-{len(classes) - 1}"
    return "classes " + ", ".join(model.class_label(c) for c in classes)


def row_labels(model: Model) -> list[str]:
    """The row labels of a :func:`sample_grid`: the shown classes' names (or indices)."""
    return [model.class_label(c) for c in shown_classes(model.num_classes)]


def sample_grid(model: Model, classes: int, per_class: int, seed: int = 0, **settings) -> np.ndarray:
    """uint8 samples, ``per_class`` per class, class-major (row r = the r-th of
    :func:`shown_classes`), seeds seed + i."""
    labels = torch.tensor(shown_classes(classes)).repeat_interleave(per_class)
    return to_uint8(generate(model, labels, [seed + i for i in range(len(labels))], settings_for(model, **settings)))


def judge_for(opts: Options, cfg: config_mod.Config, log=print):
    return Judge(train_resolved(cfg), Path(opts.runs), pick_device(opts.device), log)


# --------------------------------------------------------------------------- the report
class Report:
    """A markdown report assembled from tables and figures, written with its raw numbers:
    ``DIR/report.md``, ``DIR/results.json`` and one CSV per table."""

    def __init__(self, out: Path, name: str, title: str):
        self.out, self.name, self.title = Path(out), name, title
        self.parts: list[str] = []
        self.results: dict = {"experiment": name, "tables": {}}
        if self.out.exists() and not self.out.is_dir():
            raise DiffloError(f"--out {self.out} is a file; give a folder for the report")
        check_writable(self.out, "report folder", "choose another --out")

    def text(self, md: str) -> None:
        self.parts.append(md.strip() + "\n")

    def setup(self, opts: Options, cfg: config_mod.Config, **what) -> None:
        """The 'what was run' block: config, seed, N, sampler; stored in results.json too."""
        info = {"config": opts.config or "difflo defaults (the mnist10k demo model)", "overrides": list(opts.overrides),
                "data": cfg.data.name, "train_steps": opts.train_steps, "batch_size": cfg.train.batch_size,
                "model": f"UNet channels={cfg.model.channels} mult={list(cfg.model.channel_mult)} "
                         f"res_blocks={cfg.model.num_res_blocks} attn={list(cfg.model.attn_resolutions)}",
                "objective": PATHS[cfg.diffusion.objective].describe(cfg.diffusion),
                "seed": opts.seed, "n": opts.n, **what}
        self.results["setup"] = info
        lines = [f"- **{k}**: {v}" for k, v in info.items() if v not in (None, [], "")]
        self.parts.append("**What was run**\n\n" + "\n".join(lines) + "\n")

    def noise_floor(self, judge, cfg: config_mod.Config, n: int, draws: int = 5, seed: int = 0) -> dict:
        """The distance of n real training images to the reference over ``draws`` random subsets: what a
        perfect model scores at this N, and its spread (differences well below 2 sd are not resolved)."""
        ds = data_mod.from_config(cfg.data)
        rng = np.random.default_rng(seed)
        vals = [fid_mod.distance_to(judge.ref, judge.extractor(ds.images[rng.choice(len(ds), min(n, len(ds)),
                                                                                     replace=False)]),
                                    judge.extractor.name) for _ in range(draws)]
        floor = {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)), "draws": draws, "n": n}
        self.results["noise_floor"] = floor
        self.parts.append(
            f"**Noise at N = {n}.** {n} real training images score {judge.metric} {floor['mean']:.2f} +- "
            f"{floor['sd']:.2f} (mean +- sd over {draws} random draws) against the {judge.ref['n']} reference "
            f"images: the value of a perfect model at this N; differences well below 2 sd = {2 * floor['sd']:.2f} "
            f"are not resolved. Class accuracy's standard error is sqrt(p (1 - p) / N): "
            f"{100 * (0.9 * 0.1 / n) ** 0.5:.1f} points at p = 0.9, {100 * (0.99 * 0.01 / n) ** 0.5:.1f} at p = 0.99.\n")
        return floor

    def table(self, key: str, rows: list[dict], columns: list[tuple[str, str, str]], caption: str = "") -> None:
        """columns: (row key, header, format such as '.3f' or '')."""
        self.results["tables"][key] = rows
        head = "| " + " | ".join(h for _, h, _ in columns) + " |"
        sep = "|" + "|".join("---" for _ in columns) + "|"
        body = ["| " + " | ".join(_fmt(r.get(k), f) for k, _, f in columns) + " |" for r in rows]
        self.parts.append((f"*{caption}*\n\n" if caption else "") + "\n".join([head, sep, *body]) + "\n")
        with open(self.out / f"{key}.csv", "w", newline="") as f:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(rows)

    def figure(self, filename: str, caption: str) -> None:
        self.parts.append(f"![{caption}]({filename})\n\n*{caption}*\n")

    def save_grid(self, filename: str, images: np.ndarray, ncol: int, labels: list[str] | None = None) -> str:
        save_image(grid_image(images, ncol, labels), self.out / filename)
        return filename

    def save_plot(self, fig, axes, filename: str, legend=(-1,)) -> str:
        """Grid lines on every axis, a legend on the ``legend`` axes, fixed margins; saved and closed."""
        axes = list(np.atleast_1d(axes))
        for a in axes:
            a.grid(alpha=0.3)
        for i in legend:
            axes[i].legend(fontsize=8)
        fig.subplots_adjust(left=0.08 if len(axes) > 1 else 0.15, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
        fig.savefig(self.out / filename, dpi=100)
        pyplot().close(fig)
        return filename

    def write(self, seconds: float) -> Path:
        self.results["wall_seconds"] = round(seconds, 1)
        body = "\n".join(self.parts)
        md = f"# {self.title}\n\n{body}\nWall time of this experiment: {seconds / 60:.1f} min.\n"
        write_text_atomic(self.out / "report.md", md)
        write_text_atomic(self.out / "results.json", json.dumps(self.results, indent=1, default=_plain))
        return self.out / "report.md"


def _plain(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def _fmt(v, f: str) -> str:
    if v is None:
        return ""
    if f and isinstance(v, (int, float, np.floating, np.integer)):
        return format(v, f)
    return str(v)


def short(res: dict, metric: str) -> dict:
    """The numbers of a measurement (no images), for tables and JSON."""
    keep = {k: res[k] for k in (metric, "class_accuracy", "nfe", "seconds", "n") if k in res}
    keep["seconds"] = round(keep.get("seconds", 0.0), 2)
    return keep
