"""The CUDA paths (run by benchmarks/gpu.sh on a lent GPU; skipped without one): bf16 and fp16 autocast
training follows fp32, auto picks bf16 where the GPU supports it, compile and sampling at fp32 and auto, and
NCCL data-parallel through torchrun with one process."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, tiny_config
from difflo import checkpoint, precision
from difflo.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
ROOT = Path(__file__).resolve().parents[2]
quiet = dict(log=lambda *a: None, progress=False)


def losses(run):
    return [float(r["loss"]) for r in csv.DictReader(open(run / "metrics.csv")) if r["loss"]]


def test_auto_is_bf16_where_the_gpu_supports_it():
    p = precision.resolve("auto", torch.device("cuda"))
    assert p.used == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")


@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_reduced_precision_training_follows_fp32(prec, tmp_path):
    over = ("train.steps=60", "train.device=cuda", "train.lr=3e-3", "train.log_every=10")
    train(tiny_config(*over, "train.precision=fp32"), tmp_path / "fp32", **quiet)
    train(tiny_config(*over, f"train.precision={prec}"), tmp_path / prec, **quiet)
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / prec)
    assert all(abs(x - y) <= 0.02 * x for x, y in zip(a, b)), (a, b)


def test_compile_and_sample_on_cuda(tmp_path):
    from difflo.model import load_model
    from difflo.generate import generate, settings_for
    ckpt = train(tiny_config("train.steps=2", "train.device=cuda", "train.compile=true"), tmp_path / "r", **quiet)
    model = load_model(ckpt, device="cuda")
    for p in ("fp32", "auto"):
        x = generate(model, torch.arange(4), range(4), settings_for(model, steps=3, precision=p))
        assert x.shape == (4, 1, 28, 28) and torch.isfinite(x).all()


def test_nccl_data_parallel_with_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "difflo", "train", *TINY,
           "train.steps=2", "train.ckpt_every=2", "train.device=cuda", "--out", str(tmp_path / "run")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert checkpoint.list_checkpoints(tmp_path / "run")
