"""``difflo export`` (difflo.export): the exported folder is a diffusers DDPMPipeline whose UNet2DModel gives
difflo's network's outputs and whose DDPMScheduler has difflo's noise schedule; difflo reads it back as
``--ckpt`` with the same samples; models UNet2DModel cannot express are written in difflo's own format; and
every bad input is one line. Models are tiny: random weights (every layer, the zero-initialised ones too,
perturbed so that each weight matters) or a few training steps."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_clean_error, run_cli, tiny_config
from difflo import checkpoint, export as export_mod, pretrained, schedules
from difflo.model import load_model, make_denoiser
from difflo.nn import UNet
from difflo.noise_paths import make_path
from difflo.generate import generate, settings_for

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

# difflo's UNet against UNet2DModel with the same weights, float32 on CPU: the worst difference measured
# over the cases below is 2.8e-6 (outputs of size ~2); SDPA and conv kernels see the same tensors, the
# remaining difference is summation order.
ATOL = 5e-5
SEEDS = [3, 4]
W32 = ["model.channels=32"]          # widths 32, 64: every GroupNorm has 32 groups, as in UNet2DModel


def random_checkpoint(root, *overrides, seed=0):
    """A run directory with one checkpoint of a randomly initialised tiny UNet (all layers perturbed)."""
    cfg = tiny_config(*overrides)
    cfg.validate()
    torch.manual_seed(seed)
    net = UNet(cfg.model)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = net.state_dict()
    checkpoint.save_checkpoint(root, 7, cfg.to_dict(), state, state, {"step": 7})
    return root


def assert_same_network(folder, model):
    """UNet2DModel.from_pretrained(folder/unet) = difflo's net for the same (x, t, y); returns the max |diff|."""
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    m = model.cfg.model
    x = torch.randn(3, m.in_channels, m.image_size, m.image_size, generator=torch.Generator().manual_seed(1))
    T = model.cfg.diffusion.timesteps
    worst = 0.0
    for t in (0, T // 3, T - 1):
        y = torch.tensor([0, m.num_classes - 1, m.num_classes]) if m.num_classes else None   # incl. the null class
        with torch.no_grad():
            ours = model.net(x, torch.full((3,), float(t)), y)
            theirs = unet(x, t, class_labels=y).sample
        torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
        worst = max(worst, (theirs - ours).abs().max().item())
    return worst


# ----------------------------------------------------------------------------- the network
CASES = {"classes-cosine-v": W32 + ["model.attn_resolutions=[14]"],
         "uncond-rgb-heads-linear-eps": W32 + ["model.num_classes=0", "model.in_channels=3", "model.image_size=8",
                                               "model.attn_resolutions=[4]", "model.attn_heads=2",
                                               "diffusion.schedule=linear", "diffusion.prediction=eps"],
         "three-levels-two-blocks-sigmoid-x0": W32 + ["model.channel_mult=[1,2,2]", "model.num_res_blocks=2",
                                                      "model.attn_resolutions=[7]", "model.num_classes=3",
                                                      "diffusion.schedule=sigmoid", "diffusion.prediction=x0",
                                                      "diffusion.timesteps=50", "sample.steps=10"],
         "scale-shift": W32 + ["model.attn_resolutions=[14]", "model.scale_shift=true"]}


@pytest.mark.slow
@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_unet2dmodel_equals_difflo_net(tmp_path, overrides):
    """The exported UNet2DModel's output = difflo's UNet's for the same (x, t, y), and difflo reads the
    folder back (difflo.pretrained) as the same denoiser, guidance with the null class included."""
    run = random_checkpoint(tmp_path / "run", *overrides)
    res = export_mod.export(run, tmp_path / "out")
    assert res.layout == "diffusers" and res.why is None
    out = tmp_path / "out"
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "difflo/config.yaml", "README.md"):
        assert (out / name).is_file(), name
    model = load_model(run)
    assert_same_network(out, model)

    back = load_model(out)                                          # difflo.pretrained
    assert isinstance(back.net, pretrained.DiffusersUNet)
    torch.testing.assert_close(back.path.alphas_cumprod, model.path.alphas_cumprod, atol=1e-12, rtol=0)
    assert back.cfg.diffusion.prediction == model.cfg.diffusion.prediction
    m = model.cfg.model
    if m.num_classes:
        back.set_null_class(m.num_classes)
    assert back.num_classes == m.num_classes
    x = torch.randn(2, m.in_channels, m.image_size, m.image_size, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, max(m.num_classes - 1, 0)])
    w = 2.0 if m.num_classes else 1.0
    for t in (1, model.path.T // 2):
        with torch.no_grad():
            torch.testing.assert_close(make_denoiser(back, w, clip_x0=False)(x, t, y=y),
                                       make_denoiser(model, w, clip_x0=False)(x, t, y=y), atol=ATOL * 20, rtol=0)


@pytest.mark.slow
def test_pipeline_loads_and_samples_as_difflo(tmp_path):
    """DDPMPipeline.from_pretrained(OUT) of an unconditional model gives difflo's DDPM images from the same
    noise (one generator per image on both sides; leading spacing, where both chains end at t = 0; see
    tests/peer/test_pretrained_vs_diffusers.py)."""
    run = random_checkpoint(tmp_path / "run", *W32, "model.num_classes=0", "model.in_channels=3",
                            "model.image_size=8", "model.attn_resolutions=[4]", "diffusion.timesteps=100",
                            "diffusion.prediction=eps", "sample.spacing=leading", "sample.variance=fixed_large")
    export_mod.export(run, tmp_path / "out")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "out")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, DDPMScheduler)
    assert (pipe.scheduler.config.variance_type, pipe.scheduler.config.timestep_spacing) == ("fixed_large", "leading")
    ref = pipe(batch_size=len(SEEDS), generator=[torch.Generator().manual_seed(s) for s in SEEDS],
               num_inference_steps=10, output_type="pt").images
    model = load_model(run)
    x = generate(model, torch.zeros(len(SEEDS), dtype=torch.long), SEEDS, settings_for(model, sampler="ddpm", steps=10))
    err = ((x / 2 + 0.5).clamp(0, 1) - torch.as_tensor(ref)).abs().max().item()
    assert err < 1e-4, err


