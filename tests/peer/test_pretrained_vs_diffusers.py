"""Pretrained diffusers folders as ``--ckpt`` (difflo.pretrained): the same images as diffusers' own
DDPMPipeline / DDIMPipeline, the front ends on such a folder, and one clean line for every folder difflo
cannot run. The models are tiny random UNet2DModels saved with ``save_pretrained`` (no download)."""
from __future__ import annotations

import json
import shlex
import shutil
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_clean_error, run_cli
from difflo import checkpoint, pretrained
from difflo.errors import DiffloError
from difflo.model import load_model, make_denoiser
from difflo.noise_paths import make_path
from difflo.generate import generate, settings_for

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler,  # noqa: E402
                       UNet2DModel)

SEEDS = [3, 4]
# float32 diffusers (its alpha_bar and step coefficients in float32) against difflo's float64 schedule:
# the worst difference measured over the DDIM/DDPM cases below is 5.7e-6 relative to 1 + |x|.
TOL = 5e-5


def tiny_unet(num_class_embeds=None, sample_size=8, seed=0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4,
                       num_class_embeds=num_class_embeds).eval()


def save(folder, kind="ddpm", unet=None, **scheduler):
    """A DDPMPipeline ("ddpm") or DDIMPipeline ("ddim") save of a tiny UNet; returns the pipeline."""
    unet = unet or tiny_unet()
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**scheduler)) if kind == "ddpm" \
        else DDIMPipeline(unet=unet, scheduler=DDIMScheduler(**scheduler))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe


def record_steps(pipe) -> list[torch.Tensor]:
    """Every prev_sample the pipeline's scheduler returns (its raw trajectory, before the output's clamp)."""
    trace, step = [], pipe.scheduler.step

    def recorded(*args, **kwargs):
        out = step(*args, **kwargs)
        trace.append(out.prev_sample.clone())
        return out

    pipe.scheduler.step = recorded
    return trace


def assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    err = ((got - ref).abs() / (1 + ref.abs())).max().item()
    assert err < TOL, err


def difflo_run(folder, sampler, steps, **settings):
    """difflo's images and per-step states for SEEDS (image i from its own generator seeded SEEDS[i])."""
    model = load_model(folder)
    states = []
    x = generate(model, torch.zeros(len(SEEDS), dtype=torch.long), SEEDS,
                 settings_for(model, sampler=sampler, steps=steps, **settings),
                 callback=lambda d: states.append(d["x"].clone()))
    return model, x, states


