"""A diffusers folder's scheduler settings through ``difflo sample`` (the command, an .npz, ``--precision fp32``)
against its own pipeline (DDIMPipeline / DDPMPipeline) with the same per-image seeds: ``steps_offset``,
``set_alpha_to_one: false``, DDIM's step rule (t -> t - T // n, docs/decisions.md "A diffusers folder samples as
its pipeline") at step counts that do not divide T (13, 17), every timestep spacing; and the one warning line of a
scheduler difflo does not implement. The models are tiny random UNet2DModels (no download)."""
from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, run_cli
from difflo import pretrained
from difflo.model import load_model
from difflo.generate import generate, settings_for

diffusers = pytest.importorskip("diffusers")
from diffusers import UniPCMultistepScheduler  # noqa: E402
from test_pretrained_vs_diffusers import SEEDS, TOL, save  # noqa: E402

# image i is seed SEEDS[i] on both sides: `difflo sample --seed 3 --n 2` draws images 0 and 1 from seeds 3 and 4
assert SEEDS == [3, 4]


def cli_images(folder, tmp_path, *flags) -> np.ndarray:
    """``difflo sample --ckpt FOLDER --n 2 --seed 3 --precision fp32`` as uint8 (N, H, W, C); nothing on stderr."""
    out = tmp_path / f"x{len(list(tmp_path.glob('x*.npz')))}.npz"
    code, _, err = run_cli("sample", "--ckpt", folder, "--n", len(SEEDS), "--seed", SEEDS[0], "--precision", "fp32",
                           *flags, "--out", out)
    assert code == 0 and err == "", err
    return np.load(out)["images"]


def pipeline_images(pipe, steps, **call) -> tuple[np.ndarray, torch.Tensor]:
    """The pipeline's own call with one generator per image: its images as uint8 and as floats in [0, 1]."""
    images = pipe(batch_size=len(SEEDS), generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                  num_inference_steps=steps, output_type="np", **call).images    # (N, H, W, C) floats
    return (images * 255).round().astype(np.uint8), torch.as_tensor(images).permute(0, 3, 1, 2)


def assert_same_images(got: np.ndarray, want: np.ndarray) -> None:
    """uint8 images equal up to one level where a value sits at a rounding boundary (float32 diffusers against
    float64 difflo schedules: TOL apart)."""
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


DDIM_CASES = [("leading", 17, 1, False),            # the case: a saved DDIM config's steps_offset 1 and
              ("leading", 13, 1, True),             # set_alpha_to_one false
              ("trailing", 13, 0, True),            # trailing 13: 999 -> 923 (not 922), ..., 76 -> 0 (alpha_bar_0)
              ("trailing", 17, 1, False),           # steps_offset is leading's only
              ("linspace", 13, 0, True),            # linspace: 999 -> 923, 916 -> 840, ...
              ("linspace", 17, 0, False)]
# eps with clip_sample (DDIMScheduler's defaults; difflo recomputes eps from the clipped x0, which is the call's
# use_clipped_model_output=True), and x0 prediction without clipping (no call option involved). The tiny random
# UNet's unclipped eps saturates nearly every pixel, which would compare little.
PREDICTIONS = {"eps-clip": (dict(prediction_type="epsilon", clip_sample=True), dict(use_clipped_model_output=True)),
               "x0": (dict(prediction_type="sample", clip_sample=False), {})}


@pytest.mark.slow
@pytest.mark.parametrize("prediction", list(PREDICTIONS))
@pytest.mark.parametrize("spacing, steps, offset, alpha_one", DDIM_CASES,
                         ids=[f"{c[0]}-{c[1]}-offset{c[2]}-{'one' if c[3] else 'alpha0'}" for c in DDIM_CASES])