# ----------------------------------------------------------------------------- the scheduler
SCHEDULES = {"linear": ["diffusion.schedule=linear", "diffusion.beta_start=2e-4", "diffusion.beta_end=0.03"],
             "scaled_linear": ["diffusion.schedule=scaled_linear", "diffusion.beta_start=0.00085",
                               "diffusion.beta_end=0.012"],
             "cosine": ["diffusion.schedule=cosine"], "sigmoid": ["diffusion.schedule=sigmoid"],
             "explicit": ["diffusion.schedule=explicit",
                          "diffusion.betas=" + str(np.linspace(1e-4, 0.05, 100).tolist())]}


@pytest.mark.parametrize("overrides", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_scheduler_config_is_the_noise_schedule(overrides):
    """DDPMScheduler(scheduler_config) has difflo's alpha_bar (float32); difflo's cosine is diffusers'
    squaredcos_cap_v2 (betas bit-equal in float32), its sigmoid and explicit schedules are trained_betas; and
    difflo.pretrained reads the config back as the same schedule."""
    cfg = tiny_config("diffusion.timesteps=100", "sample.steps=10", "diffusion.prediction=x0", "sample.clip_x0=false",
                      "sample.spacing=linspace", "sample.variance=fixed_large", "diffusion.clip_range=2", *overrides)
    s = export_mod.scheduler_config(cfg)
    sched = DDPMScheduler.from_config(s)
    betas = schedules.get_betas(cfg.diffusion.schedule, 100, cfg.diffusion.beta_start, cfg.diffusion.beta_end,
                                cfg.diffusion.betas)
    if cfg.diffusion.schedule == "cosine":
        assert s["beta_schedule"] == "squaredcos_cap_v2" and torch.equal(sched.betas, betas.float())
    assert (s["trained_betas"] is not None) == (cfg.diffusion.schedule in ("sigmoid", "explicit"))
    path = make_path(cfg.diffusion)
    torch.testing.assert_close(sched.alphas_cumprod, path.alphas_cumprod.float(), atol=1e-6, rtol=1e-5)
    c = sched.config
    assert (c.prediction_type, c.clip_sample, c.clip_sample_range, c.timestep_spacing, c.variance_type,
            c.num_train_timesteps) == ("sample", False, 2.0, "linspace", "fixed_large", 100)
    again = pretrained.config_for({"sample_size": 28}, pretrained.scheduler_settings(dict(s), "x"), "x")
    torch.testing.assert_close(make_path(again.diffusion).alphas_cumprod, path.alphas_cumprod, atol=1e-15, rtol=0)
    assert (again.diffusion.prediction, again.sample.clip_x0, again.sample.spacing, again.sample.variance) == \
        ("x0", False, "linspace", "fixed_large")


# ----------------------------------------------------------------------------- the command line, round trip
@pytest.fixture(scope="module")
def run32(tmp_path_factory):
    """A class-conditional tiny model trained for 3 steps with widths 32 and 64 (exportable as a UNet2DModel),
    with an evaluation row in its metrics.csv."""
    from difflo.train import METRICS_FIELDS, append_metrics, eval_row, train

    run = tmp_path_factory.mktemp("run32")
    train(tiny_config(*W32, "train.steps=3", "train.ckpt_every=3", "diffusion.timesteps=100", "sample.steps=5"),
          run, log=lambda *a: None)
    assert (run / "metrics.csv").read_text().splitlines()[0] == ",".join(METRICS_FIELDS)
    append_metrics(run / "metrics.csv", eval_row(3, 1.0, {"fd_classifier": 123.456, "class_accuracy": 0.25}))
    return run


def card_command(card: str) -> list[str]:
    """The `difflo sample` command line of a model card, as argv (without `difflo`)."""
    line = next(ln for ln in card.splitlines() if ln.startswith("difflo sample --ckpt"))
    return line.split()[1:]


@pytest.mark.slow
def test_cli_round_trip(run32, tmp_path, monkeypatch):
    """`difflo export RUN OUT`; `difflo sample` with the card's command on OUT gives the run's own samples
    (uint8, at most one level apart: the two networks differ by float rounding); the card names the classes,
    the steps, the evaluation and the commands; its diffusers snippet runs."""
    out = tmp_path / "mnist-export"
    code, stdout, err = run_cli("export", run32, out)
    assert code == 0, err
    assert "a diffusers DDPMPipeline" in stdout and str(out) in stdout
    assert not list(tmp_path.glob(".*tmp*"))
    card = (out / "README.md").read_text()
    for needle in ("library_name: diffusers", "after 3 training steps", "| classes | 10",
                   "0: 0, 1: 1", "10: (null class", "mnist10k", "CC BY-SA 3.0", "| 3 | - | 123.4560 | 0.2500 |",
                   "--null-class 10", "UNet2DModel.from_pretrained"):
        assert needle in card, (needle, card)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    assert DDPMPipeline.from_pretrained(out).unet.config.num_class_embeds == 11

    argv = card_command(card)
    assert argv[argv.index("--ckpt") + 1] == out.name
    argv[argv.index("--ckpt") + 1] = str(out)
    argv[argv.index("--out") + 1] = str(tmp_path / "exported.npz")
    code, _, err = run_cli(*argv, "--n", "4", "--classes", "3,7")
    assert code == 0, err
    code, _, err = run_cli("sample", "--ckpt", run32, "--n", "4", "--classes", "3,7", "--out", tmp_path / "own.npz")
    assert code == 0, err
    a, b = (np.load(tmp_path / f)["images"].astype(int) for f in ("exported.npz", "own.npz"))
    assert a.shape == b.shape == (4, 28, 28, 1) and np.abs(a - b).max() <= 1

    model, back = load_model(run32), load_model(out)
    back.set_null_class(10)
    labels = torch.tensor([3, 7])
    ours, theirs = (generate(m, labels, SEEDS, settings_for(model)) for m in (model, back))
    assert (theirs - ours).abs().max().item() < 1e-4

    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(snippet, scope)                                            # the card's diffusers code, as written
    images = scope["images"]
    assert images.shape == (2, 1, 28, 28) and bool(((images >= 0) & (images <= 1)).all())


def test_eval_json_and_no_ema(run32, tmp_path):
    """--eval-json's scores are in the card; --no-ema exports the raw weights."""
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"fid": 12.345, "n": 500, "ref_n": 2000, "feature_extractor": "inception",
                              "class_accuracy": 0.875, "sampler": "ddpm", "steps": 25, "w": 2.0,
                              "ckpt": str(run32), "weights": "raw", "classifier_test_accuracy": 0.99}))
    code, _, err = run_cli("export", run32, tmp_path / "raw", "--no-ema", "--eval-json", ev)
    assert code == 0, err
    card = (tmp_path / "raw" / "README.md").read_text()
    assert "FID: 12.35" in card and "class accuracy" in card and "0.8750" in card and "raw (not EMA)" in card
    raw = load_model(run32, ema=False)
    assert_same_network(tmp_path / "raw", raw)


