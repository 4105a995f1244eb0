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
  DDPM ``variance_type``). ``data.name`` is ``diffusers:<folder name>``.

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
from pathlib import Path

import torch

from . import config as config_mod
from .errors import CheckpointError, DiffloError

INSTALL = 'pip install "difflo[diffusers]"'
PIXEL_ONLY = "difflo runs pixel-space UNet2DModel pipelines"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
LATENT_PARTS = ("vae", "vqvae", "text_encoder", "tokenizer", "bert", "image_encoder")

# The schedulers whose config describes a DDPM noise schedule (betas over num_train_timesteps), and the
# difflo sampler that is each one's closest default; the rest of their settings are sampler choices.
SCHEDULERS = {"DDPMScheduler": "ddpm", "DDPMParallelScheduler": "ddpm", "DDIMScheduler": "ddim",
              "DDIMParallelScheduler": "ddim", "PNDMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpmpp",
              "DPMSolverSinglestepScheduler": "dpmpp", "DEISMultistepScheduler": "dpmpp",
              "UniPCMultistepScheduler": "dpmpp", "EulerDiscreteScheduler": "ddim",
              "EulerAncestralDiscreteScheduler": "ddim", "HeunDiscreteScheduler": "ddim",
              "LMSDiscreteScheduler": "ddim", "KDPM2DiscreteScheduler": "ddim",
              "KDPM2AncestralDiscreteScheduler": "ddim"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large"}


# ----------------------------------------------------------------------------- the network
class DiffusersUNet(torch.nn.Module):
    """A diffusers ``UNet2DModel`` with difflo's call ``net(x, time, y) -> output``.

    * **time**: difflo conditions the network on the integer timestep index t = 0..T-1, given as float32
      (``DiscreteSchedule.model_time``); diffusers' schedulers hand UNet2DModel the same index as int64
      (``scheduler.timesteps``). It is rounded to int64 here, so the ``learned`` time embedding (an
      ``nn.Embedding``) works too.
    * **classes**: an unconditional UNet ignores ``y`` (and ``class_weights``, the class-embedding mixes
      of :class:`difflo.editing.ClassMixNet`, which a class-conditional one refuses). A class-conditional
      one (``num_class_embeds``) reads ``y`` as its class index, except difflo's null class (index
      ``num_classes``, which classifier-free guidance asks for), which becomes ``null_class``: the index
      the model was trained to read as "no class", which its config does not name (:meth:`set_null_class`).
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

    def forward(self, x: torch.Tensor, time: torch.Tensor, y: torch.Tensor | None = None,
                class_weights: torch.Tensor | None = None) -> torch.Tensor:
        if class_weights is not None and self.conditional:
            raise DiffloError("mixing class embeddings needs difflo's own UNet; this model is a diffusers "
                              "UNet2DModel")
        t = time.round().long()                                             # (B,) the timestep index
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
            f"difflo sample --null-class K")


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
    read its noise schedule."""
    name = s.get("_class_name")
    if name not in SCHEDULERS:
        raise CheckpointError(f"{where}: unknown scheduler _class_name {name!r}; difflo reads the DDPM-family "
                              f"schedulers ({', '.join(SCHEDULERS)})")
    import diffusers

    defaults = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                "trained_betas": None, "prediction_type": "epsilon", "clip_sample": False,
                "clip_sample_range": 1.0, "timestep_spacing": "leading", "variance_type": None,
                "thresholding": False, "rescale_betas_zero_snr": False}
    try:                                                     # the class's own defaults, e.g. clip_sample=True
        params = inspect.signature(getattr(diffusers, name).__init__).parameters.values()
        defaults.update({p.name: p.default for p in params if p.default is not inspect.Parameter.empty})
    except (AttributeError, ImportError, TypeError, ValueError):
        pass                                                 # a class this diffusers lacks: the config alone
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
    return s


def config_for(u: dict, s: dict, name: str) -> config_mod.Config:
    """The difflo Config of a UNet2DModel config ``u`` and a filled-in scheduler config ``s``.
    ``model`` holds the image shape and classes; its architecture fields are placeholders (the network
    is described by its own config.json)."""
    from . import schedules

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
    p.sampler, p.steps, p.eta, p.w = SCHEDULERS[s["_class_name"]], min(50, d.timesteps), 0.0, 1.0
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
    return DiffusersUNet(load_unet(unet_dir), cfg.model.num_classes), cfg