def test_ddim_folder_samples_as_ddim_pipeline(tmp_path, spacing, steps, offset, alpha_one, prediction):
    """The folder's own defaults (spacing, steps_offset, set_alpha_to_one as sample.grid_end, DDIM's stride rule)
    give DDIMPipeline's images through `difflo sample`, and through difflo.generate.generate to TOL; difflo's own
    rule (listed steps, the clean end, no offset) gives other images, so the comparison can fail."""
    scheduler, call = PREDICTIONS[prediction]
    pipe = save(tmp_path / "m", "ddim", timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=alpha_one,
                **scheduler)
    want_u8, want = pipeline_images(pipe, steps, **call)
    model = load_model(tmp_path / "m")
    s = model.cfg.sample
    assert (s.sampler, s.spacing, s.steps_offset, s.step_rule, s.grid_end) == \
        ("ddim", spacing, offset, "stride", "clean" if alpha_one else "t0")
    x = generate(model, torch.zeros(len(SEEDS), dtype=torch.long), SEEDS,
                 settings_for(model, steps=steps, precision="fp32"))
    got = (x / 2 + 0.5).clamp(0, 1)
    assert ((got - want).abs() / (1 + want.abs())).max().item() < TOL
    assert_same_images(cli_images(tmp_path / "m", tmp_path, "--steps", steps), want_u8)
    plain = cli_images(tmp_path / "m", tmp_path, "--steps", steps, "--step-rule", "listed", "--grid-end", "clean",
                       "--steps-offset", 0)
    assert np.abs(plain.astype(int) - want_u8.astype(int)).max() >= 3


@pytest.mark.parametrize("eta", [0.5])
def test_ddim_stride_rule_with_eta(tmp_path, eta):
    """eta > 0 (noise at every step, the last one to alpha_bar_0 included) on a trailing 13-step grid."""
    pipe = save(tmp_path / "m", "ddim", timestep_spacing="trailing", set_alpha_to_one=False,
                **PREDICTIONS["x0"][0])
    want_u8, _ = pipeline_images(pipe, 13, eta=eta)
    assert_same_images(cli_images(tmp_path / "m", tmp_path, "--steps", 13, "--eta", eta), want_u8)


DDPM_CASES = [("leading", 17, 1), ("leading", 13, 0), ("trailing", 13, 0), ("linspace", 17, 0), ("linspace", 13, 0)]


@pytest.mark.slow
@pytest.mark.parametrize("spacing, steps, offset", DDPM_CASES, ids=[f"{c[0]}-{c[1]}-offset{c[2]}" for c in DDPM_CASES])
def test_ddpm_folder_samples_as_ddpm_pipeline(tmp_path, spacing, steps, offset):
    """DDPMScheduler steps to the next listed timestep (its previous_timestep), so its folder keeps difflo's listed
    rule, with its steps_offset: DDPMPipeline's images through `difflo sample`, the noise of every step drawn
    from the image's own generator on both sides. (fixed_small: where the last step starts at t > 0 diffusers
    adds noise of std 1e-10 there, invisible; for fixed_large see docs/pretrained.md.)"""
    pipe = save(tmp_path / "m", "ddpm", timestep_spacing=spacing, steps_offset=offset)     # eps, clip_sample
    want_u8, _ = pipeline_images(pipe, steps)
    s = load_model(tmp_path / "m").cfg.sample
    assert (s.sampler, s.steps_offset, s.step_rule, s.grid_end) == ("ddpm", offset, "listed", "clean")
    assert_same_images(cli_images(tmp_path / "m", tmp_path, "--steps", steps), want_u8)
    if offset:
        other = cli_images(tmp_path / "m", tmp_path, "--steps", steps, "--steps-offset", 0)
        assert np.abs(other.astype(int) - want_u8.astype(int)).max() >= 3


