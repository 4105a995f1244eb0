"""What ``difflo serve`` does, without the HTTP: validate a request, queue a job, make its files.

* **sample** runs :func:`difflo.sample.generate` with a sampler callback that advances the progress
  bar, checks the cancel flag and records the trajectory (``x`` at ``t_prev`` and the predicted x0,
  for the first images, at up to :data:`MAX_FRAMES` steps). It writes the same labelled grid and npz
  as ``difflo sample --grid N``, whose exact command comes with the result.
* **edit** builds the ``difflo edit ...`` command line, parses it with the real CLI parser and runs
  :func:`difflo.edit_cli.run` on the loaded model, so the command shown reproduces the figure
  exactly. Progress and cancelling come from a thin wrapper around the network (each network
  evaluation is one tick), because the edit techniques keep their own sampler callbacks.

Every request field is checked here (type and bounds; uploaded images by Pillow: format, pixel
size, bytes) and a bad one raises :class:`RequestError` with a message naming the field and the
allowed range; the server answers it as HTTP 400 ``{"error": ...}``.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import os
import shlex
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import edit_cli, editing
from ..checkpoint import WEIGHTS, resolve_weights
from ..errors import DiffloError
from ..images import grid_image, save_image, to_uint8
from ..sample import Model, generate, load_model, pick_device
from ..samplers import SAMPLERS_FOR
from .jobs import Job, JobQueue

LIMITS = {
    "steps": 1000,             # sampling steps (and at most the model's T for diffusion)
    "n": 16,                   # images per class (sample) / tries (edit)
    "images": 160,             # images in one sample request
    "w": 20.0,                 # guidance scale
    "seed": 2**31 - 1,
    "upload_bytes": 8 << 20,   # an uploaded image file
    "upload_side": 4096,       # its width and height in pixels
    "jump_n_sample": 10,       # RePaint resampling
    "jump_length": 50,
    "kernel_size": 63,
    "sigma": 20.0,
    "evals": 4000,             # network evaluations in one edit job (steps x resamplings)
}
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
MAX_FRAMES = 40                # trajectory steps recorded per sample job
TRAJ_IMAGES = 8                # images whose trajectory is recorded
EDIT_TECHNIQUES = ("sdedit", "inpaint", "anagram", "hybrid")


class RequestError(DiffloError):
    """A bad request field; the server answers HTTP 400 with this message."""


# ----------------------------------------------------------------------------- request fields
class Fields:
    """Typed, bounded access to a JSON request body; every error names the field and its range."""

    def __init__(self, body):
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        self.body = body

    def _get(self, name, default):
        v = self.body.get(name, default)
        if v is None:
            raise RequestError(f"{name} is required")
        return v

    def int(self, name: str, lo: int, hi: int, default=None) -> int:
        v = self._get(name, default)
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v) \
                or not lo <= v <= hi:
            raise RequestError(f"{name} must be a whole number from {lo} to {hi}, got {v!r}")
        return int(v)

    def float(self, name: str, lo: float, hi: float, default=None) -> float:
        v = self._get(name, default)
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = float("nan")
        if isinstance(v, bool) or not lo <= f <= hi:           # also refuses nan
            raise RequestError(f"{name} must be a number from {lo:g} to {hi:g}, got {v!r}")
        return f

    def choice(self, name: str, options, default=None) -> str:
        v = self._get(name, default)
        if v not in options:
            raise RequestError(f"{name} must be one of {', '.join(map(str, options))}, got {v!r}")
        return v


def decode_image(data, what: str = "image") -> Image.Image:
    """A data URL or base64 string -> a loaded PIL image, checked for bytes, format and pixel size."""
    if not isinstance(data, str) or not data:
        raise RequestError(f"{what} is required: upload a PNG or JPG, or draw on the canvas")
    b64 = data.split(",", 1)[1] if data.startswith("data:") else data
    if len(b64) > LIMITS["upload_bytes"] * 4 // 3 + 4:
        raise RequestError(f"{what} is larger than {LIMITS['upload_bytes'] >> 20} MB; give a smaller image")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what} is not valid base64 image data") from None
    try:
        img = Image.open(io.BytesIO(raw))
    except Exception:
        raise RequestError(f"{what} is not an image Pillow can read; give a PNG or JPG") from None
    if img.format not in IMAGE_FORMATS:
        raise RequestError(f"{what} is a {img.format} file; give one of {', '.join(IMAGE_FORMATS)}")
    side = LIMITS["upload_side"]
    if img.width > side or img.height > side or img.width < 1 or img.height < 1:
        raise RequestError(f"{what} is {img.width}x{img.height} pixels; the limit is {side}x{side}")
    try:
        img.load()
    except Exception as e:
        raise RequestError(f"{what} is a damaged {img.format} file ({e})") from None
    return img


def to_model_image(img: Image.Image, channels: int, size: int, notes: list, what: str = "image") -> Image.Image:
    """As ``difflo edit`` loads a file: model's mode (alpha on black), LANCZOS-resized to size x size."""
    mode = "L" if channels == 1 else "RGB"
    if channels not in (1, 3):
        raise RequestError(f"this model has {channels} channels; images can be given for 1 or 3")
    if img.mode != mode:
        img = edit_cli._flatten_alpha(img).convert(mode)
    if img.size != (size, size):
        notes.append(f"{what}: resized {img.width}x{img.height} to the model's {size}x{size}")
        img = img.resize((size, size), Image.LANCZOS)
    return img


