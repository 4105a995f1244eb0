"""What ``difflo serve`` does, without the HTTP: validate a request, queue a job, make its files.

* **sample** runs :func:`difflo.generate.generate` with a sampler callback that advances the progress
  bar, checks the cancel flag and records the trajectory (``x`` at ``t_prev`` and the predicted x0,
  for the first images, at up to :data:`MAX_FRAMES` steps). It writes the same labelled grid and npz
  as ``difflo sample --grid N``, whose exact command comes with the result.
* **edit** reads the technique from :data:`difflo.edit.registry.TECHNIQUES` (the table ``difflo edit``
  reads): its page fields (checked here), the options they give, its evaluation count (the limit), and
  its ``run`` on the loaded model (the uploads are written into the job first and read back as files,
  as the command reads them); ``EditResult.write`` writes its files. The ``difflo edit ...`` command
  shown with the result is the technique's own command line for those options, and reproduces the
  figure exactly (tests compare the files byte for byte).
  Progress and cancelling come from a thin wrapper around the network (each network evaluation is
  one tick), because the edit techniques keep their own sampler callbacks.

**Fast preview** (``difflo serve --fast STUDENT``): a distilled student of the model (:mod:`difflo.distill`;
``cfg.distill.method`` set, the same image shape, classes and objective, else a one-line DiffloError) samples the
same classes, seeds and n at its own sample settings (its ``sample`` section: sampler, steps, w = 1) when a sample
request has ``fast: true``. The full sampler's fields (:data:`FULL_ONLY`) are not read then, so a request that sets
one to other than the page's default is refused (400) rather than ignored; the command shown is ``difflo sample
--ckpt STUDENT ...``. Every sample job's summary names the model that made the images and the network calls per
image (the sampler's ``evals(steps)`` in :data:`difflo.samplers.SAMPLERS`).

Classes: the page lists the model's classes (``Model.class_names``), never its null class; for a
class-conditional diffusers folder that is the null class the folder names itself (a ``difflo export``)
or that ``--null-class K`` names (then passed on in every command shown).

The sample tab's guidance interval and rescale are ``difflo sample``'s ``--guidance-interval`` and
``--guidance-rescale`` (their help texts are the registry's :data:`~difflo.edit.registry.GUIDANCE` flags,
sent to the page in ``help``): the interval as text ``LO,HI`` (empty or ``off``: guidance everywhere),
read by :func:`difflo.config.parse_interval` and checked by :func:`difflo.config.guidance_problems`; both
default to the model's ``sample.guidance_*`` and appear in the command shown only where they differ.

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

from ..checkpoint import DEMO, WEIGHTS, resolve_weights
from ..config import guidance_problems, parse_interval
from ..edit import techniques
from ..edit.registry import GUIDANCE, PAGE_VIEWS, TECHNIQUES, Field, flag_text
from ..errors import DiffloError
from ..generate import describe, generate, settings_for
from ..images import WHITE, grid_image, mask_image, model_image, open_image, parse_colour, save_image, to_uint8
from ..io import atomic_path
from ..model import Model, load_model, pick_device
from ..samplers import SAMPLERS
from .jobs import Job, JobQueue

LIMITS = {
    "steps": 1000,             # sampling steps (and at most the model's T for diffusion)
    "n": 16,                   # images per class (sample) / tries (edit)
    "images": 160,             # images in one sample request
    "w": 20.0,                 # guidance scale
    "seed": 2**31 - 1,
    "upload_bytes": 8 << 20,   # an uploaded image file
    "upload_side": 4096,       # its width and height in pixels
    "evals": 4000,             # network evaluations in one edit job (steps x resamplings)
}                              # an edit technique's own fields: its page Fields (difflo.edit.registry)
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
MAX_FRAMES = 40                # trajectory steps recorded per sample job
TRAJ_IMAGES = 8                # images whose trajectory is recorded
FULL_ONLY = ("sampler", "steps", "w", "spacing", "guidance_interval", "guidance_rescale")   # not read by fast=true
EDIT_TECHNIQUES = tuple(name for name, t in TECHNIQUES.items() if t.page is not None)    # the ones with page fields


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

    def interval(self, name: str, default=()) -> tuple[float, ...]:
        """A guidance interval as text ``LO,HI`` (:func:`difflo.config.parse_interval`; empty or ``off``:
        none, guidance everywhere); its range is checked with the rescale (:meth:`App._guidance`)."""
        v = self.body.get(name)
        if v is None:
            return tuple(float(x) for x in default)
        if not isinstance(v, str):
            raise RequestError(f"{name} must be text LO,HI (e.g. 0.3,3), or empty for off; got {v!r}")
        if not v.strip():
            return ()
        try:
            return parse_interval(v)
        except ValueError as e:
            raise RequestError(f"{name}: {e}") from None

    def flag(self, name: str, default: bool = False) -> bool:
        v = self.body.get(name, default)
        if not isinstance(v, bool):
            raise RequestError(f"{name} must be true or false, got {v!r}")
        return v

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
        return open_image(raw, what)                  # the same decoder as difflo edit's files
    except DiffloError as e:
        raise RequestError(f"{what} is a damaged {img.format} file ({e})") from None


def to_model_image(img: Image.Image, channels: int, size: int, notes: list, what: str = "image",
                   background=WHITE) -> Image.Image:
    """As ``difflo edit`` loads a file (:func:`difflo.images.model_image`): the model's mode and size,
    transparency over the model's ``data.background``."""
    try:
        return model_image(img, channels, size, notes, what, note_mode=False, background=background)
    except DiffloError as e:
        raise RequestError(str(e)) from None


