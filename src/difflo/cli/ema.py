"""``difflo ema RUN --sigma-rel S --out DIR``: the post-hoc EMA of a run for any sigma_rel (difflo.posthoc_ema)."""
from __future__ import annotations

from pathlib import Path

from .. import checkpoint, posthoc_ema
from ..errors import DiffloError
from ..io import check_writable
from .argtypes import positive_float, positive_int


def add_parser(sub) -> None:
    s = sub.add_parser("ema", help="rebuild the EMA weights of a run for any sigma_rel (post-hoc EMA, EDM2)",
                       description="Rebuild the power-function EMA of a run's weights for any relative width "
                                   "sigma_rel, after training, from the snapshots that train.posthoc_ema wrote to "
                                   "RUN/posthoc/ (Karras et al. 2024, EDM2, Sec. 3): the least-squares combination "
                                   "of the snapshots whose averaging profile is nearest the one asked for. Writes a "
                                   "checkpoint folder (both weight files hold the rebuilt average) that "
                                   "`difflo sample --ckpt DIR` loads.")
    s.add_argument("run", metavar="RUN", help="a run directory trained with train.posthoc_ema")
    s.add_argument("--sigma-rel", type=positive_float, required=True, metavar="S",
                   help=f"the EMA width relative to the training length, in (0, {posthoc_ema.SIGMA_REL_MAX:.4f}] "
                        f"(EDM2: 0.05 ~ gamma 17, 0.10 ~ gamma 6.9)")
    s.add_argument("--out", required=True, metavar="DIR", help="the checkpoint folder to write (e.g. RUN/ema-0.080)")
    s.add_argument("--max-error", type=positive_float, default=posthoc_ema.MAX_ERROR, metavar="E",
                   help="refuse a sigma_rel whose fitted averaging profile has a larger relative L2 error "
                        "(default %(default)s)")
    s.add_argument("--step", type=positive_int, metavar="N",
                   help="rebuild the average at the snapshot of step N, from the snapshots up to it (default: the "
                        "last snapshot)")
    s.set_defaults(func=run)


def run(args) -> int:
    out = Path(args.out)
    if out.resolve() == Path(args.run).resolve() or (out / "metrics.csv").exists():
        raise DiffloError(f"--out {out} is a training run; give a folder of its own (e.g. {args.run}/ema-"
                          f"{args.sigma_rel:.3f})")
    res = posthoc_ema.reconstruct(args.run, args.sigma_rel, args.max_error, args.step)
    check_writable(out, "--out folder", "choose another --out")
    info = {"sigma_rel": args.sigma_rel, "snapshots": res["snapshots"], "profile_error": res["error"],
            "coefficients": [float(c) for c in res["coefficients"]]}
    path = checkpoint.save_checkpoint(out, res["step"], res["config"], res["state"], res["state"],
                                      {"step": res["step"], "posthoc_ema": info}, keep=1)
    print(f"wrote {path}: the EMA with sigma_rel {args.sigma_rel:g} at step {res['step']} from {res['snapshots']} "
          f"snapshots (averaging profile off by {res['error']:.2%}); sample with difflo sample --ckpt {out}")
    return 0