SCHEDULES = [("epsilon", dict(beta_schedule="linear")),
             ("v_prediction", dict(beta_schedule="squaredcos_cap_v2")),
             ("epsilon", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
             ("sample", dict(beta_schedule="linear", clip_sample=False))]
IDS = ["eps-linear", "v-cosine", "eps-scaled_linear", "x0-noclip"]


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.slow
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction, schedule", SCHEDULES, ids=IDS)
def test_ddim_equals_ddim_pipeline(tmp_path, prediction, schedule, spacing):
    """difflo's DDIM (eta 0) on the folder = DDIMPipeline, step by step, from the same noise: image i
    starts from ``randn`` of a generator seeded SEEDS[i] in both (diffusers takes a list of generators).
    With clip_sample, difflo recomputes eps from the clamped x0, which is DDIMPipeline's
    ``use_clipped_model_output=True``. n = 10 divides T, so diffusers' step to ``t - T // n`` is the
    next listed timestep for trailing spacing too (docs/decisions.md, "DDIM timestep spacing")."""
    pipe = save(tmp_path / "m", "ddim", prediction_type=prediction, timestep_spacing=spacing, **schedule)
    trace = record_steps(pipe)
    ref = pipe(batch_size=len(SEEDS), generator=[torch.Generator().manual_seed(s) for s in SEEDS], eta=0.0,
               num_inference_steps=10, use_clipped_model_output=True, output_type="pt").images
    model, x, states = difflo_run(tmp_path / "m", "ddim", 10)
    assert model.cfg.sample.spacing == spacing and model.cfg.sample.clip_x0 == schedule.get("clip_sample", True)
    assert len(states) == len(trace) == 10
    for got, want in zip(states, trace):
        assert_close(got, want)
    assert_close(x, trace[-1])
    assert_close((x / 2 + 0.5).clamp(0, 1), torch.as_tensor(ref))


def test_zero_terminal_snr_folder_equals_ddim_pipeline(tmp_path):
    """A scheduler with rescale_betas_zero_snr (Lin et al. 2024) reads as diffusion.zero_terminal_snr: difflo's
    DDIM from alpha_T = 0 equals DDIMPipeline step by step (v-prediction, trailing)."""
    pipe = save(tmp_path / "m", "ddim", prediction_type="v_prediction", timestep_spacing="trailing",
                rescale_betas_zero_snr=True, clip_sample=False)
    trace = record_steps(pipe)
    pipe(batch_size=len(SEEDS), generator=[torch.Generator().manual_seed(s) for s in SEEDS], eta=0.0,
         num_inference_steps=10, output_type="pt")
    model, x, states = difflo_run(tmp_path / "m", "ddim", 10)
    assert model.cfg.diffusion.zero_terminal_snr and model.path.alpha_sigma(model.path.T - 1)[0] == 0.0
    assert len(states) == len(trace) == 10
    for got, want in zip(states, trace):
        assert_close(got, want)


def test_karras_flag_of_a_folder_is_its_grid(tmp_path):
    from difflo.pretrained import config_for, scheduler_settings
    s = scheduler_settings({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}, tmp_path)
    assert config_for({"sample_size": 8}, s, "x").sample.spacing == "karras"
    s = scheduler_settings({"_class_name": "DPMSolverMultistepScheduler", "use_exponential_sigmas": True}, tmp_path)
    assert config_for({"sample_size": 8}, s, "x").sample.spacing == "exponential"


@pytest.mark.slow
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction, schedule", SCHEDULES, ids=IDS)
def test_ddpm_equals_ddpm_pipeline(tmp_path, prediction, schedule, variance):
    """difflo's ancestral DDPM = DDPMPipeline with the same noise sequence. Each image has its own
    generator in both: DDPMPipeline(generator=[g_0, g_1]) draws image i's start and its noise at every
    step with t > 0 from g_i, in the order difflo's SeededNoise draws them (the start, then one draw per
    step except the last, to the clean data), so the stochastic parts are equal draws and the whole
    chain is compared, not only its deterministic part. Leading spacing (the scheduler's default) ends
    at t = 0; with trailing spacing diffusers adds noise on the last step too (its ``t > 0`` test),
    where difflo's chain ends at the clean data."""
    pipe = save(tmp_path / "m", "ddpm", prediction_type=prediction, variance_type=variance, **schedule)
    trace = record_steps(pipe)
    ref = pipe(batch_size=len(SEEDS), generator=[torch.Generator().manual_seed(s) for s in SEEDS],
               num_inference_steps=10, output_type="pt").images
    model, x, states = difflo_run(tmp_path / "m", "ddpm", 10)
    assert (model.cfg.sample.sampler, model.cfg.sample.variance, model.cfg.sample.spacing) == \
        ("ddpm", variance, "leading")
    for got, want in zip(states, trace):
        assert_close(got, want)
    assert_close(x, trace[-1])
    assert_close((x / 2 + 0.5).clamp(0, 1), torch.as_tensor(ref))


def test_timesteps_reach_the_unet_as_diffusers_gives_them(tmp_path):
    """The wrapper hands UNet2DModel the integer timestep index diffusers' scheduler would (difflo's t = 0..T-1
    is diffusers' t), so one denoiser call equals the scheduler's own x0 prediction."""
    pipe = save(tmp_path / "m", "ddpm", clip_sample=False)
    model = load_model(tmp_path / "m")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    den = make_denoiser(model, 1.0, clip_x0=False)
    pipe.scheduler.set_timesteps(1000)
    for t in (999, 500, 1):
        with torch.no_grad():
            eps = pipe.unet(x, torch.tensor(t)).sample
        ref = pipe.scheduler.step(eps, t, x).pred_original_sample
        assert_close(den(x, t, y=torch.zeros(2, dtype=torch.long)), ref)


@pytest.mark.parametrize("schedule", [dict(beta_schedule="linear", beta_start=2e-4, beta_end=0.03),
                                      dict(beta_schedule="scaled_linear"), dict(beta_schedule="squaredcos_cap_v2"),
                                      dict(beta_schedule="sigmoid"),
                                      dict(trained_betas=np.linspace(1e-4, 0.05, 100).tolist())],
                         ids=["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "trained_betas"])
def test_schedules_equal_the_schedulers(tmp_path, schedule):
    """alpha_bar of the path difflo builds from a scheduler config = the scheduler's own (float32)."""
    T = 100
    ref = DDPMScheduler(num_train_timesteps=T, **schedule)
    save(tmp_path / "m", "ddpm", num_train_timesteps=T, **schedule)
    model = load_model(tmp_path / "m")
    assert model.path.T == T and model.path.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(model.path.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-6, rtol=1e-5)
    assert make_path(model.cfg.diffusion).alphas_cumprod.equal(model.path.alphas_cumprod)   # the config alone
    expected = {"squaredcos_cap_v2": "cosine", "sigmoid": "explicit"}.get(schedule.get("beta_schedule"),
                                                                           schedule.get("beta_schedule", "explicit"))
    assert model.cfg.diffusion.schedule == expected


def test_config_of_a_folder(tmp_path):
    save(tmp_path / "cifar", "ddpm", variance_type="fixed_large", clip_sample_range=2.0)
    model = load_model(tmp_path / "cifar")
    cfg = model.cfg
    assert (cfg.data.name, cfg.data.classes, model.num_classes, model.objective) == ("diffusers:cifar", (), 0,
                                                                                      "diffusion")
    assert (cfg.model.in_channels, cfg.model.image_size, cfg.diffusion.prediction) == (3, 8, "eps")
    assert (cfg.sample.sampler, cfg.sample.w, cfg.sample.variance, cfg.diffusion.clip_range) == \
        ("ddpm", 1.0, "fixed_large", 2.0)
    assert isinstance(model.net, pretrained.DiffusersUNet) and not model.net.training
    # the same folder through its unet/ folder (scheduler in ../scheduler/) and through its weights file
    for other in (tmp_path / "cifar" / "unet", tmp_path / "cifar" / "unet" / "diffusion_pytorch_model.safetensors"):
        again = load_model(other)
        assert again.cfg.data.name == "diffusers:cifar"
        assert all(torch.equal(a, b) for a, b in zip(again.net.state_dict().values(), model.net.state_dict().values()))


def test_flat_folder_and_bin_weights(tmp_path):
    """A bare UNet2DModel folder (config.json + .bin weights) with scheduler_config.json beside it."""
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "flat", safe_serialization=False)
    DDIMScheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "flat")
    assert (tmp_path / "flat" / "diffusion_pytorch_model.bin").is_file()
    model = load_model(tmp_path / "flat")
    assert model.cfg.diffusion.prediction == "v" and model.cfg.sample.sampler == "ddim"
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.net(x, torch.tensor([7.0]), None), unet(x, 7).sample)


