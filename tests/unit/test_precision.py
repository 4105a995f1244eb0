"""Precision: auto follows the hardware, bf16 follows fp32, fp16 is CUDA-only; train.compile / sample --compile run."""
import csv
import json
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
from conftest import assert_clean_error, run_cli, tiny_config

quiet = dict(log=lambda *a: None, progress=False)


def test_fp16_is_refused_on_cpu(tmp_path):
    with pytest.raises(DiffloError, match="train.precision=fp16 is for CUDA GPUs"):
        train(tiny_config("train.steps=1", "train.precision=fp16", "train.device=cpu"), tmp_path / "r", **quiet)
    assert not (tmp_path / "r").exists()                   # refused before anything is written
    code, _, err = run_cli("train", "train.precision=fp16", "train.device=cpu", "--out", tmp_path / "cli")
    assert assert_clean_error(code, err).startswith("difflo: error: train.precision=fp16 is for CUDA GPUs")


def test_auto_follows_the_flags_and_a_measurement(monkeypatch):
    """No bf16 flags: fp32 without measuring. bf16 flags (or none readable): bf16 only if the measured
    conv and matmul are both >= 1.15x faster (a CPU listing AVX512-BF16 measured 0.57x here)."""
    cpu = torch.device("cpu")
    monkeypatch.delenv(precision.AUTO_ENV, raising=False)         # CI forces auto for the other tests
    measured = []
    monkeypatch.setattr(precision, "bf16_ratios", lambda: measured.append(1) or ratios)
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"sse2", "avx512f"})
    ratios = {"conv": 0.3, "matmul": 0.3}
    p = precision.resolve("auto", cpu)
    assert (p.used, p.why, measured) == ("fp32", "the CPU lists no AVX512-BF16/AMX-BF16", [])
    for flags in ({"avx512_bf16"}, None):                                  # None: /proc/cpuinfo unreadable
        monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
        for ratios, used in (({"conv": 0.5, "matmul": 0.25}, "bf16"), ({"conv": 1.76, "matmul": 1.78}, "fp32"),
                             ({"conv": 0.5, "matmul": 0.95}, "fp32")):
            p = precision.resolve("auto", cpu)
            assert p.used == used and "measured" in p.why, (ratios, p)
    assert str(precision.resolve("auto", cpu)) == "fp32 (auto: bf16 measured 2x faster than fp32 in a 3x3 conv " \
                                                   "and 1.05x faster in a matmul)"
    assert precision.resolve("fp32", cpu).dtype is None and precision.resolve("bf16", cpu).dtype == torch.bfloat16


def test_measurement_is_cached_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(precision, "_cache", {})
    calls = []
    monkeypatch.setattr(precision, "measure_bf16", lambda: calls.append(1) or {"conv": 2.0, "matmul": 1.5})
    assert precision.bf16_ratios() == {"conv": 2.0, "matmul": 1.5}
    monkeypatch.setattr(precision, "_cache", {})                           # a new process: read from the file
    assert precision.bf16_ratios() == {"conv": 2.0, "matmul": 1.5} and calls == [1]
    stored = json.loads((tmp_path / "difflo" / "precision.json").read_text())
    assert list(stored.values()) == [{"conv": 2.0, "matmul": 1.5}] and "threads" in next(iter(stored))
    stored[next(iter(stored))] = {"conv": {"x": 1}, "matmul": 1.0}         # a stored entry that is not two numbers
    (tmp_path / "difflo" / "precision.json").write_text(json.dumps(stored))
    monkeypatch.setattr(precision, "_cache", {})
    assert precision.bf16_ratios() == {"conv": 2.0, "matmul": 1.5} and calls == [1, 1]    # measured again


@pytest.mark.slow
def test_the_measurement_itself():
    r = precision.measure_bf16()
    assert set(r) == {"conv", "matmul"} and all(0 < v < 1e4 for v in r.values())