def to_model_mask(img: Image.Image, size: int) -> Image.Image:
    """White (>= 128 after compositing alpha on black) = regenerate; NEAREST-resized; 0/255."""
    m = edit_cli._flatten_alpha(img).convert("L")
    if m.size != (size, size):
        m = m.resize((size, size), Image.NEAREST)
    a = np.where(np.asarray(m) >= 128, 255, 0).astype(np.uint8)
    if not a.any():
        raise RequestError("the mask is empty: paint the region to regenerate (mask brush) before inpainting")
    return Image.fromarray(a, "L")


def png_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _num(v: float) -> str:
    """The shortest text that parses back to the same float (3.0 -> 3, 0.1 -> 0.1)."""
    s = repr(float(v))
    return s[:-2] if s.endswith(".0") else s


class _Counted(torch.nn.Module):
    """The network, calling ``tick()`` before each evaluation (progress and the cancel check)."""

    def __init__(self, net: torch.nn.Module, tick):
        super().__init__()
        self.net, self.tick = net, tick

    def forward(self, *args, **kwargs):
        self.tick()
        return self.net(*args, **kwargs)


# ----------------------------------------------------------------------------- the app
class App:
    """A loaded model, its job queue, and the request handlers (dict in, dict out)."""

    def __init__(self, ckpt, ema: bool = True, device: str = "auto", jobs_root=None):
        self.device = pick_device(device)
        self.model: Model = load_model(ckpt, ema=ema, device=self.device)
        self.ema = ema
        weights = resolve_weights(ckpt, ema)
        # The command line names the exact checkpoint that is loaded (a run directory's "latest"
        # may change while the server runs).
        ckpt_path = weights.parent if weights.name in WEIGHTS and (weights.parent / "manifest.json").exists() \
            else weights
        self.ckpt_arg = _display_path(ckpt_path)
        self.weights = weights
        self.queue = JobQueue(jobs_root)
        m = self.model
        self.C, self.S = m.cfg.model.in_channels, m.cfg.model.image_size
        # The samplers that fit the objective (read live, so new ones appear) and that the command
        # shown under a result accepts.
        self.samplers = tuple(s for s in SAMPLERS_FOR[m.objective] if s in _cli_choices("sample", "--sampler"))
        self.edit_samplers = tuple(s for s in SAMPLERS_FOR[m.objective]
                                   if s in _cli_choices("edit", "sdedit", "--sampler"))
        self.max_steps = LIMITS["steps"] if m.objective == "flow" else min(LIMITS["steps"], m.cfg.diffusion.timesteps)

    def close(self) -> None:
        self.queue.close()

    # ------------------------------------------------------------------ info
    def info(self) -> dict:
        m, sc = self.model, self.model.cfg.sample
        default = sc.sampler if sc.sampler in self.samplers else self.samplers[0]
        edit_default = "ddpm" if m.objective == "diffusion" else "euler"           # as difflo edit
        return {
            "ckpt": self.ckpt_arg, "weights": "ema" if self.ema else "raw", "objective": m.objective,
            "data": m.cfg.data.name, "num_classes": m.num_classes, "class_names": _class_names(m),
            "image_size": self.S, "channels": self.C, "samplers": list(self.samplers),
            "edit_samplers": list(self.edit_samplers),
            "defaults": {"sampler": default, "steps": min(sc.steps, self.max_steps), "w": sc.w,
                         "edit_sampler": edit_default if edit_default in self.edit_samplers
                         else self.edit_samplers[0]},
            "views": [v for v in editing.VIEWS if v != "identity"],
            "limits": {**LIMITS, "steps": self.max_steps, "upload_mb": LIMITS["upload_bytes"] >> 20},
        }

    # ------------------------------------------------------------------ fields shared by both tabs
    def _common(self, f: Fields, samplers, sampler_default: str) -> dict:
        return {"steps": f.int("steps", 1, self.max_steps, self.model.cfg.sample.steps),
                "w": f.float("w", 0.0, LIMITS["w"], self.model.cfg.sample.w),
                "seed": f.int("seed", 0, LIMITS["seed"], 0),
                "sampler": f.choice("sampler", samplers, sampler_default)}

    def _cls(self, f: Fields, name: str, default=0) -> int:
        k = self.model.num_classes
        return f.int(name, 0, max(k - 1, 0), default) if k else 0

    def _device_flag(self) -> list[str]:
        return [] if self.device.type == "cpu" else ["--device", str(self.device)]

    # ------------------------------------------------------------------ sample
    def submit_sample(self, body) -> Job:
        f = Fields(body)
        p = self._common(f, self.samplers, self.info()["defaults"]["sampler"])
        k = self.model.num_classes
        spec = body.get("classes", "all")
        spec = "all" if spec in ("all", "", None) or not k else str(self._cls(f, "classes"))
        n = f.int("n", 1, LIMITS["n"], 4)
        classes = list(range(k)) if spec == "all" and k else [int(spec)] if k else [0]
        if n * len(classes) > LIMITS["images"]:
            raise RequestError(f"n x classes = {n * len(classes)} images; the limit is {LIMITS['images']} "
                               f"per request: lower n or pick one class")
        sc = self.model.cfg.sample
        settings = {"sampler": p["sampler"], "steps": p["steps"], "eta": sc.eta, "w": p["w"], "spacing": sc.spacing,
                    "clip_x0": sc.clip_x0, "variance": sc.variance}
        argv = ["sample", "--ckpt", self.ckpt_arg, "--classes", spec, "--grid", str(n), "--sampler", p["sampler"],
                "--steps", str(p["steps"]), "--w", _num(p["w"]), "--seed", str(p["seed"])] \
            + ([] if self.ema else ["--no-ema"]) + self._device_flag()
        labels = torch.tensor(classes).repeat_interleave(n)         # as `difflo sample --grid n`
        seeds = [p["seed"] + i for i in range(len(labels))]
        row_labels = [f"class {c}" for c in classes] if k else None

        def work(job: Job) -> dict:
            job.total = p["steps"]
            keep = set(np.linspace(0, p["steps"] - 1, min(p["steps"], MAX_FRAMES)).round().astype(int).tolist())
            show = min(len(labels), TRAJ_IMAGES)

            def callback(d):                                        # the sampler's per-step dict
                job.check()
                if d["batch"] == 0 and d["i"] in keep:
                    job.frames.append({"i": d["i"], "t": d["t"], "x": to_uint8(d["x"][:show]),
                                       "x0": to_uint8(d["denoised"][:show])})
                job.step()

            images = generate(self.model, labels, seeds, batch_size=len(labels), callback=callback, **settings)
            u8 = to_uint8(images)
            save_image(grid_image(u8, n, row_labels), job.dir / "grid.png")
            np.savez_compressed(job.dir / "samples.npz", images=u8, labels=labels.numpy().astype(np.int64))
            save_image(trajectory_strip(job.frames), job.dir / "trajectory.png")
            cmd = _cmd(argv)
            return {"files": {"png": "grid.png", "npz": "samples.npz", "trajectory": "trajectory.png"},
                    "command": f"{cmd} --out grid.png\n{cmd} --out samples.npz",
                    "summary": f"{len(labels)} images: " + ", ".join(f"{a}={b}" for a, b in settings.items())}

        return self.queue.submit("sample", work)

    # ------------------------------------------------------------------ edit
    def submit_edit(self, body) -> Job:
        f = Fields(body)
        tech = f.choice("technique", EDIT_TECHNIQUES)
        info = self.info()
        p = self._common(f, self.edit_samplers, info["defaults"]["edit_sampler"])
        n = f.int("n", 1, LIMITS["n"], 1)
        heun = 2 if p["sampler"] == "heun" else 1
        args = ["edit", tech, "--ckpt", self.ckpt_arg, "--n", str(n), "--seed", str(p["seed"]), "--w", _num(p["w"]),
                "--sampler", p["sampler"]] + ([] if self.ema else ["--no-ema"]) + self._device_flag()
        files = {}                                                  # name -> PIL image, written into the job
        notes: list[str] = []
        path = self.model.path
        if tech in ("sdedit", "inpaint"):
            files["input.png"] = to_model_image(decode_image(body.get("image"), "image"), self.C, self.S, notes)
            args += ["--image", "input.png", "--class", str(self._cls(f, "class"))]
        if tech == "sdedit":
            strength = f.float("strength", 0.01, 1.0, 0.5)
            scale = path.T if self.model.objective == "diffusion" else 1000
            stride = max(1, scale // p["steps"])
            n_ts = len(editing.strided_times(path, stride))
            level = max(1, round(strength * n_ts))
            args += ["--stride", str(stride), "--levels", str(level)]
            evals = level * heun
            notes.append(f"strength {strength:g}: start {level} of {n_ts} steps (stride {stride}) from the clean end")
        elif tech == "inpaint":
            files["mask.png"] = to_model_mask(decode_image(body.get("mask"), "mask"), self.S)
            j = f.int("jump_length", 1, LIMITS["jump_length"], 1)
            r = f.int("jump_n_sample", 1, LIMITS["jump_n_sample"], 1)
            args += ["--mask", "mask.png", "--steps", str(p["steps"]), "--jump-length", str(j),
                     "--jump-n-sample", str(r)]
            evals = p["steps"] * r * heun
        elif tech == "anagram":
            view = f.choice("view", info["views"], "rot180")
            args += ["--a", str(self._cls(f, "a")), "--b", str(self._cls(f, "b")), "--view", view,
                     "--steps", str(p["steps"])]
            evals = p["steps"] * heun
        else:
            size = f.int("kernel_size", 1, LIMITS["kernel_size"], 9)
            if size % 2 == 0:
                raise RequestError(f"kernel_size must be odd, got {size}")
            args += ["--low", str(self._cls(f, "low")), "--high", str(self._cls(f, "high")),
                     "--kernel-size", str(size), "--sigma", _num(f.float("sigma", 0.0, LIMITS["sigma"], 1.5)),
                     "--steps", str(p["steps"])]
            evals = p["steps"] * heun
        if evals > LIMITS["evals"]:
            raise RequestError(f"this edit needs {evals} network evaluations; the limit is {LIMITS['evals']}: "
                               f"lower steps or the resampling")
        out_name = f"edit-{tech}"

        def work(job: Job) -> dict:
            job.total = evals
            for name, img in files.items():
                img.save(job.dir / name)
            real = [str(job.dir / a) if a in files else a for a in args] + ["--out", str(job.dir / "out")]
            parsed = _parse(real)
            log: list[str] = []
            edit_cli.run(parsed, Model(_Counted(self.model.net, job.step), self.model.cfg), log=log.append)
            out = job.dir / "out"
            os.replace(out / "figure.png", job.dir / "figure.png")
            os.replace(out / "raw.npz", job.dir / "raw.npz")
            os.replace(out / "result_00.png", job.dir / "result.png")          # the first try
            lines = [ln for ln in log if not ln.startswith(("wrote ", "note: "))]
            result_files = {"png": "figure.png", "npz": "raw.npz", "result": "result.png",
                            **{k.split(".")[0]: k for k in files}}
            return {"files": result_files, "command": _cmd(args + ["--out", out_name]),
                    "command_note": f"{' and '.join(files)}: the download buttons above" if files else "",
                    "summary": "\n".join(notes + lines)}

        _parse(args + ["--out", out_name])                            # the shown command parses
        return self.queue.submit("edit", work)

    # ------------------------------------------------------------------ upload preview
    def upload(self, body) -> dict:
        """Check an uploaded image and return it as the model will see it (its size, channels)."""
        notes: list[str] = []
        img = to_model_image(decode_image(Fields(body).body.get("image"), "image"), self.C, self.S, notes)
        return {"image": png_data_url(img), "notes": notes}

    # ------------------------------------------------------------------ jobs
    def job_json(self, job: Job) -> dict:
        out = job.to_json()
        if job.status == "queued":
            out["ahead"] = self.queue.position(job)
        return out

    def frame_png(self, job: Job, k: int) -> bytes | None:
        if not 0 <= k < len(job.frames):
            return None
        fr = job.frames[k]
        img = grid_image(np.concatenate([fr["x"], fr["x0"]]), len(fr["x"]), ["x_t", "x0"])
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()


def trajectory_strip(frames, columns: int = 10) -> Image.Image:
    """The first image's trajectory: row 1 x_t, row 2 the predicted x0, at up to ``columns`` steps."""
    if not frames:
        return Image.new("RGB", (1, 1), "white")
    idx = np.unique(np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int))
    xs = np.stack([frames[i]["x"][0] for i in idx])
    x0s = np.stack([frames[i]["x0"][0] for i in idx])
    return grid_image(np.concatenate([xs, x0s]), len(idx), ["x_t", "x0"])