def test_difflo_layout_when_unet2dmodel_cannot_express_it(tiny_run, tmp_path):
    """tests/conftest's tiny model (widths 8 and 16: GroupNorms of 8, 16, 24 and 32 groups) has no UNet2DModel
    equivalent: OUT holds difflo's own weights file, the scheduler config and a card that says why and how to
    load it; `difflo sample --ckpt OUT/difflo/ema.safetensors` gives the run's own samples, bit for bit."""
    out = tmp_path / "tiny"
    code, stdout, err = run_cli("export", tiny_run, out)
    assert code == 0, err
    assert "not a UNet2DModel" in stdout and "norm_num_groups" in stdout
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == \
        ["README.md", "difflo/config.yaml", "difflo/ema.safetensors", "scheduler/scheduler_config.json"]
    card = (out / "README.md").read_text()
    assert "difflo sample --ckpt tiny/difflo/ema.safetensors --out grid.png" in card and "norm_num_groups" in card
    assert "library_name" not in card
    DDPMScheduler.from_pretrained(out / "scheduler")
    for name, ckpt in (("own", tiny_run), ("exported", out / "difflo" / "ema.safetensors"), ("folder", out / "difflo"),
                       ("out", out)):
        assert run_cli("sample", "--ckpt", ckpt, "--n", "3", "--steps", "3", "--out", tmp_path / f"{name}.npz")[0] == 0
    own = np.load(tmp_path / "own.npz")["images"]
    assert np.array_equal(own, np.load(tmp_path / "exported.npz")["images"])
    assert np.array_equal(own, np.load(tmp_path / "folder.npz")["images"])
    assert np.array_equal(own, np.load(tmp_path / "out.npz")["images"])          # --ckpt OUT finds OUT/difflo
    assert run_cli("export", tiny_run, tmp_path / "raw", "--no-ema")[0] == 0
    assert (tmp_path / "raw" / "difflo" / "model.safetensors").is_file()
    raw = checkpoint.list_checkpoints(tiny_run)[-1] / "model.safetensors"
    assert (tmp_path / "raw" / "difflo" / "model.safetensors").read_bytes() == raw.read_bytes()


