"""``difflo export RUN OUT``: a model as a folder diffusers opens, with a model card (difflo.export)."""
from __future__ import annotations

from ..export import export
from .argtypes import CKPT_HELP


def add_parser(sub) -> None:
    s = sub.add_parser("export", help="write a model as a diffusers folder (DDPMPipeline) with a model card",
                       description="Write a difflo diffusion model as a folder diffusers opens: a DDPMScheduler config "
                                   "of its noise schedule, its UNet as a UNet2DModel (or, where difflo's UNet has "
                                   "no UNet2DModel equivalent, difflo's own weights file) and a model card "
                                   "(README.md). See docs/pretrained.md, 'Export'.")
    s.add_argument("run", metavar="RUN", help=CKPT_HELP.replace("a diffusers model folder, ", ""))
    s.add_argument("out", metavar="OUT", help="the folder to write (must not exist, or be empty)")
    s.add_argument("--ema", dest="ema", action="store_true", default=True, help="export the EMA weights (default)")
    s.add_argument("--no-ema", dest="ema", action="store_false", help="export the raw weights")
    s.add_argument("--eval-json", metavar="F",
                   help="scores for the model card: the JSON `difflo eval model --json F` wrote (the run's own "
                        "evaluation rows in RUN/metrics.csv are included either way)")
    s.set_defaults(func=run)


def run(args) -> int:
    res = export(args.run, args.out, ema=args.ema, eval_json=args.eval_json)
    if res.layout == "diffusers":
        how = "a diffusers DDPMPipeline (UNet2DModel + DDPMScheduler)"
        load = f"difflo --ckpt {res.out}; diffusers DDPMPipeline.from_pretrained"
    else:
        how = f"difflo's weights + a DDPMScheduler config (not a UNet2DModel: {res.why})"
        weights = next(f for f in res.files if f.endswith(".safetensors"))
        load = f"difflo --ckpt {res.out / weights}"
    print(f"wrote {res.out}: {how}; model card {res.out / 'README.md'}; load with {load}")
    return 0
