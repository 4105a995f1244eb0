"""Quality against network calls per image for a distilled student and its teacher (issue 28): reads the
``difflo eval model --json`` files that benchmarks/distill_demo.sh and distill_sweep.sh write, prints a markdown table
(FID with its ratio to the floor, class accuracy, KID, precision/recall) and plots FID against calls per image.

Calls per image: the sampler's network evaluations for its steps (``Sampler.evals``), twice where classifier-free
guidance runs (w != 1: the conditional and unconditional branches are two calls of the network, one batch), once
for a student that takes w as its input (``guidance_input``).

    python benchmarks/distill_plot.py runs/distill-demo --floor 8.93 --teacher TEACHER_RUN \
        --out docs/distill-demo/fid_vs_nfe.png
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from difflo.io import pyplot
from difflo.samplers import SAMPLERS


def calls(r: dict) -> int:
    """Network calls per image: the sampler's evaluations, twice where classifier-free guidance runs two branches
    (w != 1), once for a student that takes w as its input (``guidance_input`` in the eval JSON)."""
    return SAMPLERS[r["sampler"]].evals(r["steps"]) * (2 if r["w"] != 1.0 and not r.get("guidance_input") else 1)


def series(r: dict) -> str:
    """The teacher per sampler; a student per distillation (its rounds' students are one line, and so are the
    students of students that benchmarks/distill_steps.sh names student4, student2, student1)."""
    if r["who"] == "teacher":
        return f"teacher, {r['sampler']}"
    return f"student ({re.sub(r'(?<=student)[0-9]+$', '', Path(r['ckpt'].split('/students/')[0]).name)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="the folder of eval JSON files")
    p.add_argument("--floor", type=float, required=True, help="the real-vs-real FID at the same N")
    p.add_argument("--teacher", required=True,
                   help="the teacher's --ckpt as the JSONs record it (its rows say teacher, every other row student)")
    p.add_argument("--out", help="the plot (PNG)")
    a = p.parse_args()
    rows = []
    for f in sorted(Path(a.folder).glob("*.json")):
        r = json.loads(f.read_text())
        if "fid" not in r:
            continue
        rows.append({**r, "name": f.stem, "calls": calls(r), "who": "teacher" if r["ckpt"] == a.teacher else "student"})
    if not rows or len({r["n"] for r in rows}) > 1 or not any(r["who"] == "teacher" for r in rows):
        raise SystemExit(f"{a.folder}: needs eval JSONs of one N with at least one of --teacher {a.teacher} "
                         f"(found N = {sorted({r['n'] for r in rows})}, {len(rows)} rows)")
    rows.sort(key=lambda r: (r["who"] != "teacher", r["calls"], r["fid"]))
    print(f"| run | model and sampler | calls per image | Inception FID (N = {rows[0]['n']}) | x floor | class acc "
          f"| KID | precision / recall |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['who']}, {r['sampler']} {r['steps']} steps, w = {r['w']:g} | {r['calls']} | "
              f"{r['fid']:.2f} | {r['fid'] / a.floor:.2f} | {100 * r['class_accuracy']:.1f} % | {r['kid']:.4f} | "
              f"{r['prc_precision']:.2f} / {r['prc_recall']:.2f} |")
    if a.out:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for key in dict.fromkeys(series(r) for r in rows):
            pts = sorted((r["calls"], r["fid"]) for r in rows if series(r) == key)
            ax.plot(*zip(*pts), marker="o" if key.startswith("teacher") else "s", label=key)
        ax.axhline(a.floor, color="gray", ls=":", label=f"floor (real vs real) {a.floor:.2f}")
        ax.set(xscale="log", yscale="log", xlabel="network calls per image",
               ylabel=f"Inception FID (N = {rows[0]['n']})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.out, dpi=110)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
