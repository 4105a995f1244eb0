"""The denoiser study's files: digit grids, tables, the lr figure, results.json and summary.md.

Everything here writes through :mod:`difflo.io` (a temporary file renamed onto the name), so a
killed study never leaves half a figure. :func:`summary_markdown` is a function of the results dict
alone (the content of ``results.json``): every number in ``summary.md`` comes from it.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from ..images import grid_image, save_image, to_uint8
from ..io import atomic_path, pyplot, write_text_atomic


def save_rows(rows: list[tuple[str, torch.Tensor]], path: Path) -> None:
    """A labelled grid, one row per (label, (N, 1, H, W) images in [0, 1]); every row as long as the
    first, except the last, which may be shorter."""
    images = torch.cat([x for _, x in rows]).clamp(0, 1) * 2 - 1              # to difflo's [-1, 1]
    save_image(grid_image(to_uint8(images), len(rows[0][1]), [label for label, _ in rows]), path)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def plot_lr_runs(runs: dict[str, dict], path: Path) -> None:
    """Loss and learning-rate curves of the flow runs side by side; ``runs[schedule]["metrics"]``
    holds the columns step, loss, lr."""
    plt = pyplot()
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for schedule, r in runs.items():
        ax_loss.plot(r["metrics"]["step"], r["metrics"]["loss"], lw=1.4, label=f"{schedule} lr")
        ax_lr.plot(r["metrics"]["step"], r["metrics"]["lr"], lw=1.4, label=f"{schedule} lr")
    ax_loss.set(xlabel="step", ylabel="flow-matching loss (logged mean)", yscale="log",
                title="class-conditional flow model, AdamW")
    ax_lr.set(xlabel="step", ylabel="learning rate", yscale="log", title="learning rate")
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def fmt(v: float) -> str:
    """A number in the summary: 4 significant digits."""
    return f"{v:.4g}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def summary_markdown(r: dict) -> str:
    """The summary; every number comes from ``r`` (the results.json dict, its options included)."""
    o, t = r["options"], r["timing_s"]
    lines = ["# Single-step denoiser study", "",
             f"Command: `{r['command']}`", "",
             f"Seed {o['seed']}; wall time {t['total']:.0f} s ("
             + ", ".join(f"{p} {t[p]:.0f} s" for p in o["parts"]) + f") on {r['device']} "
             f"with {r['torch_threads']} torch threads. Data: mnist10k, {r['train_digits']} training digits, "
             f"{r['test_digits']} test digits for the MSE tables. Pixel range **[0, 1]** (sigma relative to "
             f"it, z = x + sigma eps, not clipped); every MSE is the mean over pixels and images in [0, 1] "
             f"units. Figures show the first test digit of each class.", ""]
    if "strip" in r:
        lines += ["## Noising strip", "", "![noising strip](noising_strip.png)", "",
                  "Rows: z = x + sigma eps for sigma = " + ", ".join(f"{s:g}" for s in r["strip"]["sigmas"])
                  + " (the same eps in every row).", ""]
    if "train" in r:
        lines += train_section(o, r["train"])
    if "ood" in r:
        lines += ood_section(o, r["ood"])
    if "noise" in r:
        lines += noise_section(o, r["noise"])
    if "lr" in r:
        lines += lr_section(o, r["lr"])
    return "\n".join(lines)


def train_section(o: dict, tr: dict) -> list[str]:
    lines = [f"## Training at sigma = {tr['sigma']:g}", "",
             f"UNet with hidden width D = {o['hidden']} ({tr['parameters']:,} parameters), Adam lr {o['lr']:g}, "
             f"batch {o['batch_size']}, {plural(o['epochs'], 'epoch')} ({tr['steps']} steps), L2 loss.", "",
             "![training loss](train_loss.png)", "",
             "| epoch | mean training loss |", "|---|---|"]
    lines += [f"| {e + 1} | {fmt(v)} |" for e, v in enumerate(tr["epoch_mean_loss"])]
    last = (f", after epoch {o['epochs']} {fmt(tr['test_mse_last'])} ("
            + ("lower" if tr["test_mse_last"] < tr["test_mse_epoch1"] else "not lower") + " than after epoch 1)"
            if o["epochs"] > 1 else "")
    return lines + ["", f"Test MSE at sigma {tr['sigma']:g}: noisy input {fmt(tr['test_mse_noisy_input'])}, "
                    f"denoised after epoch 1 {fmt(tr['test_mse_epoch1'])}{last}.", "",
                    "![denoised after epoch 1](denoised_epoch1.png)", "",
                    f"![denoised after epoch {o['epochs']}](denoised_last.png)", "",
                    "Rows: clean test digits, noisy input, denoised output.", ""]


def ood_section(o: dict, table: list[dict]) -> list[str]:
    best = min(table, key=lambda row: row["mse_denoised"])
    trained = next((row for row in table if row["sigma"] == o["train_sigma"]), None)
    lines = [f"## Out of distribution: the sigma = {o['train_sigma']:g} model at every sigma", "",
             "![out of distribution](ood.png)", "",
             "| sigma | MSE noisy input | MSE denoised |", "|---|---|---|"]
    lines += [f"| {row['sigma']:g} | {fmt(row['mse_noisy'])} | {fmt(row['mse_denoised'])} |" for row in table]
    top = table[-1]
    helped = [f"{row['sigma']:g}" for row in table if row["mse_denoised"] < row["mse_noisy"]]
    return lines + ["", f"(also in `ood_mse.csv`). The denoised MSE is lowest at sigma {best['sigma']:g} "
                    f"({fmt(best['mse_denoised'])})"
                    + (f"; at the training sigma it is {fmt(trained['mse_denoised'])}" if trained else "")
                    + f"; at sigma {top['sigma']:g} it is {fmt(top['mse_denoised'])}, "
                    + f"{top['mse_denoised'] / best['mse_denoised']:.1f}x the lowest. The output is closer to the "
                    f"clean digit than the input was at sigma " + (", ".join(helped) or "none") + ". Rows of the "
                    f"figure: noisy input and denoised output for each sigma.", ""]


def noise_section(o: dict, nz: dict) -> list[str]:
    return ["## Denoising pure noise", "", "![pure noise](pure_noise.png)", "",
            f"A fresh UNet (D = {o['hidden']}) trained {plural(o['noise_epochs'], 'epoch')} ({nz['steps']} steps) "
            f"to map "
            f"z ~ N(0, I) to a training digit. z says nothing about x, so the L2-optimal output is E[x], "
            f"the per-pixel mean of the training set (bottom row). On {nz['samples']} fresh noise inputs:", "",
            f"- MSE between the outputs and the training-set mean: **{fmt(nz['mse_to_train_mean'])}** "
            f"(MSE between the average output and the mean: {fmt(nz['mse_output_average_to_train_mean'])}; "
            f"per-pixel standard deviation of the outputs across inputs: "
            f"{fmt(nz['output_std_across_noise'])});",
            f"- for scale, the MSE between a test digit and the mean (about the smallest loss a pure-noise "
            f"denoiser can reach) is {fmt(nz['mse_test_to_train_mean'])}; the model's mean training loss in "
            f"its last epoch was {fmt(nz['last_epoch_mean_loss'])}.", "",
            f"The outputs are {nz['mse_test_to_train_mean'] / max(nz['mse_to_train_mean'], 1e-12):.1f}x "
            f"closer (in MSE) to the training mean than test digits are.", ""]


def lr_section(o: dict, lr: dict) -> list[str]:
    runs = lr["runs"]
    c = next(iter(runs.values()))["config"]
    lines = ["## Learning rate: exponential decay vs constant (flow model, AdamW)", "",
             "![lr comparison](lr_comparison.png)", "",
             f"The class-conditional flow model of `{lr['config']}` trained {o['flow_steps']} steps per "
             f"run by difflo.train (AdamW, weight decay {c['weight_decay']:g}, batch {c['batch_size']}, "
             f"lr {c['lr']:g} after {c['warmup_steps']} warmup steps; exponential: decays to lr x "
             f"{c['min_lr_ratio']:g} at the last step)"
             + (f", overrides {', '.join(lr['overrides'])}" if lr["overrides"] else "")
             + ". Both runs see the same batches and noise (same seed). Run directories: "
             + ", ".join(f"`{v['run_dir']}/`" for v in runs.values()) + ".", "",
             "| lr schedule | lr at first / last log | final logged loss | mean loss, last 10% of steps |",
             "|---|---|---|---|"]
    lines += [f"| {s} | {v['lr_first']:.3g} / {v['lr_last']:.3g} | {fmt(v['final_loss'])} | "
              f"{fmt(v['loss_last_10pct'])} |" for s, v in runs.items()]
    (a, ra), (b, rb) = runs.items()
    diff = rb["loss_last_10pct"] - ra["loss_last_10pct"]
    return lines + ["", f"Over the last 10% of steps the {b} schedule's mean loss minus the {a} schedule's: "
                    f"{diff:+.4f} ({100 * diff / ra['loss_last_10pct']:+.1f}%).", ""]


def write_results(out: Path, r: dict) -> None:
    """``results.json`` (the raw numbers) and ``summary.md`` (made from them) into ``out``."""
    write_text_atomic(out / "results.json", json.dumps(r, indent=1) + "\n")
    write_text_atomic(out / "summary.md", summary_markdown(r))