def to_model_mask(img: Image.Image, size: int) -> Image.Image:
    """White (>= 128 after compositing alpha on black) = regenerate; NEAREST-resized; 0/255."""
    try:
        m = mask_image(img, size)
    except DiffloError as e:
        raise RequestError(str(e)) from None
    if not np.asarray(m).any():
        raise RequestError("the mask is empty: paint the region to regenerate (mask brush) before inpainting")
    return m


def png_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


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

    def __init__(self, ckpt, ema: bool = True, device: str = "auto", jobs_root=None, null_class: int | None = None,
                 fast=None):
        self.device = pick_device(device)
        self.model: Model = load_model(ckpt, ema=ema, device=self.device, null_class=null_class)
        self.ema = ema
        self.null_flag = [] if null_class is None else ["--null-class", str(null_class)]    # in the commands shown
        self.weights, self.ckpt_arg = _exact_checkpoint(ckpt, ema)
        self.fast: Model | None = None                  # --fast: a distilled student (fast previews)
        self.fast_arg = None
        if fast is not None:
            try:
                student = load_model(fast, ema=ema, device=self.device)
                self.fast_arg = _exact_checkpoint(fast, ema)[1]
            except DiffloError as e:
                raise type(e)(f"--fast: {e}") from None
            self.fast = check_student(self.model, student, fast)
        self.queue = JobQueue(jobs_root)
        m = self.model
        self.C, self.S = m.cfg.model.in_channels, m.cfg.model.image_size
        self.background = parse_colour(m.cfg.data.background)
        # The samplers that fit the model's path, from the registry (a new sampler appears by itself).
        self.samplers = self.edit_samplers = tuple(m.path.samplers)
        self.spacings = tuple(m.path.spacings)          # the time grids the path takes (schedules.SPACING_CHOICES)
        self.max_steps = min(LIMITS["steps"], m.path.max_steps or LIMITS["steps"])

    def close(self) -> None:
        self.queue.close()

    # ------------------------------------------------------------------ info
    def info(self) -> dict:
        m, sc = self.model, self.model.cfg.sample
        default = sc.sampler if sc.sampler in self.samplers else self.samplers[0]
        edit_default = techniques.default_sampler(m)                                      # as difflo edit
        return {
            "ckpt": self.ckpt_arg, "weights": "ema" if self.ema else "raw", "objective": m.objective,
            "data": m.cfg.data.name, "num_classes": m.num_classes, "class_names": list(m.class_names),
            "image_size": self.S, "channels": self.C, "samplers": list(self.samplers),
            "edit_samplers": list(self.edit_samplers), "spacings": list(self.spacings),
            "defaults": {"sampler": default, "steps": min(sc.steps, self.max_steps), "w": sc.w,
                         "spacing": sc.spacing if sc.spacing in self.spacings else self.spacings[0],
                         "edit_sampler": edit_default if edit_default in self.edit_samplers
                         else self.edit_samplers[0],
                         "guidance_interval": interval_text(sc.guidance_interval),
                         "guidance_rescale": sc.guidance_rescale},
            "help": {f.key: f.help for f in GUIDANCE},      # the sample tab's guidance fields, as difflo edit's
            "views": list(PAGE_VIEWS), "fast": self._fast_info(),
            "edit_techniques": {name: [f.to_json() for f in TECHNIQUES[name].page] for name in EDIT_TECHNIQUES},
            "limits": {**LIMITS, **{f.name: f.hi for name in EDIT_TECHNIQUES for f in TECHNIQUES[name].page
                                    if f.hi is not None},
                       "steps": self.max_steps, "upload_mb": LIMITS["upload_bytes"] >> 20},
        }

    def _fast_info(self) -> dict | None:
        """The --fast student as the page shows it: its path (as in the commands), how it was distilled, and
        the sampler, steps and network calls per image it samples with."""
        if self.fast is None:
            return None
        d, s = self.fast.cfg.distill, settings_for(self.fast)
        return {"ckpt": self.fast_arg, "method": d.method, "steps": d.steps, "w": d.w, "w_range": list(d.w_range),
                "teacher": d.teacher if d.teacher == DEMO else _display_path(Path(d.teacher)),
                "sampler": s.sampler, "sample_steps": s.steps, "evals": SAMPLERS[s.sampler].evals(s.steps)}

    # ------------------------------------------------------------------ fields shared by both tabs
    def _common(self, f: Fields, samplers, sampler_default: str) -> dict:
        return {"steps": f.int("steps", 1, self.max_steps, self.model.cfg.sample.steps),
                "w": f.float("w", 0.0, LIMITS["w"], self.model.cfg.sample.w),
                "seed": f.int("seed", 0, LIMITS["seed"], 0),
                "sampler": f.choice("sampler", samplers, sampler_default)}

    def _guidance(self, f: Fields) -> tuple[tuple[float, ...], float, list[str]]:
        """The sample tab's guidance interval and rescale (default: the model's), checked, and their flags
        for the command shown (only those not at the model's default)."""
        sc = self.model.cfg.sample
        default = tuple(float(v) for v in sc.guidance_interval)
        interval = f.interval("guidance_interval", default)
        rescale = f.float("guidance_rescale", 0.0, 1.0, sc.guidance_rescale)
        problems = guidance_problems(interval, rescale, ("guidance_interval", "guidance_rescale"))
        if problems:
            raise RequestError("; ".join(problems))
        flags = [] if interval == default else ["--guidance-interval", interval_text(interval) or "off"]
        if rescale != sc.guidance_rescale:
            flags += ["--guidance-rescale", flag_text(rescale)]
        return interval, rescale, flags

    def _cls(self, f: Fields, name: str, default=0) -> int:
        k = self.model.num_classes
        return f.int(name, 0, max(k - 1, 0), default) if k else 0

    def _device_flag(self) -> list[str]:
        return [] if self.device.type == "cpu" else ["--device", str(self.device)]

    # ------------------------------------------------------------------ sample
    def _full_settings(self, f: Fields, defaults: dict) -> tuple[dict, list[str]]:
        """The full sampler's fields (:data:`FULL_ONLY`) and the seed, checked, and the guidance flags for the
        command shown."""
        p = self._common(f, self.samplers, defaults["sampler"])
        p["spacing"] = f.choice("spacing", self.spacings, defaults["spacing"])
        p["guidance_interval"], p["guidance_rescale"], guidance_flags = self._guidance(f)
        return p, guidance_flags

    def _refuse_full_fields(self, body: dict, defaults: dict) -> None:
        """fast=true: a full-sampler field (:data:`FULL_ONLY`) set to other than the page's default is a 400 naming
        it (it would be ignored: the student samples at its own settings). Each is checked as for the full
        sampler first, so a bad value gets its usual message."""
        page = {k: defaults[k] for k in FULL_ONLY}
        given = {k: body[k] for k in FULL_ONLY if k in body}
        asked, default = (self._full_settings(Fields(b), defaults)[0] for b in ({**page, **given}, page))
        clash = [f"{k}={body[k]!r}" for k in given if asked[k] != default[k]]
        if clash:
            s = settings_for(self.fast)
            raise RequestError(f"fast=true samples with the student's own settings ({s.sampler}, {s.steps} steps, "
                               f"w={flag_text(s.w)}), but the request also sets {', '.join(clash)}: drop "
                               f"{'it' if len(clash) == 1 else 'them'}, or sample without fast")

    def submit_sample(self, body) -> Job:
        f = Fields(body)
        defaults = self.info()["defaults"]
        fast = f.flag("fast")
        if fast and self.fast is None:
            raise RequestError("fast=true needs a distilled student: start difflo serve with --fast STUDENT")
        k = self.model.num_classes
        spec = body.get("classes", "all")
        spec = "all" if spec in ("all", "", None) or not k else str(self._cls(f, "classes"))
        n = f.int("n", 1, LIMITS["n"], 4)
        classes = list(range(k)) if spec == "all" and k else [int(spec)] if k else [0]
        if n * len(classes) > LIMITS["images"]:
            raise RequestError(f"n x classes = {n * len(classes)} images; the limit is {LIMITS['images']} "
                               f"per request: lower n or pick one class")
        if fast:
            self._refuse_full_fields(body, defaults)
            seed = f.int("seed", 0, LIMITS["seed"], 0)
            model, settings = self.fast, settings_for(self.fast)          # the student's own sample settings
            argv = ["sample", "--ckpt", self.fast_arg, "--classes", spec, "--grid", str(n),
                    "--sampler", settings.sampler, "--steps", str(settings.steps), "--seed", str(seed)]
            d = model.cfg.distill
            made_by = (f"the {d.method} student {self.fast_arg} ({d.steps} steps, w={flag_text(d.w)} "
                       + (f"as its input, distilled for w in [{flag_text(d.w_range[0])}, {flag_text(d.w_range[1])}])"
                          if d.w_range else "distilled in)"))
        else:
            p, guidance_flags = self._full_settings(f, defaults)
            seed, spacing = p["seed"], p["spacing"]
            model = self.model
            settings = settings_for(model, sampler=p["sampler"], steps=p["steps"], w=p["w"], spacing=spacing,
                                    guidance_interval=p["guidance_interval"], guidance_rescale=p["guidance_rescale"])
            argv = ["sample", "--ckpt", self.ckpt_arg, *self.null_flag, "--classes", spec, "--grid", str(n),
                    "--sampler", p["sampler"], "--steps", str(p["steps"]), "--w", flag_text(p["w"]),
                    *guidance_flags, "--seed", str(seed), "--spacing", spacing]
            made_by = self.ckpt_arg
        argv += ([] if self.ema else ["--no-ema"]) + self._device_flag()
        steps = settings.steps
        labels = torch.tensor(classes).repeat_interleave(n)         # as `difflo sample --grid n`
        seeds = [seed + i for i in range(len(labels))]
        row_labels = [self.model.class_label(c) for c in classes] if k else None

        def work(job: Job) -> dict:
            job.total = steps
            keep = set(np.linspace(0, steps - 1, min(steps, MAX_FRAMES)).round().astype(int).tolist())
            show = min(len(labels), TRAJ_IMAGES)

            def callback(d):                                        # the sampler's per-step dict
                job.check()
                if d["batch"] == 0 and d["i"] in keep:
                    job.frames.append({"i": d["i"], "t": d["t"], "x": to_uint8(d["x"][:show]),
                                       "x0": to_uint8(d["denoised"][:show])})
                job.step()

            images = generate(model, labels, seeds, settings, batch_size=len(labels), callback=callback)
            u8 = to_uint8(images)
            save_image(grid_image(u8, n, row_labels), job.dir / "grid.png")
            with atomic_path(job.dir / "samples.npz") as tmp:
                np.savez_compressed(tmp, images=u8, labels=labels.numpy().astype(np.int64))
            save_image(trajectory_strip(job.frames), job.dir / "trajectory.png")
            cmd = _cmd(argv)
            return {"files": {"png": "grid.png", "npz": "samples.npz", "trajectory": "trajectory.png"},
                    "command": f"{cmd} --out grid.png\n{cmd} --out samples.npz",
                    "summary": f"{len(labels)} images by {made_by}: {describe(settings)}; "
                               f"{SAMPLERS[settings.sampler].evals(settings.steps)} network evaluations each"}

        return self.queue.submit("sample", work)

    # ------------------------------------------------------------------ edit
    def submit_edit(self, body) -> Job:
        f = Fields(body)
        t = TECHNIQUES[f.choice("technique", EDIT_TECHNIQUES)]
        info = self.info()
        values = self._common(f, self.edit_samplers, info["defaults"]["edit_sampler"])
        values.update(n=f.int("n", 1, LIMITS["n"], 1), device=str(self.device), ema=self.ema)
        files = {}                                                  # name -> PIL image, written into the job
        notes: list[str] = []
        for field in t.page:
            values[field.name] = self._field(f, field, files, notes)
        options = t.options(**t.from_page(self.model, values, notes))
        evals = t.evals(self.model, options)
        if evals > LIMITS["evals"]:
            raise RequestError(f"this edit needs {evals} network evaluations; the limit is {LIMITS['evals']}: "
                               f"lower steps or the resampling")
        args = ["edit", t.name, "--ckpt", self.ckpt_arg, *self.null_flag, *t.argv(options), "--out", f"edit-{t.name}"]
        uploads = {field.key: field.file for field in t.page if field.file}

        def work(job: Job) -> dict:
            job.total = evals
            for name, img in files.items():
                img.save(job.dir / name)
            here = t.options(**{**vars(options), **{k: str(job.dir / name) for k, name in uploads.items()}})
            result = t.run(Model(_Counted(self.model.net, job.step), self.model.cfg), here)
            result.write(job.dir)
            result_files = {"png": "figure.png", "npz": "raw.npz", "result": "result_00.png",      # the first try
                            **{k.split(".")[0]: k for k in files}}
            return {"files": result_files, "command": _cmd(args),
                    "command_note": f"{' and '.join(files)}: the download buttons above" if files else "",
                    "summary": "\n".join(notes + [result.summary])}

        return self.queue.submit("edit", work)

    def _field(self, f: Fields, field: Field, files: dict, notes: list):
        """One page field of a technique, checked: a number, a choice, a class index, or an upload (kept in
        ``files`` under its file name, which is its value)."""
        if field.kind == "image":
            files[field.file] = to_model_image(decode_image(f.body.get(field.name), field.name), self.C, self.S,
                                               notes, background=self.background)
            return field.file
        if field.kind == "mask":
            files[field.file] = to_model_mask(decode_image(f.body.get(field.name), field.name), self.S)
            return field.file
        if field.kind == "class":
            return self._cls(f, field.name, field.default)
        if field.kind == "choice":
            return f.choice(field.name, field.choices, field.default)
        if field.kind == "float":
            return f.float(field.name, field.lo, field.hi, field.default)
        v = f.int(field.name, field.lo, field.hi, field.default)
        if field.odd and v % 2 == 0:
            raise RequestError(f"{field.name} must be odd, got {v}")
        return v

    # ------------------------------------------------------------------ upload preview
    def upload(self, body) -> dict:
        """Check an uploaded image and return it as the model will see it (its size, channels)."""
        notes: list[str] = []
        img = to_model_image(decode_image(Fields(body).body.get("image"), "image"), self.C, self.S, notes,
                             background=self.background)
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