# ----------------------------------------------------------------------------- classes and guidance
def test_class_conditional_model_and_null_class(tmp_path):
    """num_class_embeds = 5: w = 1 needs no null class; guidance does (one line) until it is named; with
    --null-class 4 (the last embedding, difflo's own layout) the model has classes 0..3 and CFG combines
    the class and the null-class predictions."""
    unet = tiny_unet(num_class_embeds=5)
    save(tmp_path / "c", "ddpm", unet=unet, clip_sample=False)
    model = load_model(tmp_path / "c")
    assert model.num_classes == 5 and not model.has_null_class
    x, y, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 3]), 600
    a, s = model.path.alpha_sigma(t)
    with torch.no_grad():
        eps = {"cond": unet(x, t, class_labels=y).sample, "null": unet(x, t, class_labels=torch.full((2,), 4)).sample}
    x0 = {k: (x - s * e) / a for k, e in eps.items()}
    assert_close(make_denoiser(model, 1.0, clip_x0=False)(x, t, y=y), x0["cond"])
    with pytest.raises(DiffloError, match="--null-class K"):
        make_denoiser(model, 2.0)
    model.set_null_class(4)
    assert model.num_classes == 4 and model.has_null_class
    assert_close(make_denoiser(model, 2.0, clip_x0=False)(x, t, y=y), x0["null"] + 2.0 * (x0["cond"] - x0["null"]))
    with pytest.raises(DiffloError, match="out of range"):
        load_model(tmp_path / "c").set_null_class(5)


def test_cli_class_conditional(tmp_path):
    save(tmp_path / "c", "ddpm", unet=tiny_unet(num_class_embeds=3), num_train_timesteps=100)
    out = tmp_path / "g.png"
    code, _, err = run_cli("sample", "--ckpt", tmp_path / "c", "--grid", "1", "--steps", "2", "--w", "2",
                           "--out", out)
    assert_clean_error(code, err, "null class", "--null-class K", "--w 1")
    code, stdout, err = run_cli("sample", "--ckpt", tmp_path / "c", "--grid", "1", "--steps", "2", "--w", "2",
                                "--null-class", "0", "--classes", "1,2", "--out", out)
    assert code == 0, err
    assert Image.open(out).size[1] > 2 * 8                                    # two labelled rows
    assert_clean_error(*run_cli("sample", "--ckpt", tmp_path / "c", "--null-class", "3", "--out", out)[::2],
                       "--null-class 3 out of range")