def test_flags_override_the_folder(tmp_path):
    """--step-rule, --grid-end and --steps-offset reach the grid; a steps_offset that leaves the timesteps is one
    line."""
    save(tmp_path / "m", "ddim", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    model = load_model(tmp_path / "m")
    from difflo.generate import time_grid
    grid = time_grid(model.path, settings_for(model, steps=10))
    assert grid[0] == 901 and grid[-2:] == [1, 0]
    grid = time_grid(model.path, settings_for(model, steps=10, steps_offset=0, grid_end="clean"))
    assert grid[0] == 900 and grid[-2:] == [0, -1]
    code, _, err = run_cli("sample", "--ckpt", tmp_path / "m", "--n", 1, "--steps", 10, "--steps-offset", 100,
                           "--out", tmp_path / "x.npz")
    assert_clean_error(code, err, "steps_offset 100 does not fit leading spacing with 10 steps")


# ----------------------------------------------------------------------------- schedulers difflo does not implement
def test_unimplemented_scheduler_is_named_in_one_warning_line(tmp_path):
    """A UniPCMultistepScheduler folder samples with difflo's dpmpp and says so in one line on stderr, naming
    the scheduler, the sampler used instead and its settings that are not the class's defaults."""
    save(tmp_path / "m", "ddpm", num_train_timesteps=100)
    (tmp_path / "m" / "scheduler" / "scheduler_config.json").unlink()
    UniPCMultistepScheduler(num_train_timesteps=100, solver_order=3).save_config(tmp_path / "m" / "scheduler")
    out = tmp_path / "x.npz"
    code, stdout, err = run_cli("sample", "--ckpt", tmp_path / "m", "--n", 1, "--steps", 3, "--precision", "fp32",
                                "--out", out)
    assert code == 0 and out.is_file() and "sampler=dpmpp" in stdout
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: "), err
    for words in ("UniPCMultistepScheduler", "difflo does not implement", "dpmpp sampler instead",
                  "solver_order=3"):
        assert words in lines[0], (words, lines[0])


def test_own_scheduler_with_a_setting_difflo_does_not_read():
    """A DDIM/DDPM setting outside what difflo reads (a newer diffusers' knob), set to other than its class
    default, is named; one at its default, and settings the class does not take (ignored by diffusers too),
    are not."""
    line = pretrained.unread_settings({"_class_name": "DDIMScheduler", "new_knob": 2, "skip_prk_steps": True},
                                      {"new_knob": 1}, "s.json")
    assert line == "warning: s.json: difflo samples DDIMScheduler as if new_knob=2 had their defaults"
    assert pretrained.unread_settings({"_class_name": "DDIMScheduler", "new_knob": 1, "set_alpha_to_one": False},
                                      {"new_knob": 1, "set_alpha_to_one": True}, "s.json") is None
    # PNDM's set_alpha_to_one is not read (difflo samples it with DDIM's listed rule): named
    line = pretrained.unread_settings({"_class_name": "PNDMScheduler", "set_alpha_to_one": False},
                                      {"set_alpha_to_one": True}, "s.json")
    assert "PNDMScheduler" in line and "ddim sampler instead" in line and "set_alpha_to_one=False" in line


def test_every_setting_of_ddpm_and_ddim_is_read():
    """Nothing of DDPMScheduler's and DDIMScheduler's own settings is left unread in this diffusers: a config
    with every one of them at a non-default value raises no warning (refusals aside)."""
    for name, sampler in [("DDPMScheduler", "ddpm"), ("DDIMScheduler", "ddim")]:
        own = inspect.signature(getattr(diffusers, name).__init__).parameters
        unread = [k for k in own if k != "self" and k not in pretrained.READ_SETTINGS + pretrained.DDIM_SETTINGS]
        assert unread == [], (name, unread)
        assert pretrained.SCHEDULERS[name] == (sampler, True)


def test_other_unimplemented_scheduler_keeps_listed_steps(tmp_path):
    """An LMSDiscreteScheduler config (DDIM's settings relabelled; the class takes no set_alpha_to_one, so that
    one is ignored as diffusers ignores it): one warning line, and difflo's DDIM with its listed rule."""
    save(tmp_path / "m", "ddim", num_train_timesteps=100, set_alpha_to_one=False)
    data = json.loads((tmp_path / "m" / "scheduler" / "scheduler_config.json").read_text())
    data["_class_name"] = "LMSDiscreteScheduler"
    (tmp_path / "m" / "scheduler" / "scheduler_config.json").write_text(json.dumps(data))
    code, _, err = run_cli("sample", "--ckpt", tmp_path / "m", "--n", 1, "--steps", 2, "--precision", "fp32",
                           "--out", tmp_path / "x.npz")
    assert code == 0 and len(err.splitlines()) == 1, err
    assert "LMSDiscreteScheduler" in err and "ddim sampler instead" in err and "set_alpha_to_one" not in err
    s = load_model(tmp_path / "m").cfg.sample
    assert (s.sampler, s.step_rule, s.grid_end) == ("ddim", "listed", "clean")