def test_card_names_classes_and_data_licences(tmp_path):
    """An emoji model's card names its classes and carries the data set's licence and attribution lines."""
    run = random_checkpoint(tmp_path / "run", *W32, "data.name=emoji", "model.in_channels=3", "model.image_size=8",
                            "model.num_classes=2", "data.classes=[face-smiling,animal-amphibian]",
                            "model.attn_resolutions=[4]", "data.label=subcategory")
    res = export_mod.export(run, tmp_path / "emoji")
    card = (tmp_path / "emoji" / "README.md").read_text()
    assert res.layout == "diffusers"
    for needle in ("0: face-smiling, 1: animal-amphibian", "2: (null class", "8x8, 3 channels (RGB)",
                   "- label: subcategory", "- background: white", '"Twemoji by\n    Twitter, Inc and other contributors',
                   "Apache License 2.0", "after 7 training steps"):
        assert needle in card, (needle, card)
    mode = (tmp_path / "emoji" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mode & 0o777
    assert mode == (tmp_path / "emoji" / "unet" / "config.json").stat().st_mode & 0o777


@pytest.mark.parametrize("overrides", [["sample.sampler=ddim"], ["model.num_classes=0", "sample.sampler=ddpm",
                                                                    "sample.spacing=trailing"]],
                         ids=["conditional-ddim", "unconditional-ddpm-trailing"])
def test_card_code_blocks_are_whole(tmp_path, overrides):
    """Whatever the sampler and spacing, the card's code fences pair up and its diffusers code is Python (a
    conditional DDIM model's card used to end in a stray DDPMPipeline snippet, an unconditional trailing-DDPM
    one in an unclosed block)."""
    run = random_checkpoint(tmp_path / "run", *W32, *overrides)
    export_mod.export(run, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.count("```") % 2 == 0
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    compile(snippet, "card", "exec")
    assert ("DDPMPipeline.from_pretrained" in snippet) == ("model.num_classes=0" in overrides)
    assert ("With trailing spacing" in card) == ("sample.spacing=trailing" in overrides)


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_give_one_line(tiny_run, tmp_path):
    out = tmp_path / "out"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    a_file = tmp_path / "file"
    a_file.write_text("")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    src = checkpoint.list_checkpoints(tiny_run)[-1] / "ema.safetensors"
    state, cfg, meta = checkpoint.load_weights(src)
    cfg["diffusion"].update(objective="flow", prediction="u")
    cfg["sample"].update(sampler="euler")
    flow = tmp_path / "flow.safetensors"
    save_file(load_file(str(src)), str(flow), metadata={**meta, "config": json.dumps(cfg)})
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "hf")
    bad_json, no_scores = tmp_path / "bad.json", tmp_path / "none.json"
    bad_json.write_text("{nope")
    no_scores.write_text(json.dumps({"n": 3}))
    cases = [([tiny_run, busy], f"{busy} exists and is not empty: choose another OUT or remove it"),
             ([tiny_run, a_file], "exists and is a file: choose another OUT or remove it"),
             ([flow, out], "flow-matching model"),
             ([tmp_path / "missing", out], "not found"),
             ([junk, out], "not a readable safetensors"),
             ([tmp_path / "hf", out], "is a diffusers model folder already"),
             ([tiny_run, out, "--eval-json", bad_json], "is not valid JSON"),
             ([tiny_run, out, "--eval-json", tmp_path / "absent.json"], "cannot read"),
             ([tiny_run, out, "--eval-json", no_scores], "has no fid, fd_classifier or class_accuracy"),
             ([tiny_run], "OUT")]
    for args, needle in cases:
        assert_clean_error(*run_cli("export", *args)[::2], needle)
        assert not out.exists() and (busy / "x").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("export", tiny_run, empty)[0] == 0 and (empty / "README.md").is_file()   # an empty OUT is fine


def test_nothing_is_left_when_the_write_fails(tiny_run, tmp_path, monkeypatch):
    """A failure in the middle of the write (here: the weights copy) leaves neither OUT nor the temporary folder."""
    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", fail)
    code, _, err = run_cli("export", tiny_run, tmp_path / "out")
    assert_clean_error(code, err, "No space left on device")
    assert list(tmp_path.iterdir()) == []