# ----------------------------------------------------------------------------- the front ends
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A DDPMPipeline save of a tiny unconditional model with T = 100 (quick CLI runs)."""
    root = tmp_path_factory.mktemp("pretrained") / "ddpm-tiny"
    save(root, "ddpm", num_train_timesteps=100)
    return root


def test_cli_sample(folder, tmp_path):
    out = tmp_path / "x.png"
    code, stdout, err = run_cli("sample", "--ckpt", folder, "--grid", "1", "--steps", "3", "--out", out)
    assert code == 0 and err == "", err
    w, h = Image.open(out).size
    assert w == h and "1 images" in stdout and "sampler=ddpm" in stdout          # one image, unlabelled
    code, stdout, err = run_cli("sample", "--ckpt", folder, "--n", "3", "--steps", "3", "--sampler", "dpmpp",
                                "--out", tmp_path / "x.npz")
    assert code == 0, err
    assert np.load(tmp_path / "x.npz")["images"].shape == (3, 8, 8, 3)


def test_unconditional_ignores_guidance_and_classes_with_a_note(folder, tmp_path, monkeypatch):
    """An unconditional model has nothing to guide: --w and --classes are ignored, each with one note
    line (the same images as without them), and --null-class is an error."""
    from difflo import model as model_mod
    monkeypatch.setattr(model_mod, "_noted", set())                # notes are printed once per process
    plain, noted = tmp_path / "a.npz", tmp_path / "b.npz"
    assert run_cli("sample", "--ckpt", folder, "--n", "2", "--steps", "3", "--out", plain)[0] == 0
    code, _, err = run_cli("sample", "--ckpt", folder, "--n", "2", "--steps", "3", "--w", "3", "--classes", "2",
                           "--out", noted)
    assert code == 0
    assert err.splitlines() == ["note: this model is unconditional (no class labels): --classes 2 is ignored",
                                "note: this model is unconditional (no class labels): guidance w=3 has no effect"]
    assert np.array_equal(np.load(plain)["images"], np.load(noted)["images"])
    assert_clean_error(*run_cli("sample", "--ckpt", folder, "--null-class", "0", "--out", plain)[::2],
                       "unconditional")


def test_cli_edit(folder, tmp_path):
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "in.png")
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (0, 0, 4, 8))
    mask.save(tmp_path / "mask.png")
    for technique, extra in [("sdedit", ["--image", tmp_path / "in.png", "--class", "0", "--stride", "30",
                                         "--levels", "1,2"]),
                             ("inpaint", ["--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png",
                                          "--class", "0", "--steps", "3", "--w", "1"]),
                             ("anagram", ["--a", "0", "--b", "0", "--steps", "2", "--w", "1"])]:
        out = tmp_path / technique
        code, stdout, err = run_cli("edit", technique, "--ckpt", folder, *extra, "--out", out)
        assert code == 0, err
        assert (out / "figure.png").is_file() and (out / "result_00.png").is_file()


def test_web_app(folder, tmp_path):
    """The web page's App on the folder: a sample job, and the command it shows reproduces it."""
    from difflo import cli
    from difflo.serve.app import App

    app = App(folder, device="cpu", jobs_root=tmp_path / "jobs")
    try:
        info = app.info()
        assert (info["data"], info["num_classes"], info["image_size"], info["channels"]) == \
            ("diffusers:ddpm-tiny", 0, 8, 3)
        job = app.submit_sample({"n": 2, "steps": 3, "sampler": "ddim", "seed": 5})
        t0 = time.time()
        while job.status in ("queued", "running"):
            assert time.time() - t0 < 60
            time.sleep(0.02)
        assert job.status == "done", job.error
        command = shlex.split(job.result["command"].splitlines()[0])
        assert command[command.index("--ckpt") + 1] == app.ckpt_arg and app.ckpt_arg.endswith("ddpm-tiny")
        command[command.index("--out") + 1] = str(tmp_path / "grid.png")
        assert cli.main(command[1:]) == 0
        assert (tmp_path / "grid.png").read_bytes() == (job.dir / "grid.png").read_bytes()
    finally:
        app.close()


