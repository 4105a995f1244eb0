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

The folder is built beside OUT (``.tmp-OUT``, :func:`difflo.io.atomic_dir`) and renamed into place, so OUT
is complete or absent. diffusers is not needed to export (the files are plain JSON and safetensors).
"""
from __future__ import annotations

import csv
import functools
import importlib.resources
import json
import re
import shutil
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from string import Template

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__, config as config_mod, pretrained, schedules
from .checkpoint import is_diffusers_folder, resolve_weights
from .data import DATASETS
from .errors import CheckpointError, DiffloError
from .io import atomic_dir
from .model import Model, load_model
from .nn.unet import Attention
from .noise_paths import PATHS

TESTED_DIFFUSERS = "0.42.1"          # the diffusers release tests/peer/test_export_vs_diffusers.py ran against
PREDICTION_TYPES = {ours: theirs for theirs, ours in pretrained.PREDICTIONS.items()}   # eps -> epsilon, ...
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
RES_PARTS = {"norm1": "norm1", "conv1": "conv1", "emb": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
             "skip": "conv_shortcut"}
CARD_TEMPLATE = "model_card.md"      # in difflo/assets/: the model card's text (:func:`model_card`)
SCORES = ("fid", "fd_classifier", "class_accuracy")    # what makes an --eval-json or metrics.csv row a score
# The --eval-json scores a card shows, in order, with their format.
EVAL_FORMATS = {"fid": ".2f", "fd_classifier": ".2f", "class_accuracy": ".4f", "category_accuracy": ".4f"}


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
    if not PATHS[d.objective].beta_schedule:
        raise DiffloError(flow_refusal(d.objective))
    out = {"_class_name": "DDPMScheduler", "_diffusers_version": diffusers_version(),
           "num_train_timesteps": d.timesteps, "beta_start": d.beta_start, "beta_end": d.beta_end,
           "beta_schedule": BETA_SCHEDULES.get(d.schedule, "linear"), "trained_betas": None,
           "variance_type": s.variance, "clip_sample": bool(s.clip_x0), "clip_sample_range": d.clip_range,
           "prediction_type": PREDICTION_TYPES[d.prediction], "thresholding": False,
           "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
           "timestep_spacing": s.spacing if s.spacing in schedules.SPACINGS else "trailing",
           "steps_offset": 0, "rescale_betas_zero_snr": bool(d.zero_terminal_snr)}   # idempotent on trained_betas
    if d.schedule not in BETA_SCHEDULES:                 # difflo's sigmoid (RIN), explicit: the betas themselves
        betas = schedules.get_betas(d.schedule, d.timesteps, d.beta_start, d.beta_end, d.betas)
        out["trained_betas"] = [float(b) for b in betas.tolist()]
    return out


def flow_refusal(objective: str, what: str = "this model") -> str:
    return (f"{what} has no DDPM beta schedule (diffusion.objective={objective}: a flow-matching model or EDM's "
            f"variance-exploding path): diffusers' DDPM schedulers cannot express its path, so there is nothing to "
            f"export it to; difflo export writes diffusion models (use the run itself as difflo's --ckpt)")


# ----------------------------------------------------------------------------- the network
def unet2d_config(net: torch.nn.Module) -> tuple[dict | None, str | None]:
    """(the ``UNet2DModel`` config of difflo's UNet ``net``, None), or (None, what differs) when no
    renaming of the weights can make one (see the module docstring)."""
    m = net.cfg
    if m.guidance_input:
        return None, ("it takes the guidance scale w as an input (a difflo distill --w-range student), which "
                      "UNet2DModel has no place for")
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
              "norm_num_groups": groups[0], "norm_eps": 1e-5,
              # the middle attention's GroupNorm: diffusers drops it under scale_shift unless named here
              "attn_norm_num_groups": groups[0] if m.scale_shift else None,
              "resnet_time_scale_shift": "scale_shift" if m.scale_shift else "default", "add_attention": True,
              "class_embed_type": None,
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
    if not any(k in res for k in SCORES):
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
                any(r.get(k) for k in SCORES):
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


@functools.cache
def card_parts() -> dict[str, Template]:
    """The parts of ``difflo/assets/model_card.md`` (the card and the pieces it holds or not), by name."""
    text = importlib.resources.files("difflo").joinpath("assets", CARD_TEMPLATE).read_text(encoding="utf-8")
    pieces = re.split(r"^<!-- part: (\S+) -->\n", text, flags=re.M)
    return {name: Template(body.removesuffix("\n")) for name, body in zip(pieces[1::2], pieces[2::2])}


def model_card(model: Model, meta: dict, layout: str, ema: bool, why: str | None, weights_file: str,
               out_name: str, evals: list[dict], eval_json: dict | None, eval_json_name: str | None) -> str:
    """README.md of an exported folder: ``assets/model_card.md`` filled in from the model, its run's
    evaluation rows (``evals``) or ``--eval-json``, and the data set's licence (``DatasetSpec.licence``)."""
    cfg, parts = model.cfg, card_parts()
    m, d, data, t, s, e = cfg.model, cfg.diffusion, cfg.data, cfg.train, cfg.sample, cfg.eval
    diffusers, classes = layout == "diffusers", bool(m.num_classes)
    ckpt = out_name if diffusers else f"{out_name}/difflo/{weights_file}"
    flags = " ".join(sample_flags(cfg, layout))
    spec = DATASETS.get(data.name)
    values = {
        "out_name": out_name, "trained_with": meta.get("difflo_version", "?"), "data_name": data.name,
        "version": __version__, "kind": "EMA" if ema else "raw (not EMA)", "step": meta.get("step", "?"),
        "weights_file": weights_file, "why": why, "unet2d": " (= diffusers UNet2DModel)" if diffusers else "",
        "params": f"{sum(p.numel() for p in model.net.parameters()):,}", "image_size": m.image_size,
        "in_channels": m.in_channels,
        "channels": f"{m.in_channels} channel{'s' if m.in_channels > 1 else ''} "
                    f"({'grey' if m.in_channels == 1 else 'RGB'})",
        "base": m.channels, "channel_mult": list(m.channel_mult), "widths": [m.channels * k for k in m.channel_mult],
        "sizes": [m.image_size // 2**i for i in range(len(m.channel_mult))], "res_blocks": m.num_res_blocks,
        "res_blocks_up": m.num_res_blocks + 1, "dropout": f"{m.dropout:g}",
        "attn_resolutions": list(m.attn_resolutions) or "none",
        "heads": f"{m.attn_heads} head{'s' if m.attn_heads > 1 else ''}", "t_last": d.timesteps - 1,
        "time_width": 4 * m.channels, "num_classes": m.num_classes,
        "class_names": ", ".join(f"{i}: {n}" for i, n in enumerate(model.class_names)),
        "timesteps": d.timesteps, "schedule": d.schedule, "prediction": d.prediction,
        "prediction_type": PREDICTION_TYPES[d.prediction], "batch_size": t.batch_size, "lr": f"{t.lr:g}",
        "lr_schedule": t.lr_schedule, "warmup_steps": t.warmup_steps, "label_dropout": f"{t.label_dropout:g}",
        "ema_decay": f"{t.ema_decay:g}", "loss_weighting": d.loss_weighting, "seed": t.seed,
        "sampler": s.sampler, "steps": s.steps, "w": f"{s.w:g}", "spacing": s.spacing,
        "eta": f", eta {s.eta:g}" if s.sampler == "ddim" else "",
        "guidance": f", guidance w = {s.w:g}" if classes else "",
        "clip": f"{d.clip_range:g}", "clipped": "yes" if s.clip_x0 else "no", "variance": s.variance,
        "pip": '"difflo[diffusers]"' if diffusers else "difflo",
        "command": f"difflo sample --ckpt {ckpt}{' ' + flags if flags else ''} --out grid.png",
        "ema_note": "" if ema else " only with --no-ema",
    }

    def fill(name: str, **more) -> str:
        return parts[name].substitute(values, **more)

    shown = {"name": data.name, "split": data.split, "image_size": data.image_size or f"{m.image_size} (native)",
             "flip": data.flip, "attribute": data.attribute, "label": data.label, "styles": data.styles,
             "background": data.background if m.in_channels == 3 else None, "per_class": data.per_class}
    evaluation = []
    if eval_json is not None:
        get = eval_json.get
        evaluation += [fill("eval_json", eval_json_name=eval_json_name,
                            **{k: get(k, "?") for k in ("weights", "ckpt", "sampler", "steps", "w", "n")}), ""]
        known = {k: get(k, "?") for k in ("feature_extractor", "ref_n", "classifier_test_accuracy")}
        evaluation += [fill(f"eval_{k}", **known, **{k: format(eval_json[k], fmt)})
                       for k, fmt in EVAL_FORMATS.items() if k in eval_json]
    if evals:
        evaluation.append(fill("eval_rows", n=e.n, steps=e.steps, features=e.features))
        evaluation += [fill("eval_row", step=r["step"], **{k: r.get(k) or "-" for k in SCORES})
                       for r in evals]
    if eval_json is None and not evals:
        evaluation.append(fill("not_measured"))
    if diffusers:
        usage = fill("usage_diffusers", null_class_note=fill("null_class_note") if classes else ".",
                     snippet=fill("snippet_conditional" if classes else "snippet_unconditional"))
        if classes:
            usage += "\n\n" + fill("why_no_pipeline")
        if s.spacing != "leading" and s.sampler == "ddpm":
            usage += "\n\n" + fill("spacing_note")
    else:
        usage = fill("usage_difflo")
    licence = spec.licence if spec else ""
    return fill("card", front_matter=parts["front_matter_diffusers"].template + "\n" if diffusers else "",
                about=fill("about_diffusers" if diffusers else "about_difflo"),
                classes=fill("classes_conditional" if classes else "classes_unconditional"),
                class_list="\n" + fill("class_list") + "\n" if classes else "",
                data="\n".join(f"- {k}: {v if not isinstance(v, tuple) else ', '.join(v)}" for k, v in shown.items()
                               if v is not None and v is not False),
                evaluation="\n".join(evaluation), usage=usage,
                licence=fill("licence", licence=licence) if licence else fill("no_licence")) + "\n"


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
    if not model.path.beta_schedule:
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
        with atomic_dir(out) as tmp:                      # .tmp-OUT, renamed over an empty OUT
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
                shutil.copymode(tmp / "unet" / "config.json", unet_file)     # safetensors: 0600; the umask's mode
            else:
                shutil.copyfile(weights, tmp / "difflo" / weights_file)     # difflo's file, its metadata included
    except OSError as e:
        raise DiffloError(f"cannot write {out}: {e.strerror or e}; free disk space or choose another OUT") from None
    return Export(out, layout, why, sorted(files))
