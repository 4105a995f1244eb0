"""Pretrained diffusers pixel-space DDPMs as difflo models (``--ckpt FOLDER``; docs/pretrained.md).

A folder that diffusers wrote becomes a :class:`difflo.model.Model` in three parts:

* **the network** is diffusers' own ``UNet2DModel`` (``from_pretrained``) behind :class:`DiffusersUNet`,
  which gives it difflo's call ``net(x, time, y) -> output`` (see :mod:`difflo.nn.unet`);
* **the path** is a :class:`~difflo.diffusion.DiscreteSchedule` built from the scheduler config's
  ``num_train_timesteps``, ``beta_schedule`` (``linear``, ``scaled_linear``, ``squaredcos_cap_v2`` =
  difflo's ``cosine``, ``sigmoid``), ``beta_start``/``beta_end`` and ``trained_betas``;
* **the config** (:func:`config_for`) fills in what the rest of difflo reads: ``model.in_channels``,
  ``image_size`` (``sample_size``), ``num_classes`` (``num_class_embeds`` or 0), the prediction
  (``prediction_type`` epsilon / v_prediction / sample), x0 clipping (``clip_sample``,
  ``clip_sample_range``) and the sampling defaults of the scheduler (its sampler, ``timestep_spacing``,
  ``steps_offset``, DDPM ``variance_type``; for DDIM its step rule, t -> t - T // n, as ``sample.step_rule:
  stride``, and ``set_alpha_to_one`` as ``sample.grid_end``). ``data.name`` is ``diffusers:<folder name>``.
  A scheduler difflo does not implement, or a setting it does not read, is named in one warning line on
  stderr (:func:`unread_settings`), with the difflo sampler used instead.

A ``difflo export`` (:mod:`difflo.export`) also holds ``difflo/config.yaml``, the run's resolved config;
:func:`own_classes` reads back what a diffusers config cannot hold: the null class (``model.num_classes``:
classes 0..n-1, n the null class, the last of the n + 1 embeddings) and the class names
(``data.classes``), so guidance and names work without ``--null-class`` (which still overrides). A file
that does not fit the UNet (another model's) is one line.

Layouts read: a pipeline save (``model_index.json``, ``unet/`` with ``config.json`` and
``diffusion_pytorch_model.safetensors`` or ``.bin``, ``scheduler/scheduler_config.json``), the same files
flat in one folder, or a bare ``UNet2DModel`` folder with ``scheduler_config.json`` beside its
``config.json`` or in ``scheduler/`` (also ``../scheduler/`` for a pipeline's ``unet/`` folder).
Everything else gets one line naming the problem: latent pipelines (a VAE), other networks, unknown
schedulers or beta schedules, learned variances, missing or mis-shaped weights.

diffusers is imported inside the functions that need it, so difflo runs without it until such a
folder is loaded.
"""
from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import torch
import yaml

from . import config as config_mod, schedules
from .errors import CheckpointError, DiffloError

INSTALL = 'pip install "difflo[diffusers]"'
PIXEL_ONLY = "difflo runs pixel-space UNet2DModel pipelines"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
LATENT_PARTS = ("vae", "vqvae", "text_encoder", "tokenizer", "bert", "image_encoder")

# The schedulers whose config describes a DDPM noise schedule (betas over num_train_timesteps): scheduler class ->
# (the difflo sampler it is sampled with, whether that sampler is the scheduler itself). The DDPM and DDIM ones
# are: difflo reads every setting they have and samples their pipeline's images (tests/peer/
# test_pretrained_settings.py). Any other is sampled with the nearest sampler difflo has, and loading the folder
# says so in one warning line on stderr.
SCHEDULERS = {"DDPMScheduler": ("ddpm", True), "DDPMParallelScheduler": ("ddpm", True),
              "DDIMScheduler": ("ddim", True), "DDIMParallelScheduler": ("ddim", True),
              "PNDMScheduler": ("ddim", False), "DPMSolverMultistepScheduler": ("dpmpp", False),
              "DPMSolverSinglestepScheduler": ("dpmpp", False), "DEISMultistepScheduler": ("dpmpp", False),
              "UniPCMultistepScheduler": ("dpmpp", False), "EulerDiscreteScheduler": ("ddim", False),
              "EulerAncestralDiscreteScheduler": ("euler_ancestral", False), "HeunDiscreteScheduler": ("ddim", False),
              "LMSDiscreteScheduler": ("ddim", False), "KDPM2DiscreteScheduler": ("ddim", False),
              "KDPM2AncestralDiscreteScheduler": ("euler_ancestral", False)}