def _class_names(m: Model) -> list[str]:
    k = m.num_classes
    if not k:
        return []
    from ..data.idx import FASHION_CLASSES, MNIST_CLASSES
    known = {"mnist10k": MNIST_CLASSES, "mnist": MNIST_CLASSES, "fashion-mnist": FASHION_CLASSES}
    names = known.get(m.cfg.data.name)
    return list(names) if names and len(names) == k else [str(i) for i in range(k)]


def _display_path(p: Path) -> str:
    """Relative to the working directory when inside it (as the user would type it), else absolute."""
    p = Path(os.path.abspath(p))
    try:
        return str(p.relative_to(Path(os.path.abspath(Path.cwd()))))
    except ValueError:
        return str(p)


def _cmd(argv: list[str]) -> str:
    return "difflo " + " ".join(shlex.quote(a) for a in argv)


def _cli_choices(*names: str) -> tuple:
    """The choices of an option of a ``difflo`` subcommand, e.g. ("sample", "--sampler")."""
    import argparse

    from ..cli import build_parser

    p = build_parser()
    *subs, option = names
    for name in subs:
        p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return tuple(next(a for a in p._actions if option in a.option_strings).choices)


def _parse(argv: list[str]):
    """Parse with the real ``difflo`` parser; a refusal (a bug here, since the fields were checked)
    is a RequestError, not an exit of the server."""
    import argparse

    from ..cli import build_parser

    def refuse(message):
        raise RequestError(f"the difflo CLI refuses this request: {message}")

    stack = [build_parser()]
    root = stack[0]
    while stack:                                   # every (sub)parser raises instead of exiting
        p = stack.pop()
        p.error = refuse
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                stack += list(a.choices.values())
    return root.parse_args(argv)