# ----------------------------------------------------------------------------- folders difflo refuses
def _bad_folders(root, good):
    """(folder, needle) for each kind of folder difflo cannot run."""
    cases = []

    def copy(name):
        shutil.copytree(good, root / name)
        return root / name

    f = copy("no-unet-config")
    (f / "unet" / "config.json").unlink()
    cases.append((f, "has no UNet config"))
    f = copy("no-scheduler")
    shutil.rmtree(f / "scheduler")
    cases.append((f, "has no scheduler config"))
    f = copy("no-weights")
    (f / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    cases.append((f, "has no weights"))
    f = copy("bad-json")
    (f / "scheduler" / "scheduler_config.json").write_text("{not json")
    cases.append((f, "is not valid JSON"))

    def edit_json(path, **changes):
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps(data))

    f = copy("unknown-scheduler")
    edit_json(f / "scheduler" / "scheduler_config.json", _class_name="ScoreSdeVeScheduler")
    cases.append((f, "unknown scheduler _class_name 'ScoreSdeVeScheduler'"))
    f = copy("unknown-beta-schedule")
    edit_json(f / "scheduler" / "scheduler_config.json", beta_schedule="quadratic")
    cases.append((f, "unknown beta_schedule 'quadratic'"))
    f = copy("learned-variance")
    edit_json(f / "scheduler" / "scheduler_config.json", variance_type="learned_range")
    cases.append((f, "variance_type 'learned_range' is not supported"))
    f = copy("zero-snr-eps")
    edit_json(f / "scheduler" / "scheduler_config.json", rescale_betas_zero_snr=True, prediction_type="epsilon")
    cases.append((f, "rescale_betas_zero_snr (zero terminal SNR) with prediction_type epsilon"))
    f = copy("thresholding")
    edit_json(f / "scheduler" / "scheduler_config.json", thresholding=True)
    cases.append((f, "dynamic thresholding"))
    f = copy("wrong-shapes")                                    # config.json now says 12 channels, weights are 8
    edit_json(f / "unet" / "config.json", block_out_channels=[12, 16])
    cases.append((f, "does not fit its config.json (size mismatch for"))
    f = copy("missing-tensor")
    from safetensors.torch import load_file, save_file
    weights = f / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state.pop("conv_in.bias")
    save_file(state, str(weights))
    cases.append((f, "does not fit its config.json (1 missing"))
    f = copy("junk-weights")
    (f / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"junk")
    cases.append((f, "diffusers could not load the UNet2DModel"))
    f = copy("stable-diffusion")
    edit_json(f / "model_index.json", _class_name="StableDiffusionPipeline", vae=["diffusers", "AutoencoderKL"],
              text_encoder=["transformers", "CLIPTextModel"])
    cases.append((f, "latent diffusion is not supported: difflo runs pixel-space UNet2DModel pipelines"))
    f = copy("vae-folder")
    (f / "model_index.json").unlink()
    (f / "vae").mkdir()
    cases.append((f, "latent diffusion is not supported"))
    f = copy("conditional-unet")
    edit_json(f / "model_index.json", unet=["diffusers", "UNet2DConditionModel"])
    cases.append((f, "unet is a UNet2DConditionModel"))
    f = copy("learned-sigma-unet")
    edit_json(f / "unet" / "config.json", out_channels=6)
    cases.append((f, "learned-variance model"))
    f = copy("score-sde")
    edit_json(f / "unet" / "config.json", time_embedding_type="fourier")
    cases.append((f, "time_embedding_type 'fourier'"))
    return cases


@pytest.mark.slow
def test_bad_folders_give_one_line(folder, tmp_path):
    for bad, needle in _bad_folders(tmp_path, folder):
        code, _, err = run_cli("sample", "--ckpt", bad, "--out", tmp_path / "x.png")
        assert_clean_error(code, err, needle)
        assert not (tmp_path / "x.png").exists()


def test_without_diffusers_one_line(folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)            # `import diffusers` raises ImportError
    code, _, err = run_cli("sample", "--ckpt", folder, "--out", tmp_path / "x.png")
    assert_clean_error(code, err, 'pip install "difflo[diffusers]"')


def test_resolve_gives_the_folder(folder):
    assert checkpoint.resolve_weights(folder) == folder and checkpoint.is_diffusers_folder(folder)
    assert checkpoint.resolve_weights(folder / "unet" / "diffusion_pytorch_model.safetensors") == folder / "unet"