def check_student(model: Model, student: Model, given) -> Model:
    """``--fast STUDENT``: a distilled student (``cfg.distill.method`` set) that makes the same images as ``model``
    (image shape, classes, objective), else a one-line DiffloError."""
    if student.cfg.distill.method is None:
        raise DiffloError(f"--fast {given} is not a distilled student (its config has no distill section); give a "
                          f"student written by difflo distill (its OUT folder or OUT/students/steps_N)")
    what = {"image shape": lambda m: (m.cfg.model.in_channels, m.cfg.model.image_size),
            "classes": lambda m: m.num_classes, "objective": lambda m: m.objective}
    differ = [f"{name} {get(student)} vs {get(model)}" for name, get in what.items() if get(student) != get(model)]
    if differ:
        raise DiffloError(f"--fast {given} does not fit --ckpt: {'; '.join(differ)} (student vs model); give a "
                          f"student distilled from this model")
    return student


def trajectory_strip(frames, columns: int = 10) -> Image.Image:
    """The first image's trajectory: row 1 x_t, row 2 the predicted x0, at up to ``columns`` steps."""
    if not frames:
        return Image.new("RGB", (1, 1), "white")
    idx = np.unique(np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int))
    xs = np.stack([frames[i]["x"][0] for i in idx])
    x0s = np.stack([frames[i]["x0"][0] for i in idx])
    return grid_image(np.concatenate([xs, x0s]), len(idx), ["x_t", "x0"])


def interval_text(interval) -> str:
    """A guidance interval as ``LO,HI`` text that :func:`difflo.config.parse_interval` reads back to the same
    floats; empty for none."""
    return ",".join(flag_text(float(v)) for v in interval)


def _exact_checkpoint(ckpt, ema: bool) -> tuple[Path, str]:
    """(the weights file ``ckpt`` loads, the checkpoint as the commands shown name it). The command line names the
    exact checkpoint that is loaded (a run directory's "latest" may change while the server runs)."""
    weights = resolve_weights(ckpt, ema)
    path = weights.parent if weights.name in WEIGHTS and (weights.parent / "manifest.json").exists() else weights
    return weights, _display_path(path)


def _display_path(p: Path) -> str:
    """Relative to the working directory when inside it (as the user would type it), else absolute."""
    p = Path(os.path.abspath(p))
    try:
        return str(p.relative_to(Path(os.path.abspath(Path.cwd()))))
    except ValueError:
        return str(p)


def _cmd(argv: list[str]) -> str:
    return "difflo " + " ".join(shlex.quote(a) for a in argv)
