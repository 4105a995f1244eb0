"""Mixed precision is refused on CPU with a one-line reason; train.compile / sample --compile run."""
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from difflo import checkpoint, precision
from difflo.cli import main
from difflo.errors import ConfigError, DiffloError
from difflo.train import train
from conftest import tiny_config

quiet = dict(log=lambda *a: None, progress=False)


@pytest.mark.parametrize("prec", ["bf16", "fp16"])
def test_reduced_precision_is_refused_on_cpu(prec, tmp_path, capsys):
    with pytest.raises(DiffloError, match=f"train.precision={prec} is for CUDA GPUs.*slower than fp32"):
        train(tiny_config("train.steps=1", f"train.precision={prec}", "train.device=cpu"), tmp_path / "r", **quiet)
    assert not (tmp_path / "r").exists()                   # refused before anything is written
    code = main(["train", f"train.precision={prec}", "train.device=cpu", "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"difflo: error: train.precision={prec} is for CUDA GPUs")


def test_precision_values_are_validated():
    with pytest.raises(ConfigError, match="train.precision='fp8' is not one of fp32, bf16, fp16"):
        tiny_config("train.precision=fp8").validate()
    precision.check("fp32", torch.device("cpu"))           # the default is fine everywhere
    assert not precision.grad_scaler("fp32", torch.device("cpu")).is_enabled()


def test_autocast_is_a_no_op_for_fp32():
    with precision.autocast("fp32", torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with dynamo's 'eager' backend: graph capture without Inductor's C++ code generation,
    which takes ~2 minutes for one tiny training step on this project's loaded 2-core machine (measured 129 s)."""
    real = torch.compile
    calls = []

    def compile_eager(model, **kwargs):
        calls.append(model)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eager)
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()


def test_train_compile_runs_and_checkpoints_the_plain_module(eager_compile, tmp_path):
    over = ("train.steps=2", "train.device=cpu", "train.ckpt_every=2")
    train(tiny_config(*over, "train.compile=true"), tmp_path / "c", **quiet)
    train(tiny_config(*over), tmp_path / "p", **quiet)
    assert len(eager_compile) == 1
    a = load_file(str(checkpoint.list_checkpoints(tmp_path / "c")[-1] / "model.safetensors"))
    b = load_file(str(checkpoint.list_checkpoints(tmp_path / "p")[-1] / "model.safetensors"))
    assert a.keys() == b.keys() and not any(k.startswith("_orig_mod") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_sample_compile(eager_compile, tiny_run, tmp_path, capsys):
    for flag in ([], ["--compile"]):
        assert main(["sample", "--ckpt", str(tiny_run), "--n", "2", "--steps", "2", "--device", "cpu", *flag,
                     "--out", str(tmp_path / f"s{len(flag)}.npz")]) == 0
    assert len(eager_compile) == 1
    np.testing.assert_array_equal(np.load(tmp_path / "s0.npz")["images"], np.load(tmp_path / "s1.npz")["images"])


@pytest.mark.skipif(not os.environ.get("DIFFLO_SLOW_TESTS"),
                    reason="Inductor compiles one tiny training step in ~2 minutes on 2 CPU cores; "
                           "set DIFFLO_SLOW_TESTS=1 to run it")
@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
                    reason="torch.compile on CPU needs a C++ compiler (g++ or clang++)")
def test_train_compile_with_inductor(tmp_path):
    torch._dynamo.reset()
    train(tiny_config("train.steps=1", "train.device=cpu", "train.compile=true", "model.channel_mult=[1]",
                      "model.attn_resolutions=[]"), tmp_path / "r", **quiet)
    assert checkpoint.list_checkpoints(tmp_path / "r")


def test_fp16_loop_with_grad_scaler_resumes(monkeypatch, tmp_path):
    """The fp16 path (autocast + GradScaler, its state in the checkpoint) exercised on CPU, where it is
    normally refused (the check is lifted here): it trains, saves the scaler, and resumes exactly."""
    monkeypatch.setattr(precision, "check", lambda *a: None)
    over = ("train.device=cpu", "train.precision=fp16", "train.ckpt_every=2", "model.channel_mult=[1]",
            "model.attn_resolutions=[]")
    train(tiny_config(*over, "train.steps=4"), tmp_path / "full", **quiet)
    train(tiny_config(*over, "train.steps=2"), tmp_path / "part", **quiet)
    state = checkpoint.load_train_state(checkpoint.list_checkpoints(tmp_path / "part")[-1])
    assert state["scaler"]["scale"] > 0
    train(tiny_config(*over, "train.steps=4"), tmp_path / "part", resume=True, **quiet)
    a = load_file(str(checkpoint.list_checkpoints(tmp_path / "full")[-1] / "model.safetensors"))
    b = load_file(str(checkpoint.list_checkpoints(tmp_path / "part")[-1] / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in a.values())
