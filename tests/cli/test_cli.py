"""The CLI: sampling outputs, and one clear line + exit 2 for every bad input (never a traceback)."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from difflo import checkpoint
from difflo.cli import main
from conftest import assert_clean_error, run_cli


def test_sample_npz_and_grid(tiny_run, tmp_path, capsys):
    code, out, err = run_cli("sample", "--ckpt", str(tiny_run), "--n", "6", "--steps", "3", "--classes", "2,5",
                         "--out", str(tmp_path / "s.npz"))
    assert code == 0, err
    z = np.load(tmp_path / "s.npz")
    assert z["images"].shape == (6, 28, 28, 1) and z["images"].dtype == np.uint8
    assert z["labels"].tolist() == [2, 5, 2, 5, 2, 5]
    code, out, err = run_cli("sample", "--ckpt", str(tiny_run), "--grid", "2", "--steps", "2", "--classes",
                         "0,1,2", "--out", str(tmp_path / "g.png"), "--gif", str(tmp_path / "t.gif"))
    assert code == 0, err
    assert Image.open(tmp_path / "g.png").size[1] > 3 * 28 and Image.open(tmp_path / "t.gif").n_frames >= 2


def test_same_seed_same_images_whatever_the_batch_size(tiny_run, tmp_path, capsys):
    for bs in ("1", "4"):
        assert run_cli("sample", "--ckpt", str(tiny_run), "--n", "4", "--steps", "3", "--sampler", "ddpm",
                   "--batch-size", bs, "--out", str(tmp_path / f"b{bs}.npz"))[0] == 0
    assert np.array_equal(np.load(tmp_path / "b1.npz")["images"], np.load(tmp_path / "b4.npz")["images"])


def test_bad_train_inputs(tmp_path, capsys):
    assert_clean_error(*run_cli("train", "--config", str(tmp_path / "nope.yaml"))[::2], "not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    assert_clean_error(*run_cli("train", "--config", str(bad))[::2], "not valid YAML")
    assert_clean_error(*run_cli("train", "train.lrr=1")[::2], "did you mean train.lr")
    assert_clean_error(*run_cli("train", "train.steps=many")[::2], "train.steps must be of type int")
    assert_clean_error(*run_cli("train", "train.steps=0")[::2], "train.steps=0 must be > 0")


def test_unwritable_run_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_clean_error(*run_cli("train", "train.steps=1", "--out", str(blocker / "run"))[::2],
                       "cannot write to run directory")


def test_bad_sample_inputs(tiny_run, tmp_path, capsys):
    ckpt = str(tiny_run)
    out = str(tmp_path / "g.png")
    cases = [
        (["--ckpt", str(tmp_path / "missing"), "--out", out], "not found"),
        (["--ckpt", ckpt, "--classes", "10", "--out", out], "class index 10 out of range in --classes"),
        (["--ckpt", ckpt, "--classes", "-1", "--out", out], "class index -1 out of range"),
        (["--ckpt", ckpt, "--classes", "two", "--out", out], "no class 'two' in --classes"),
        (["--ckpt", ckpt, "--steps", "0", "--out", out], "must be >= 1"),
        (["--ckpt", ckpt, "--steps", "5000", "--out", out], "exceeds the model's 1000"),
        (["--ckpt", ckpt, "--w", "-1", "--out", out], "must be >= 0"),
        (["--ckpt", ckpt, "--out", str(tmp_path / "g.jpeg2")], "must end in .png or .npz"),
        (["--ckpt", ckpt, "--out", "/proc/difflo/g.png"], "cannot write --out"),
        (["--ckpt", ckpt], "--out"),
        (["--ckpt", ckpt, "--grid", "2", "--n", "3", "--out", out], "not allowed with"),
        (["--ckpt", str(tmp_path), "--out", out], "holds no checkpoint"),
    ]
    for args, needle in cases:
        assert_clean_error(*run_cli("sample", *args)[::2], needle)


def test_bad_checkpoints(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "g.png")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a checkpoint")
    assert_clean_error(*run_cli("sample", "--ckpt", str(junk), "--out", out)[::2], "not a readable safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    assert_clean_error(*run_cli("sample", "--ckpt", str(plain), "--out", out)[::2], "not a difflo checkpoint")

    # weights whose stored config describes another architecture
    src = checkpoint.list_checkpoints(tiny_run)[-1] / "ema.safetensors"
    state, cfg, meta = checkpoint.load_weights(src)
    cfg["model"]["channels"] = 16
    other = tmp_path / "other.safetensors"
    save_file(state, str(other), metadata={**meta, "config": json.dumps(cfg)})
    assert_clean_error(*run_cli("sample", "--ckpt", str(other), "--out", out)[::2], "does not fit the architecture")

    newer = tmp_path / "newer.safetensors"
    save_file(state, str(newer), metadata={**meta, "format_version": "99"})
    assert_clean_error(*run_cli("sample", "--ckpt", str(newer), "--out", out)[::2], "newer difflo")


def test_usage_errors_are_one_line(capsys):
    assert_clean_error(*run_cli("sample")[::2], "--ckpt")
    assert_clean_error(*run_cli("frobnicate")[::2], "invalid choice")
    assert_clean_error(*run_cli("demo", "--minutes", "0")[::2], "must be > 0")


def test_sample_dpmpp(tiny_run, tmp_path, capsys):
    """--sampler dpmpp is selectable on the command line and as the config's sample.sampler."""
    from difflo import config as config_mod
    code, out, err = run_cli("sample", "--ckpt", str(tiny_run), "--n", "3", "--steps", "4", "--sampler", "dpmpp",
                         "--out", str(tmp_path / "d.npz"))
    assert code == 0, err
    assert "sampler=dpmpp" in out and np.load(tmp_path / "d.npz")["images"].shape == (3, 28, 28, 1)
    config_mod.load(None, ["sample.sampler=dpmpp"]).validate()


def test_demo_says_when_the_machine_is_busy(monkeypatch):
    """The demo is bounded by time: a busy CPU means fewer steps, and the demo says so before it starts."""
    from difflo.cli import demo
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (0.3, 0.2, 0.1))
    assert demo.busy_note(5) is None
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (2.0, 1.0, 0.5))
    assert demo.busy_note(5).startswith("note: the CPU is busy (load average 2.0 on 2 cores): the demo trains for 5 ")