@pytest.mark.slow
def test_bf16_where_it_is_slower_warns_and_runs(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "bf16_ratios", lambda: {"conv": 150.0, "matmul": 140.0})
    logs = []
    train(tiny_config("train.steps=2", "train.precision=bf16", "train.device=cpu"), tmp_path / "r",
          log=logs.append, progress=False)
    warning = [m for m in logs if m.startswith("warning:")]
    assert warning == ["warning: train.precision=bf16 does not pay on this CPU (bf16 measured 150x slower than "
                       "fp32 in a 3x3 conv and 140x slower in a matmul); it runs as asked"]
    env = json.loads((tmp_path / "r" / "environment.json").read_text())
    assert env["precision"] == {"asked": "bf16", "used": "bf16", "why": "asked"}
    assert checkpoint.list_checkpoints(tmp_path / "r")


@pytest.mark.slow
def test_bf16_training_follows_fp32(tmp_path):
    """bf16 autocast (weights, optimizer and EMA in fp32) on a tiny model: every logged loss within 1% of
    fp32's over 60 steps (measured: within 0.1%)."""
    curves = {}
    for p in ("fp32", "bf16"):
        train(tiny_config("train.steps=60", f"train.precision={p}", "train.lr=3e-3", "train.log_every=10"),
              tmp_path / p, **quiet)
        curves[p] = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / p / "metrics.csv")) if r["loss"]]
        env = json.loads((tmp_path / p / "environment.json").read_text())
        assert env["precision"]["used"] == p
    assert len(curves["fp32"]) == 6 and curves["fp32"] != curves["bf16"]        # bf16 really ran
    assert all(abs(a - b) <= 0.01 * a for a, b in zip(curves["fp32"], curves["bf16"]))
    weights = load_file(str(checkpoint.list_checkpoints(tmp_path / "bf16")[-1] / "ema.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())


@pytest.mark.slow
def test_sampling_precision(tiny_run, tmp_path):
    """--precision bf16 runs the network in bf16 (different images, same shapes); fp32 is the default of
    the tiny run; an unknown value is a usage error."""
    for p in ("fp32", "bf16"):
        code, out, err = run_cli("sample", "--ckpt", tiny_run, "--n", "2", "--steps", "2", "--precision", p,
                                 "--out", tmp_path / f"{p}.npz")
        assert code == 0 and f"precision {p}" in out, err
    a, b = (np.load(tmp_path / f"{p}.npz")["images"] for p in ("fp32", "bf16"))
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 64
    assert_clean_error(*run_cli("sample", "--ckpt", tiny_run, "--precision", "fp8", "--out", "x.npz")[::2],
                       "invalid choice")


def test_precision_values_are_validated():
    with pytest.raises(ConfigError, match="train.precision='fp8' is not one of auto, fp32, bf16, fp16"):
        tiny_config("train.precision=fp8").validate()
    with pytest.raises(ConfigError, match="sample.precision='half' is not one of auto, fp32, bf16, fp16"):
        tiny_config("sample.precision=half").validate()
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_fp16_loop_with_grad_scaler_resumes(monkeypatch, tmp_path):
    """The fp16 path (autocast + GradScaler, its state in the checkpoint) exercised on CPU, where it is
    normally refused (precision.resolve is lifted here): it trains, saves the scaler, and resumes exactly."""
    monkeypatch.setattr(precision, "resolve", lambda asked, *a, **k: precision.Precision(asked, asked, "test"))
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


def test_auto_can_be_forced_from_outside(monkeypatch):
    """DIFFLO_AUTO_PRECISION=fp32|bf16 decides auto without flags or measurement; explicit choices keep theirs."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "bf16_ratios", lambda: pytest.fail("measured although forced"))
    for forced in ("fp32", "bf16"):
        monkeypatch.setenv(precision.AUTO_ENV, forced)
        p = precision.resolve("auto", cpu)
        assert (p.used, p.why) == (forced, f"forced by DIFFLO_AUTO_PRECISION={forced}")
        assert precision.resolve("fp32", cpu).used == "fp32"
    monkeypatch.setenv(precision.AUTO_ENV, "bf17")
    with pytest.raises(DiffloError, match="DIFFLO_AUTO_PRECISION='bf17' is not one of fp32, bf16"):
        precision.resolve("auto", cpu)
    code, _, err = run_cli("env")
    assert_clean_error(code, err, "DIFFLO_AUTO_PRECISION")


def test_a_passing_load_does_not_flip_the_measurement(monkeypatch):
    """fp32 and bf16 are timed in turn, each keeping its best: a load that slows some repeats (here every
    third call of either type is 5x slower) leaves the ratio of the best times unchanged."""
    calls, clock = [], [0.0]

    def fake_fn(cost):
        def fn():
            calls.append(cost)
            clock[0] += cost * (5 if len(calls) % 3 == 0 else 1)
        return fn

    monkeypatch.setattr(precision.time, "perf_counter", lambda: clock[0])
    t32, t16 = precision.best_times([fake_fn(1.0), fake_fn(0.5)], repeats=5)
    assert (t32, t16) == (1.0, 0.5)
    assert calls[2:] == [1.0, 0.5] * 5                           # warm-ups, then alternating


def test_env_prints_the_decision_and_how_to_override(monkeypatch, tmp_path):
    monkeypatch.setenv(precision.AUTO_ENV, "bf16")
    code, out, err = run_cli("env")
    assert code == 0, err
    assert "auto -> bf16 on the CPU (forced by DIFFLO_AUTO_PRECISION=bf16)" in out
    for needle in ("threads", "allocator", "cpu ", "DIFFLO_AUTO_PRECISION=fp32|bf16", "--precision"):
        assert needle in out, needle
    monkeypatch.delenv(precision.AUTO_ENV)
    monkeypatch.setattr(precision, "_cache", {})
    monkeypatch.setattr(precision, "measure_bf16", lambda: {"conv": 0.5, "matmul": 0.25})
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16"})
    code, out, err = run_cli("env", "--json", "--remeasure")
    f = json.loads(out)
    assert f["precision_auto"]["used"] == "bf16" and f["precision_auto"]["bf16_over_fp32_time"] == {"conv": 0.5, "matmul": 0.25}
    assert f["cache"].startswith(os.environ["XDG_CACHE_HOME"])


def test_the_suite_never_touches_the_users_cache():
    """conftest points XDG_CACHE_HOME at a temporary folder before any test: every cache file lands there."""
    import conftest
    from difflo.io import cache_home
    assert os.environ["XDG_CACHE_HOME"] == conftest.CACHE
    assert str(cache_home()).startswith(conftest.CACHE) and str(precision.precision_file()).startswith(conftest.CACHE)


def test_training_layout_follows_the_precision_and_can_be_forced(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(precision.LAYOUT_ENV, raising=False)
    assert precision.training_layout("fp32", cpu)[0] == "channels_last"
    assert precision.training_layout(precision.Precision("auto", "bf16", "x"), cpu)[0] == "contiguous"
    assert precision.training_layout("fp32", torch.device("cuda"))[0] == "contiguous"
    monkeypatch.setenv(precision.LAYOUT_ENV, "contiguous")
    assert precision.training_layout("fp32", cpu) == ("contiguous", "forced by DIFFLO_LAYOUT=contiguous")
    monkeypatch.setenv(precision.LAYOUT_ENV, "nhwc")
    with pytest.raises(DiffloError, match="DIFFLO_LAYOUT='nhwc' is not one of contiguous, channels_last"):
        precision.training_layout("fp32", cpu)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_the_loop_feeds_the_network_its_layout(monkeypatch, tmp_path, layout):
    """Every activation keeps the batch's layout (oneDNN follows its input), so the loop sets it: an RGB
    batch reaches the network in the layout training_layout chose, recorded in environment.json."""
    from difflo import data as data_mod, train as train_mod
    rng = np.random.default_rng(0)
    rgb = data_mod.ArrayDataset(rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8), np.zeros(16, np.int64), 2, "rgb")
    monkeypatch.setattr(data_mod, "from_config", lambda cfg: rgb)
    monkeypatch.setenv(precision.LAYOUT_ENV, layout)
    seen = []
    real = train_mod.build_net

    def build(cfg):
        net = real(cfg)
        net.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        return net
    monkeypatch.setattr(train_mod, "build_net", build)
    train(tiny_config("train.steps=2", "model.attn_resolutions=[4]"), tmp_path / "run", **quiet)
    fmt = precision.LAYOUTS[layout]
    assert len(seen) == 2 and all(x.shape[1] == 3 and x.is_contiguous(memory_format=fmt) for x in seen)
    assert not any(x.is_contiguous(memory_format=f) for x in seen for f in precision.LAYOUTS.values() if f != fmt)
    assert json.loads((tmp_path / "run" / "environment.json").read_text())["layout"]["used"] == layout
