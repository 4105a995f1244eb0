"""One ``--ckpt`` grammar everywhere (checkpoint.resolve_weights, used by load_model, so by sample, edit, eval
and serve): a run directory, its checkpoints/ folder, a step folder, a .safetensors file, a diffusers model
folder, or ``demo`` (the checkpoint packaged in difflo/assets/demo/)."""
import importlib.resources
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, run_cli
from difflo import checkpoint
from difflo.checkpoint import WEIGHTS, resolve_weights
from difflo.model import load_model


def newest(run):
    return checkpoint.list_checkpoints(run)[-1]


@pytest.mark.parametrize("ema", [True, False])
def test_every_form_names_a_weights_file(tiny_run, ema):
    name = WEIGHTS[1] if ema else WEIGHTS[0]
    first, last = checkpoint.list_checkpoints(tiny_run)
    assert last == newest(tiny_run) and first.name < last.name
    assert resolve_weights(tiny_run, ema) == last / name                       # a run directory: its newest
    assert resolve_weights(tiny_run / "checkpoints", ema) == last / name       # its checkpoints/ folder: the same
    assert resolve_weights(first, ema) == first / name                         # a step folder: that one
    assert resolve_weights(first / "model.safetensors", ema) == first / "model.safetensors"    # a file: itself
    assert resolve_weights(str(tiny_run), ema) == last / name                  # text as given on a command line


def test_checkpoints_folder_loads_the_newest(tiny_run, tmp_path):
    """`--ckpt RUN/checkpoints` of a finished run samples (it used to say "train first")."""
    a, b = load_model(tiny_run / "checkpoints"), load_model(newest(tiny_run))
    assert all(torch.equal(x, y) for x, y in zip(a.net.state_dict().values(), b.net.state_dict().values()))
    images = []
    for i, ckpt in enumerate((tiny_run / "checkpoints", tiny_run, newest(tiny_run))):
        code, _, err = run_cli("sample", "--ckpt", ckpt, "--n", "2", "--steps", "2", "--out", tmp_path / f"{i}.npz")
        assert code == 0, err
        images.append(np.load(tmp_path / f"{i}.npz")["images"])
    assert all(np.array_equal(images[0], x) for x in images[1:])


def test_folders_without_a_checkpoint(tiny_run, tmp_path):
    out = tmp_path / "g.png"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert_clean_error(*run_cli("sample", "--ckpt", tmp_path / "run" / "checkpoints", "--out", out)[::2],
                       "holds no checkpoint", f"difflo train --out {tmp_path / 'run'}`")
    assert_clean_error(*run_cli("sample", "--ckpt", tmp_path / "run", "--out", out)[::2], "holds no checkpoint")
    assert_clean_error(*run_cli("sample", "--ckpt", tmp_path / "nothing", "--out", out)[::2],
                       "not found", "a diffusers model folder or demo")
    raw_only = tmp_path / "raw_only"
    raw_only.mkdir()
    shutil.copy(newest(tiny_run) / "model.safetensors", raw_only)
    assert_clean_error(*run_cli("sample", "--ckpt", raw_only, "--out", out)[::2],
                       "has model.safetensors but no ema.safetensors", "--no-ema")
    assert run_cli("sample", "--ckpt", raw_only, "--no-ema", "--n", "1", "--steps", "1",
                   "--out", tmp_path / "r.npz")[0] == 0


def test_a_diffusers_folder_is_itself(tmp_path):
    """Recognised by its files alone (reading it is difflo.pretrained's, tested in tests/peer)."""
    folder = tmp_path / "ddpm-cifar10"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert checkpoint.is_diffusers_folder(folder) and resolve_weights(folder) == folder
    assert resolve_weights(folder / "unet" / "diffusion_pytorch_model.safetensors") == folder / "unet"
    assert not checkpoint.is_diffusers_folder(tmp_path / "ddpm-cifar10" / "model_index.json")


@pytest.fixture
def packaged_demo(tiny_run, tmp_path, monkeypatch):
    """difflo/assets/demo/ as a later install will have it: a checkpoint directory inside the package."""
    root = tmp_path / "site" / "difflo"
    shutil.copytree(newest(tiny_run), root / "assets" / "demo")
    files = importlib.resources.files
    monkeypatch.setattr(importlib.resources, "files", lambda pkg: root if pkg == "difflo" else files(pkg))
    return root / "assets" / "demo"


def test_demo_when_packaged(packaged_demo, tmp_path, monkeypatch):
    assert resolve_weights("demo") == packaged_demo / "ema.safetensors"
    assert resolve_weights("demo", ema=False) == packaged_demo / "model.safetensors"
    code, _, err = run_cli("sample", "--ckpt", "demo", "--n", "2", "--steps", "2", "--out", tmp_path / "d.npz")
    assert code == 0, err
    monkeypatch.chdir(tmp_path)                       # a folder named demo here is ./demo, not the packaged one
    (tmp_path / "demo").mkdir()
    assert resolve_weights("demo") == packaged_demo / "ema.safetensors"
    assert_clean_error(*run_cli("sample", "--ckpt", "./demo", "--out", tmp_path / "g.png")[::2],
                       "holds no checkpoint")


def test_demo_missing_is_one_line(tmp_path, monkeypatch):
    files = importlib.resources.files
    monkeypatch.setattr(importlib.resources, "files",
                        lambda pkg: tmp_path / "site" / "difflo" if pkg == "difflo" else files(pkg))
    for command in (["sample", "--ckpt", "demo", "--out", tmp_path / "g.png"],
                    ["edit", "anagram", "--ckpt", "demo", "--a", "1", "--b", "2", "--out", tmp_path / "e"],
                    ["eval", "model", "--ckpt", "demo"]):
        assert_clean_error(*run_cli(*command)[::2], "the demo checkpoint is not in this install")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert_clean_error(*run_cli("sample", "--ckpt", "demo", "--out", tmp_path / "g.png")[::2],
                       "the demo checkpoint is not in this install", "--ckpt ./demo")


@pytest.mark.slow
def test_the_shipped_demo_serves_samples_and_edits(tmp_path):
    """`--ckpt demo` works right after install: the packaged EMA weights load with names and today's
    sampling defaults, the web page answers, and sample/edit run on it (a few steps)."""
    import urllib.request

    from difflo.serve.server import serve_in_thread

    model = load_model("demo")
    assert model.num_classes == 10 and model.class_names[7] == "7"
    assert (model.cfg.sample.sampler, model.cfg.sample.steps, model.cfg.sample.w) == ("ddpm", 50, 2.0)
    url, app, httpd = serve_in_thread("demo", device="cpu", jobs_root=tmp_path / "jobs")
    try:
        with urllib.request.urlopen(url + "/", timeout=30) as r:
            assert "Generate" in r.read().decode()
        assert app.info()["num_classes"] == 10 and app.info()["defaults"]["sampler"] == "ddpm"
    finally:
        httpd.shutdown()
        httpd.server_close()
        app.close()
    code, _, err = run_cli("sample", "--ckpt", "demo", "--classes", "3", "--grid", "1", "--steps", "2",
                           "--out", tmp_path / "g.png")
    assert code == 0 and (tmp_path / "g.png").is_file(), err
    code, _, err = run_cli("edit", "anagram", "--ckpt", "demo", "--a", "6", "--b", "9", "--steps", "2",
                           "--out", tmp_path / "anagram")
    assert code == 0 and (tmp_path / "anagram" / "figure.png").is_file(), err
