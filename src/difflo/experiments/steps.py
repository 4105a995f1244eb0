"""``difflo experiment steps``: quality vs number of network evaluations (NFE) and wall time.

One trained diffusion model sampled with DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) at
its T steps, DDIM (Song et al. 2021, Eq. 12) at several step counts with eta = 0 (deterministic)
and eta = 1 (DDPM-like noise), DPM-Solver++(2M) (Lu et al. 2022), and every other registered sampler
that fits it (:data:`difflo.samplers.SAMPLERS`: Euler ancestral, DPM-Solver++(2M) SDE, DPM-Solver++(3M))
at ``OTHER_STEPS``; one flow model (the same config with the rectified-flow objective) sampled with
Euler and Heun (Karras et al. 2022, Algorithm 1). NFE counts network calls per image; a guided step is
one batched call of 2B. The same seeds for every setting.

``opts.extra`` may narrow or widen this: ``samplers`` (names: only these, on whichever model they fit,
each at its own step list), ``other_steps`` (the step counts of samplers without their own list),
``spacing`` (the time grid of every setting, e.g. ``karras``).
"""
from __future__ import annotations

import copy
import time

import numpy as np

from ..io import pyplot
from ..noise_paths import samplers_for
from .common import Options, Report, base_config, class_caption, firsts, judge_for, measure, short, shown_classes, trained

DDIM_STEPS = (10, 20, 50, 100, 200)
DPMPP_STEPS = (10, 15, 20)
FLOW_STEPS = {"euler": (5, 10, 20, 50), "heun": (5, 10, 20)}
OTHER_STEPS = (10,)            # every other registered sampler of the diffusion model (cheap: 10 NFE each)


def flow_config(cfg):
    """The same model and training with the rectified-flow objective (configs/mnist10k-flow.yaml)."""
    f = copy.deepcopy(cfg)
    f.diffusion.objective, f.diffusion.prediction, f.diffusion.t_sampling = "flow", "u", "logit_normal"
    f.sample.sampler = "euler"
    return f


def settings(opts: Options, T: int) -> list[tuple[str, dict]]:
    """(model, settings) pairs: the samplers with their own step lists first, then every other registered
    sampler (registry order) at ``other_steps``: by default on the diffusion model only, with
    ``extra["samplers"]`` on every model it fits."""
    x = opts.extra
    ddim = x.get("ddim_steps", DDIM_STEPS)
    own = [("diffusion", {"sampler": "ddpm", "steps": x.get("ddpm_steps", T)})]
    own += [("diffusion", {"sampler": "ddim", "steps": k, "eta": eta}) for eta in x.get("ddim_etas", (0.0, 1.0)) for k in ddim]
    own += [("diffusion", {"sampler": "dpmpp", "steps": k}) for k in x.get("dpmpp_steps", DPMPP_STEPS)]
    own += [("flow", {"sampler": s, "steps": k}) for s, ks in x.get("flow_steps", FLOW_STEPS).items() for k in ks]
    listed = {(kind, s["sampler"]) for kind, s in own}
    chosen = x.get("samplers")
    kinds = ("diffusion",) if chosen is None else ("diffusion", "flow")
    others = [(kind, {"sampler": name, "steps": k}) for kind in kinds for name in samplers_for(kind)
              if (kind, name) not in listed for k in x.get("other_steps", OTHER_STEPS)]
    out = [(kind, s) for kind, s in own + others if chosen is None or s["sampler"] in chosen]
    if x.get("no_flow"):
        out = [(kind, s) for kind, s in out if kind != "flow"]
    if x.get("spacing"):      # the diffusion model's grid (the flow model's is uniform in t)
        out = [(kind, {**s, "spacing": x["spacing"]} if kind == "diffusion" else s) for kind, s in out]
    return out


def family(s: dict) -> str:
    name = f"ddim eta={s.get('eta', 0.0):g}" if s["sampler"] == "ddim" else s["sampler"]
    return f"{name} ({s['spacing']})" if "spacing" in s else name


