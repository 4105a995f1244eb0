"""benchmarks/run.py --quick: the smoke run writes every field of the report (no timing is asserted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_benchmark_writes_the_report(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "difflo vs diffusers UNet2DModel" in proc.stdout and f"wrote {out}" in proc.stdout
    r = json.loads(out.read_text())

    assert r["quick"] is True and {"date", "machine", "settings", "targets", "limits", "sampling"} <= r.keys()
    assert {"cpu", "cpu_flags", "torch", "diffusers", "torch_threads", "device", "env", "malloc",
            "difflo_auto_precision"} <= r["machine"].keys()
    lim = r["limits"]
    assert lim["fp32_matmul"] > 0 and lim["channels_last_conv"] > 0 and lim["limit"] == max(
        v for k, v in lim.items() if k != "limit")
    bf16 = bool({"avx512_bf16", "amx_bf16"} & set(r["machine"]["cpu_flags"]))
    assert ("bf16_matmul" in lim) == bf16
    precs = ["fp32", "bf16"] if bf16 else ["fp32"]
    names = {f"{n}@{p}" for n in ("difflo", "diffusers") for p in precs}
    # matched size: the same parameter count and the same counted FLOPs per image
    d, h = r["models"]["difflo"], r["models"]["diffusers"]
    assert d["params"] == h["params"] > 0
    assert d["train_gflop_per_image"] == pytest.approx(h["train_gflop_per_image"], rel=1e-9)
    assert d["infer_gflop_per_image"] == pytest.approx(h["infer_gflop_per_image"], rel=1e-9)
    assert d["train_gflop_per_image"] > 2 * d["infer_gflop_per_image"] > 0

    [row] = r["throughput"]
    assert row["batch"] == r["settings"]["batch_sizes"][0]
    for kind in ("train", "infer"):
        for key in ("img_s", "gflops", "peak_fraction"):
            assert set(row[f"{kind}_{key}"]) == names
            assert all(v > 0 for v in row[f"{kind}_{key}"].values())
        assert all(len(v) == r["settings"]["repeats"] for v in row[f"{kind}_img_s_repeats"].values())
        ips, ratios = row[f"{kind}_img_s"], row[f"{kind}_ratios"]
        assert list(ratios) == r["ratio_names"] and len(ratios) == 1 + len(precs)
        for p in precs:
            assert ratios[f"same ({p})"] == pytest.approx(ips[f"difflo@{p}"] / ips[f"diffusers@{p}"])
    sv = r["sampling"]
    assert sv["train_img_s"] > 0 and sv["sample_evals_s"] > 0
    assert sv["ratio"] == pytest.approx(sv["sample_evals_s"] / sv["train_img_s"])

    assert {m["model"] for m in r["memory"]} == {"difflo", "diffusers"}
    for m in r["memory"]:
        assert 0 < m["baseline_rss_mb"] <= m["sample_peak_rss_mb"] and m["baseline_rss_mb"] <= m["train_peak_rss_mb"]

    # the grid: DDPM, DDIM, DPM-Solver++; guidance is one batched network call (2 x images) per step
    assert [g["sampler"] for g in r["grid"]] == ["ddpm", "ddim", "dpmpp"]
    for g in r["grid"]:
        assert g["wall_s"] > 0 and g["network_calls"] == g["steps"] and g["calls_per_step"] == 1
        assert g["batch_per_call"] == [2 * g["images"]]
