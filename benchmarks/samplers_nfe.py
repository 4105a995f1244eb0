"""Quality vs network evaluations (NFE) of every registered sampler on one trained model (issue 19).

For each sampler that fits the model (difflo.samplers.SAMPLERS, registry order), each time grid (--grids) and
each NFE budget (--nfe), the most steps whose NFE fits the budget (Sampler.evals), N class-balanced samples with
seeds seed..seed+N-1 (the same noise for every row) at the model's own guidance w, scored by the periodic
evaluation's Judge (Frechet distance in the data set's classifier features, fd_classifier, and class accuracy).
NFE is counted by wrapping the network (experiments.common.measure), per image, one guided batch = one call.
Writes OUT/report.md (the noise floor, a long table and a sampler x NFE table of the metric), results.json and
one CSV per table, then prints report.md.

    python benchmarks/samplers_nfe.py --ckpt demo --n 500 --out runs/samplers-nfe/demo
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from difflo.eval.periodic import Judge
from difflo.experiments.common import Report, measure, short
from difflo.model import load_model, pick_device
from difflo.samplers import SAMPLERS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="any --ckpt difflo sample takes (demo, a run directory, ...)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--n", type=int, default=500, help="samples per row (default 500)")
    p.add_argument("--nfe", default="5,8,10,15,20,50", help="NFE budgets (default 5,8,10,15,20,50)")
    p.add_argument("--grids", default="trailing", help="time grids, e.g. trailing,karras (default trailing)")
    p.add_argument("--samplers", help="comma-separated names (default: every registered sampler that fits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    t0 = time.time()
    device = pick_device(a.device)
    model = load_model(a.ckpt, device=device)
    cfg, path = model.cfg, model.path
    asked = a.samplers.split(",") if a.samplers else list(path.samplers)
    unknown = [n for n in asked if n not in SAMPLERS]
    if unknown:
        p.error(f"--samplers: unknown {', '.join(unknown)}; choose from {', '.join(SAMPLERS)}")
    names = [n for n in asked if n in path.samplers]
    if len(names) < len(asked):
        print(f"skipping {', '.join(n for n in asked if n not in names)}: they do not fit this "
              f"{cfg.diffusion.objective} model")
    grids = [g for g in a.grids.split(",") if g in path.spacings]
    budgets = [int(v) for v in a.nfe.split(",")]
    out = Path(a.out)
    rep = Report(out, "samplers_nfe", f"Samplers: quality vs NFE ({a.ckpt})")
    rep.text(f"**What was run**: `--ckpt {a.ckpt}` ({cfg.data.name}, {cfg.diffusion.objective}, "
             f"{cfg.diffusion.schedule}, {cfg.diffusion.prediction}-prediction), N = {a.n} class-balanced samples per "
             f"row with seeds {a.seed}..{a.seed + a.n - 1}, w = {cfg.sample.w:g}, grids {', '.join(grids)}, "
             f"samplers {', '.join(names)}.")
    judge = Judge(cfg, out, device, print)
    rep.noise_floor(judge, cfg, a.n, seed=a.seed)
    rows = []
    for name in names:
        entry = SAMPLERS[name]
        for grid in grids:
            for budget in budgets:
                steps = max((k for k in range(1, budget + 1) if entry.evals(k) <= budget), default=0)
                if steps == 0:
                    continue
                res = measure(model, judge, a.n, a.seed, a.batch_size, sampler=name, steps=steps, spacing=grid)
                row = {"sampler": name, "grid": grid, "budget": budget, "steps": steps, **short(res, judge.metric),
                       "ms_per_image": 1000 * res["seconds"] / a.n}
                rows.append(row)
                print(f"{name} {grid} NFE {row['nfe']:.0f} ({steps} steps): {judge.metric} {row[judge.metric]:.2f}, "
                      f"accuracy {row['class_accuracy']:.3f}, {res['seconds']:.0f} s", flush=True)
    m = judge.metric
    pivot = []
    for name in names:
        for grid in grids:
            cells = {f"nfe{r['budget']}": r[m] for r in rows if r["sampler"] == name and r["grid"] == grid}
            if cells:
                pivot.append({"sampler": name, "grid": grid, **cells})
    rep.table("by_nfe", pivot, [("sampler", "sampler", ""), ("grid", "grid", "")]
              + [(f"nfe{b}", f"NFE {b}", ".2f") for b in budgets],
              f"{m} (lower is better) at each NFE budget, N = {a.n}")
    rep.table("rows", rows, [("sampler", "sampler", ""), ("grid", "grid", ""), ("steps", "steps", ""),
                             ("nfe", "NFE", ".0f"), (m, m, ".2f"), ("class_accuracy", "class accuracy", ".3f"),
                             ("ms_per_image", "ms / image", ".1f")],
              f"every row: N = {a.n}, the same seeds; NFE counted per image")
    print(rep.write(time.time() - t0).read_text())


if __name__ == "__main__":
    main()
