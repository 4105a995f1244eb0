"""benchmarks/run.py --quick: the smoke run writes every field of the report (no timing is asserted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_the_report(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "difflo vs diffusers UNet2DModel" in proc.stdout and f"wrote {out}" in proc.stdout
    r = json.loads(out.read_text())

    assert r["quick"] is True and {"date", "machine", "settings", "targets", "matmul_peak_gflops"} <= r.keys()
    assert {"cpu", "torch", "diffusers", "torch_threads", "device"} <= r["machine"].keys()
    assert r["matmul_peak_gflops"] > 0
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
            assert set(row[f"{kind}_{key}"]) == {"difflo", "diffusers"}
            assert all(v > 0 for v in row[f"{kind}_{key}"].values())
        assert all(len(v) == r["settings"]["repeats"] for v in row[f"{kind}_img_s_repeats"].values())
        assert row[f"{kind}_ratio"] == pytest.approx(row[f"{kind}_img_s"]["difflo"] / row[f"{kind}_img_s"]["diffusers"])

    assert {m["model"] for m in r["memory"]} == {"difflo", "diffusers"}
    for m in r["memory"]:
        assert 0 < m["baseline_rss_mb"] <= m["sample_peak_rss_mb"] and m["baseline_rss_mb"] <= m["train_peak_rss_mb"]

    # the grid: DDPM, DDIM, DPM-Solver++; guidance is one batched network call (2 x images) per step
    assert [g["sampler"] for g in r["grid"]] == ["ddpm", "ddim", "dpmpp"]
    for g in r["grid"]:
        assert g["wall_s"] > 0 and g["network_calls"] == g["steps"] and g["calls_per_step"] == 1
        assert g["batch_per_call"] == [2 * g["images"]]