def run(opts: Options, log=print):
    t0 = time.time()
    cfg = base_config(opts)
    w = cfg.sample.w
    rep = Report(opts.out, "steps", "Sampler steps: quality vs network evaluations and wall time")
    todo = settings(opts, cfg.diffusion.timesteps)
    rep.setup(opts, cfg, w=w, settings=len(todo),
              flow_model="the same config with objective=flow, prediction=u, logit-normal t")
    judge = judge_for(opts, cfg, log)
    rep.noise_floor(judge, cfg, opts.n, seed=opts.seed)
    models = {"diffusion": trained(opts, cfg, "base", log).model()}
    if any(kind == "flow" for kind, _ in todo):
        models["flow"] = trained(opts, flow_config(cfg), "flow", log).model()
    rows, grids = [], []
    shown = shown_classes(min(models["diffusion"].num_classes, opts.n))   # classes the n samples include
    for kind, s in todo:
        res = measure(models[kind], judge, opts.n, opts.seed, w=w, **s)
        row = {"model": kind, "sampler": family(s), "steps": s["steps"], **short(res, judge.metric)}
        row["ms_per_image"] = 1000 * res["seconds"] / opts.n
        rows.append(row)
        grids.append((f"{row['sampler']} {s['steps']}", firsts(res, shown)))   # one sample of each shown class
        log(f"steps: {kind} {row['sampler']} {s['steps']}: NFE {row['nfe']:.0f}, {judge.metric} "
            f"{row[judge.metric]:.2f}, accuracy {row['class_accuracy']:.3f}, {res['seconds']:.0f} s")
    P = pyplot()
    fig, ax = P.subplots(1, 2, figsize=(10, 3.8))
    for fam in dict.fromkeys(r["sampler"] for r in rows):
        pts = sorted((r for r in rows if r["sampler"] == fam), key=lambda r: r["nfe"])
        style = "s--" if pts[0]["model"] == "flow" else "o-"
        ax[0].plot([p["nfe"] for p in pts], [p[judge.metric] for p in pts], style, label=fam)
        ax[1].plot([p["nfe"] for p in pts], [p["class_accuracy"] for p in pts], style, label=fam)
    ax[0].set(xscale="log", yscale="log", xlabel="network evaluations per image (NFE)", ylabel=judge.metric,
              title=f"{judge.metric} (lower is better)")
    ax[1].set(xscale="log", xlabel="network evaluations per image (NFE)", ylabel="class accuracy",
              title="class accuracy")
    rep.save_plot(fig, ax, "nfe.png")
    rep.figure("nfe.png", f"quality vs NFE (N = {opts.n} each, w = {w}); dashed: the flow model")
    rep.table("steps", rows, [("model", "model", ""), ("sampler", "sampler", ""), ("steps", "steps", ""),
                              ("nfe", "NFE", ".0f"), (judge.metric, judge.metric, ".2f"),
                              ("class_accuracy", "class accuracy", ".3f"), ("ms_per_image", "ms / image", ".1f")],
              f"N = {opts.n} samples per row, the same seeds; wall time on this machine for the whole row "
              f"(batches of 250, guidance batched)")
    rep.save_grid("grids.png", np.concatenate([g for _, g in grids]), len(shown), [name for name, _ in grids])
    rep.figure("grids.png", f"one sample of each of {class_caption(models['diffusion'], shown)} (columns) per "
                            f"setting (rows), the same seeds")
    rep.text(conclusion(rows, judge.metric))
    return rep.write(time.time() - t0)


def conclusion(rows: list[dict], metric: str) -> str:
    diff = [r for r in rows if r["model"] == "diffusion"]
    ddim = sorted((r for r in diff if r["sampler"] == "ddim eta=0"), key=lambda r: (r["steps"] != 50, -r["steps"]))
    if not ddim:
        return ""
    ref = ddim[0]                                   # DDIM-50, or the most steps measured
    tol = 1.1 * ref[metric]
    matching = sorted((r for r in diff if r[metric] <= tol), key=lambda r: r["nfe"])
    cheapest = matching[0]
    text = (f"**Result.** DDIM-{ref['steps']} (eta 0) reaches {metric} {ref[metric]:.2f} and accuracy "
            f"{ref['class_accuracy']:.3f} at {ref['nfe']:.0f} NFE; the cheapest setting within 10% of its {metric} is "
            f"{cheapest['sampler']} {cheapest['steps']} steps ({cheapest['nfe']:.0f} NFE, {metric} "
            f"{cheapest[metric]:.2f}, accuracy {cheapest['class_accuracy']:.3f}).")
    ddpm = next((r for r in diff if r["sampler"] == "ddpm"), None)
    if ddpm:
        text += (f" DDPM at {ddpm['steps']} steps: {metric} {ddpm[metric]:.2f}, accuracy "
                 f"{ddpm['class_accuracy']:.3f}, {ddpm['ms_per_image'] / ref['ms_per_image']:.0f}x DDIM-{ref['steps']}'s time.")
    return text