# The scheduler settings difflo reads, whichever the class (config_for): the noise schedule, the prediction, x0
# clipping, the time grid (spacing, leading's offset, the noise-level grids) and the DDPM variance; the
# thresholding values matter only with thresholding, which is refused. DDIM's own (its final alpha) are in
# DDIM_SETTINGS. Any other setting with a value other than its class's default is named in the warning line.
READ_SETTINGS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                 "clip_sample", "clip_sample_range", "timestep_spacing", "steps_offset", "use_karras_sigmas",
                 "use_exponential_sigmas", "variance_type", "rescale_betas_zero_snr", "thresholding",
                 "dynamic_thresholding_ratio", "sample_max_value")
DDIM_SETTINGS = ("set_alpha_to_one",)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}
OWN_CONFIG = "difflo/config.yaml"      # the resolved config `difflo export` writes into the folder (difflo.export)


# ----------------------------------------------------------------------------- the network
class DiffusersUNet(torch.nn.Module):
    """A diffusers ``UNet2DModel`` with difflo's call ``net(x, time, y) -> output``.

    * **time**: difflo conditions the network on the integer timestep index t = 0..T-1, given as float32
      (``DiscreteSchedule.model_time``); diffusers' schedulers hand UNet2DModel the same index as int64
      (``scheduler.timesteps``). It is rounded to int64 here, so the ``learned`` time embedding (an
      ``nn.Embedding``) works too.
    * **classes**: an unconditional UNet ignores ``y`` and ``class_weights``. A class-conditional one
      (``num_class_embeds``) reads ``y`` as its class index, except difflo's null class (index
      ``num_classes``, which classifier-free guidance asks for), which becomes ``null_class``: the index
      the model was trained to read as "no class", which its diffusers config does not name
      (:meth:`set_null_class`; :func:`load_folder` reads it from a ``difflo export``'s own config).
    * **class_weights** ((B, num_classes + 1), difflo's rows: the classes, then the null class; the
      class-embedding mixes of :class:`difflo.edit.operators.ClassMixNet`) become weights over the model's
      embedding rows (difflo's null row moved to ``null_class``) and the embedding ``sum_k w_k E[k]``,
      summed elementwise in float32 as :class:`difflo.nn.UNet` does, replaces the output of
      ``unet.class_embedding`` for that call (a forward hook: UNet2DModel adds that output to the time
      embedding and reads the labels nowhere else). A one-hot row gives exactly ``E[y]``: the same
      output as the label ``y``.
    """

    def __init__(self, unet: torch.nn.Module, num_classes: int):
        super().__init__()
        self.unet = unet
        self.num_classes = num_classes        # difflo's null-class index
        self.null_class: int | None = None     # the model's own null class (None: not known)

    @property
    def conditional(self) -> bool:
        return self.unet.class_embedding is not None

    def set_null_class(self, k: int) -> int:
        """Use class index k as the null class; returns the number of classes difflo then shows (k is
        the last embedding, as in difflo's own layout: one fewer; otherwise all of them)."""
        embeds = self.unet.config.num_class_embeds
        if not self.conditional:
            raise DiffloError("--null-class: this model is unconditional (no class labels), so there is no null "
                              "class to name")
        if not 0 <= k < embeds:
            raise DiffloError(f"--null-class {k} out of range: this model has class embeddings 0..{embeds - 1}")
        self.null_class = k
        self.num_classes = k if k == embeds - 1 else embeds
        return self.num_classes

    def embedding_weights(self, class_weights: torch.Tensor) -> torch.Tensor:
        """difflo's (B, num_classes + 1) class weights as (B, num_class_embeds) weights over the model's
        embedding rows: the classes' columns in place, the null class's added to row ``null_class``."""
        k, embeds = self.num_classes, self.unet.config.num_class_embeds
        if class_weights.ndim != 2 or class_weights.shape[1] != k + 1:
            raise DiffloError(f"class_weights of shape {tuple(class_weights.shape)}: this model takes (batch, "
                              f"{k + 1}) weights (its {k} classes and the null class)")
        w = class_weights.float()
        rows = torch.zeros(w.shape[0], embeds, device=w.device)
        rows[:, :k] = w[:, :k]
        if bool((w[:, k] != 0).any()):
            if self.null_class is None:
                raise DiffloError(null_class_needed())
            rows[:, self.null_class] += w[:, k]
        return rows

    def forward(self, x: torch.Tensor, time: torch.Tensor, y: torch.Tensor | None = None,
                class_weights: torch.Tensor | None = None) -> torch.Tensor:
        t = time.round().long()                                             # (B,) the timestep index
        if class_weights is not None and self.conditional:
            table = self.unet.class_embedding.weight                        # (num_class_embeds, D)
            rows = self.embedding_weights(class_weights).to(table)
            mixed = (rows[:, :, None] * table[None]).sum(1)                 # (B, D), as difflo.nn.UNet
            hook = self.unet.class_embedding.register_forward_hook(lambda module, args, out: mixed.to(out))
            try:                                                            # the labels' lookup is replaced
                labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
                return self.unet(x, t, class_labels=labels, return_dict=False)[0]
            finally:
                hook.remove()
        labels = None
        if self.conditional:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            null = y == self.num_classes
            if bool(null.any()):
                if self.null_class is None:
                    raise DiffloError(null_class_needed())
                y = torch.where(null, torch.full_like(y, self.null_class), y)
            labels = y
        return self.unet(x, t, class_labels=labels, return_dict=False)[0]   # (B, C, H, W)


def null_class_needed(w: float | None = None) -> str:
    what = f"guidance w={w:g}" if w is not None else "guidance (or an unconditional prediction)"
    return (f"{what} needs this diffusers model's null class (the class index it was trained to read as 'no "
            f"class'), which its config does not name: use --w 1 (conditional, no guidance) or name it with "
            f"--null-class K")


def foreign_net(net: torch.nn.Module) -> DiffusersUNet | None:
    """The :class:`DiffusersUNet` inside ``net`` (itself, or under wrappers such as a compiled module or
    a call counter), or None for difflo's own network."""
    return next((m for m in net.modules() if isinstance(m, DiffusersUNet)), None)


# ----------------------------------------------------------------------------- the folder
def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); is this {what}?") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; is this {what}?")
    return data


def latent(folder: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{folder}: latent diffusion is not supported: {PIXEL_ONLY} ({why})")


def locate(folder: Path) -> tuple[Path, Path]:
    """(the UNet2DModel's folder, its scheduler config file) of a diffusers folder; one line if the
    folder is not a pixel-space UNet2DModel pipeline."""
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if index_file.is_file():
        index = read_json(index_file, "a diffusers pipeline's model_index.json")
        name = index.get("_class_name", "a pipeline")
        parts = {k: v for k, v in index.items() if not k.startswith("_")}
        found = [p for p in LATENT_PARTS if p in parts or (folder / p).is_dir()]
        if found:
            raise latent(folder, f"{name} has a {found[0]}")
        unet = parts.get("unet")
        if unet is None:
            raise CheckpointError(f"{index_file}: {name} has no unet ({', '.join(parts) or 'no components'}): "
                                  f"{PIXEL_ONLY} (DDPMPipeline, DDIMPipeline)")
        unet_class = unet[-1] if isinstance(unet, list) and unet else unet
        if unet_class != "UNet2DModel":
            raise CheckpointError(f"{index_file}: {name}'s unet is a {unet_class}: {PIXEL_ONLY}")
    elif any((folder / p).is_dir() for p in LATENT_PARTS):
        raise latent(folder, f"it has a {next(p for p in LATENT_PARTS if (folder / p).is_dir())}/ folder")
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    if not (unet_dir / "config.json").is_file():
        raise CheckpointError(f"{folder} has no UNet config ({unet_dir / 'config.json'} is missing): a diffusers "
                              f"model folder has model_index.json, unet/config.json and unet/{WEIGHT_FILES[0]}, "
                              f"or config.json and {WEIGHT_FILES[0]} at its top")
    candidates = [folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"]
    if unet_dir == folder and folder.name == "unet":                  # a pipeline's unet/ folder itself
        candidates.append(folder.parent / "scheduler" / "scheduler_config.json")
    scheduler = next((c for c in candidates if c.is_file()), None)
    if scheduler is None:
        raise CheckpointError(f"{folder} has no scheduler config (looked for {candidates[0]} and {candidates[1]}): "
                              f"difflo reads the noise schedule from the pipeline's scheduler_config.json")
    return unet_dir, scheduler


def check_unet_config(u: dict, where: Path) -> None:
    """One line for a UNet config that is not a pixel-space UNet2DModel difflo can run."""
    cls = u.get("_class_name", "UNet2DModel")
    if cls in ("AutoencoderKL", "VQModel"):
        raise latent(where.parent, f"{where} describes a {cls}")
    if cls != "UNet2DModel":
        raise CheckpointError(f"{where} describes a {cls}: {PIXEL_ONLY}")
    size = u.get("sample_size")
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise CheckpointError(f"{where}: sample_size {size!r} is not one square image size; difflo samples "
                              f"square images")
    c_in, c_out = u.get("in_channels", 3), u.get("out_channels", 3)
    if c_out == 2 * c_in:
        raise CheckpointError(f"{where}: out_channels = 2 x in_channels is a learned-variance model (Improved "
                              f"DDPM); difflo runs models that predict eps, v or x0 only")
    if c_in != c_out:
        raise CheckpointError(f"{where}: in_channels {c_in} != out_channels {c_out}; difflo runs pixel-space "
                              f"models whose output has the image's channels")
    if u.get("time_embedding_type", "positional") not in ("positional", "learned"):
        raise CheckpointError(f"{where}: time_embedding_type {u['time_embedding_type']!r} (a score-SDE model "
                              f"conditioned on sigma) is not supported; difflo runs DDPM timestep models")
    if u.get("class_embed_type") is not None:
        raise CheckpointError(f"{where}: class_embed_type {u['class_embed_type']!r} is not supported; difflo "
                              f"reads class labels as indices (num_class_embeds)")


def scheduler_settings(s: dict, where: Path) -> dict:
    """The scheduler config with the defaults of its diffusers class filled in; one line if difflo cannot
    read its noise schedule, and one warning line on stderr (:func:`unread_settings`) if difflo does not
    sample it as the scheduler itself does."""
    name = s.get("_class_name")
    if name not in SCHEDULERS:
        raise CheckpointError(f"{where}: unknown scheduler _class_name {name!r}; difflo reads the DDPM-family "
                              f"schedulers ({', '.join(SCHEDULERS)})")
    import diffusers

    defaults = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                "trained_betas": None, "prediction_type": "epsilon", "clip_sample": False,
                "clip_sample_range": 1.0, "timestep_spacing": "leading", "steps_offset": 0, "variance_type": None,
                "thresholding": False, "rescale_betas_zero_snr": False, "set_alpha_to_one": True}
    own: dict | None = None                                  # the class's own defaults, e.g. clip_sample=True
    try:
        params = inspect.signature(getattr(diffusers, name).__init__).parameters.values()
        own = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        defaults.update(own)
    except (AttributeError, ImportError, TypeError, ValueError):
        pass                                                 # a class this diffusers lacks: the config alone
    given = s
    s = {**defaults, **{k: v for k, v in s.items() if v is not None or k == "trained_betas"}}
    if s["beta_schedule"] not in BETA_SCHEDULES and s["trained_betas"] is None:
        raise CheckpointError(f"{where}: unknown beta_schedule {s['beta_schedule']!r}; difflo reads "
                              f"{', '.join(BETA_SCHEDULES)} and trained_betas")
    if s["prediction_type"] not in PREDICTIONS:
        raise CheckpointError(f"{where}: unknown prediction_type {s['prediction_type']!r}; difflo reads "
                              f"{', '.join(PREDICTIONS)}")
    if s["variance_type"] is not None and s["variance_type"] not in VARIANCES:
        raise CheckpointError(f"{where}: variance_type {s['variance_type']!r} is not supported; difflo's DDPM "
                              f"reads {', '.join(VARIANCES)}")
    if s["thresholding"]:
        raise CheckpointError(f"{where}: dynamic thresholding (thresholding: true) is not supported; set it to "
                              f"false to sample with clip_sample")
    if s["rescale_betas_zero_snr"] and s["prediction_type"] == "epsilon":
        raise CheckpointError(f"{where}: rescale_betas_zero_snr (zero terminal SNR) with prediction_type epsilon "
                              f"cannot start from pure noise (eps says nothing of x0 there); difflo reads it with "
                              f"v_prediction or sample")
    warning = unread_settings(given, own, where)
    if warning:
        print(warning, file=sys.stderr)
    return s


def unread_settings(given: dict, own: dict | None, where: Path) -> str | None:
    """The one warning line for a scheduler config that difflo does not sample as the scheduler does, or None:
    a scheduler class difflo does not implement (named, with the difflo sampler used instead), and settings
    difflo does not read (:data:`READ_SETTINGS`) whose value is not the class's default (``own``; settings the
    class does not take are ignored, as diffusers ignores them; every setting when the installed diffusers
    lacks the class)."""
    name = given["_class_name"]
    sampler, itself = SCHEDULERS[name]
    read = READ_SETTINGS + (DDIM_SETTINGS if itself and sampler == "ddim" else ())
    unread = [f"{k}={v!r}" for k, v in given.items() if not k.startswith("_") and k not in read
              and (own is None or (k in own and v != own[k]))]
    not_used = f"; its settings {', '.join(unread)} are not used" if unread else ""
    if not itself:
        return (f"warning: {where}: difflo does not implement {name}; it samples this folder with difflo's "
                f"{sampler} sampler instead (--sampler picks another){not_used}")
    if unread:
        return f"warning: {where}: difflo samples {name} as if {', '.join(unread)} had their defaults"
    return None


def config_for(u: dict, s: dict, name: str) -> config_mod.Config:
    """The difflo Config of a UNet2DModel config ``u`` and a filled-in scheduler config ``s``.
    ``model`` holds the image shape and classes; its architecture fields are placeholders (the network
    is described by its own config.json)."""
    cfg = config_mod.Config()
    cfg.data.name, cfg.data.classes = f"diffusers:{name}", ()
    size = u["sample_size"]
    m = cfg.model
    m.in_channels = int(u.get("in_channels", 3))
    m.image_size = int(size[0] if isinstance(size, list) else size)
    m.num_classes = int(u.get("num_class_embeds") or 0)
    m.channels, m.channel_mult, m.attn_resolutions = int(u.get("block_out_channels", [32])[0]), (1,), ()
    d = cfg.diffusion
    d.objective, d.timesteps = "diffusion", int(s["num_train_timesteps"])
    d.prediction = PREDICTIONS[s["prediction_type"]]
    if s["trained_betas"] is not None:
        d.schedule, d.betas = "explicit", tuple(float(b) for b in s["trained_betas"])
    elif s["beta_schedule"] in ("linear", "scaled_linear"):
        d.schedule, d.beta_start, d.beta_end = s["beta_schedule"], float(s["beta_start"]), float(s["beta_end"])
    elif s["beta_schedule"] == "squaredcos_cap_v2":      # Nichol & Dhariwal's cosine, capped at 0.999: difflo's
        d.schedule = "cosine"
    else:                                                # diffusers' sigmoid (not difflo's): explicit betas
        betas = schedules.logistic_betas(d.timesteps, float(s["beta_start"]), float(s["beta_end"]))
        d.schedule, d.betas = "explicit", tuple(betas.tolist())
    d.clip_range = float(s["clip_sample_range"])
    d.zero_terminal_snr = bool(s["rescale_betas_zero_snr"])   # Lin et al. 2024, Alg. 1, on the betas above
    p = cfg.sample
    sampler, itself = SCHEDULERS[s["_class_name"]]
    p.sampler, p.steps, p.eta, p.w = sampler, min(50, d.timesteps), 0.0, 1.0
    p.steps_offset = int(s["steps_offset"])                  # leading spacing's offset (the others have none)
    if itself and sampler == "ddim":                         # DDIMScheduler.step: t -> t - T // n, then alpha_bar
        p.step_rule = "stride"                               # 1 (set_alpha_to_one) or alpha_bar_0 below t = 0
        p.grid_end = "clean" if s["set_alpha_to_one"] else "t0"
    p.precision = "fp32"      # the pipeline's own images by default; --precision auto for difflo's speed
    p.spacing = s["timestep_spacing"] if s["timestep_spacing"] in schedules.SPACINGS else "leading"
    for flag, grid in (("use_karras_sigmas", "karras"), ("use_exponential_sigmas", "exponential")):
        if s.get(flag) and not d.zero_terminal_snr:          # Euler/DPM schedulers' noise-level grids
            p.spacing = grid
    p.clip_x0 = bool(s["clip_sample"])
    p.variance = VARIANCES.get(s["variance_type"] or "fixed_small")
    return cfg


def load_unet(unet_dir: Path):
    """diffusers' UNet2DModel.from_pretrained on a local folder, in float32, quietly; one line if the
    weights are missing or do not fit its config.json."""
    from diffusers import UNet2DModel
    from diffusers.utils import logging as diffusers_logging

    weights = next((unet_dir / f for f in WEIGHT_FILES if (unet_dir / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{unet_dir} has no weights ({WEIGHT_FILES[0]} or {WEIGHT_FILES[1]}) beside its "
                              f"config.json")
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()              # no notes on stderr about accelerate or unused keys
    try:
        unet, info = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True, low_cpu_mem_usage=False,
                                                 torch_dtype=torch.float32, output_loading_info=True)
    except Exception as e:                               # diffusers raises RuntimeError/OSError/ValueError/...
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        mismatch = next((ln for ln in lines if ln.startswith("size mismatch")), None)
        if mismatch:
            raise CheckpointError(f"{weights} does not fit its config.json ({mismatch})") from None
        raise CheckpointError(f"{weights}: diffusers could not load the UNet2DModel "
                              f"({type(e).__name__}: {(lines or [''])[0][:200]})") from None
    finally:
        diffusers_logging.set_verbosity(level)
    missing, unexpected = info.get("missing_keys", []), info.get("unexpected_keys", [])
    wrong = info.get("mismatched_keys", [])
    if missing or unexpected or wrong:
        example = (list(missing) + list(unexpected) + [k[0] if isinstance(k, tuple) else k for k in wrong])[0]
        raise CheckpointError(f"{weights} does not fit its config.json ({len(missing)} missing, {len(unexpected)} "
                              f"unexpected, {len(wrong)} mis-shaped tensors, e.g. {example})")
    return unet


def load_folder(folder: Path) -> tuple[DiffusersUNet, config_mod.Config]:
    """The network and difflo Config of a diffusers model folder (see the module docstring)."""
    folder = Path(folder)
    unet_dir, scheduler_file = locate(folder)
    u = read_json(unet_dir / "config.json", "a UNet2DModel's config.json")
    check_unet_config(u, unet_dir / "config.json")
    s = read_json(scheduler_file, "a diffusers scheduler_config.json")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise DiffloError(f"{folder} is a diffusers model folder; reading it needs diffusers: {INSTALL}") from None
    s = scheduler_settings(s, scheduler_file)
    name = (folder.parent.name if folder.name == "unet" and unet_dir == folder else folder.name) or "model"
    try:
        cfg = config_for(u, s, name)
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise CheckpointError(f"{scheduler_file} or {unet_dir / 'config.json'} has a value difflo cannot read "
                              f"({type(e).__name__}: {e})") from None
    try:
        cfg.validate()
    except DiffloError as e:
        raise CheckpointError(f"{folder}: its configs do not make a difflo model ({e})") from None
    if u.get("time_embedding_type") == "learned" and (u.get("num_train_timesteps") or 0) < cfg.diffusion.timesteps:
        raise CheckpointError(f"{unet_dir / 'config.json'}: its learned time embedding has "
                              f"{u.get('num_train_timesteps')} rows for {cfg.diffusion.timesteps} timesteps")
    net = DiffusersUNet(load_unet(unet_dir), cfg.model.num_classes)
    own = own_classes(folder, unet_dir, u)
    if own is not None:                                  # a difflo export: its null class and class names
        k, names = own
        if k:
            cfg.model.num_classes = net.set_null_class(k)
        cfg.data.classes = names
    return net, cfg


def own_classes(folder: Path, unet_dir: Path, u: dict) -> tuple[int, tuple[str, ...]] | None:
    """(null class, class names) from the ``difflo/config.yaml`` that ``difflo export`` writes into the
    folder (``model.num_classes``: the classes are 0..n-1 and n the null class, the last embedding;
    ``data.classes``), or None when the folder has none; one line when it does not describe this UNet."""
    candidates = [folder / OWN_CONFIG]
    if unet_dir == folder and folder.name == "unet":                  # a pipeline's unet/ folder itself
        candidates.append(folder.parent / OWN_CONFIG)
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        return None
    fix = "remove it to read the folder as a plain diffusers model (with --null-class K)"
    try:
        d = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path} is not a readable difflo config ({type(e).__name__}); {fix}") from None
    model, data = (d.get(s) if isinstance(d, dict) else None for s in ("model", "data"))
    n = model.get("num_classes") if isinstance(model, dict) else None
    names = (data.get("classes") if isinstance(data, dict) else None) or []
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or not isinstance(names, list) \
            or not all(isinstance(c, (str, int)) for c in names):
        raise CheckpointError(f"{path} has no model.num_classes (a whole number >= 0) and data.classes (a list "
                              f"of names): it is not the config difflo export writes; {fix}")
    embeds = u.get("num_class_embeds") or 0
    if embeds != (n + 1 if n else 0):
        raise CheckpointError(f"{path}: model.num_classes = {n} does not fit {unet_dir / 'config.json'}'s "
                              f"num_class_embeds = {embeds or None} (difflo export writes num_classes + 1, the last "
                              f"the null class); {fix}")
    return n, tuple(str(c) for c in names)
