"""A class-conditional ``difflo export`` (a diffusers UNet2DModel with num_class_embeds = num_classes + 1)
in every front end: ``difflo sample``, every ``difflo edit`` technique (interpolation's class-embedding mixes
included), the web page's App and ``eval``, read back with its null class and class names from the folder's
``difflo/config.yaml`` (no --null-class), each equal to the same on the original run at fp32; a plain
diffusers folder (the same export without difflo/config.yaml) with an explicit --null-class; and a bad
--null-class or config.yaml is one line. The model is tiny and random (every weight perturbed, so that each
class embedding and the null class matter)."""
from __future__ import annotations

import re
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_clean_error, run_cli, tiny_config
from difflo import checkpoint, cli, pretrained
from difflo.edit import operators
from difflo.cli import edit as edit_cli
from difflo.errors import DiffloError
from difflo.model import load_model, make_denoiser
from difflo.nn import UNet
from difflo.generate import generate, settings_for
from difflo.serve.app import App

pytest.importorskip("diffusers")

# Measured on CPU in float32 (the largest |difference| between the run and its export over the cases of
# each test, values of size ~1-3): network outputs and one guided denoiser step 2.6e-6; class-embedding
# mixes 2.3e-6; guided samples 5.1e-6; every edit technique's images 6.4e-6. The two networks are the same
# layers on the same weights; what differs is summation order (SDPA, linear layers vs 1x1 convs).
ATOL = 2e-5
NAMES = ["cat", "dog", "fox"]
CFG = ["model.channels=32", "model.channel_mult=[1,2]", "model.in_channels=3", "model.image_size=8",
       "model.attn_resolutions=[4]", "model.num_classes=3", f"data.classes=[{','.join(NAMES)}]",
       "diffusion.timesteps=100", "sample.steps=5", "sample.w=2"]    # widths 32, 64: a UNet2DModel


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(the run, its `difflo export`, the export without difflo/config.yaml: a plain diffusers folder)."""
    root = tmp_path_factory.mktemp("export_frontends")
    cfg = tiny_config(*CFG)
    cfg.validate()
    torch.manual_seed(0)
    net = UNet(cfg.model)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = net.state_dict()
    run = root / "run"
    checkpoint.save_checkpoint(run, 7, cfg.to_dict(), state, state, {"step": 7})
    out = root / "export"
    code, stdout, err = run_cli("export", run, out)
    assert code == 0 and "a diffusers DDPMPipeline" in stdout, err
    plain = root / "plain"
    shutil.copytree(out, plain)
    (plain / "difflo" / "config.yaml").unlink()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "in.png")
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (0, 0, 4, 8))
    mask.save(root / "mask.png")
    return run, out, plain


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------- the folder read back
def test_export_names_its_null_class_and_classes(pair):
    """The export reads back with num_classes 3, the null class 3 and the run's class names (a plain folder:
    4 classes named by index, no null class); --null-class overrides; one guided denoiser step = the run's."""
    run, out, plain = pair
    own, back = load_model(run), load_model(out)
    assert isinstance(back.net, pretrained.DiffusersUNet) and back.net.null_class == 3
    assert (back.num_classes, back.class_names, back.has_null_class) == (3, tuple(NAMES), True)
    bare = load_model(plain)
    assert (bare.num_classes, bare.class_names, bare.has_null_class) == (4, ("0", "1", "2", "3"), False)
    assert load_model(out, null_class=3).class_names == tuple(NAMES)
    other = load_model(out, null_class=0)                            # not the last: every embedding is a class
    assert (other.num_classes, other.net.null_class, other.class_names) == (4, 0, ("0", "1", "2", "3"))
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2, 3])                                      # the null class too
    with torch.no_grad():
        assert max_diff(back.net(x, torch.full((3,), 40.0), y), own.net(x, torch.full((3,), 40.0), y)) < ATOL
        y = torch.tensor([0, 2, 1])
        assert max_diff(make_denoiser(back, 2.0)(x, 40, y=y), make_denoiser(own, 2.0)(x, 40, y=y)) < ATOL


def test_class_weights_mix_embeddings(pair):
    """DiffusersUNet(class_weights): one-hot rows give exactly the labels' output (the null row too, moved
    to the model's null class); a mix equals difflo's UNet with the same weights; the null row without a
    known null class is one line."""
    run, out, plain = pair
    own, back = load_model(run), load_model(out)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.full((4,), 70.0)
    eye = torch.eye(4)
    mixes = torch.tensor([[0.5, 0.5, 0, 0], [0.2, 0, 0.8, 0], [0, 0.3, 0, 0.7], [0.25, 0.25, 0.25, 0.25]])
    with torch.no_grad():
        assert torch.equal(back.net(x, t, None, class_weights=eye), back.net(x, t, torch.arange(4)))
        assert max_diff(back.net(x, t, None, class_weights=mixes), own.net(x, t, None, class_weights=mixes)) < ATOL
        assert not torch.equal(back.net(x, t, None, class_weights=mixes), back.net(x, t, torch.arange(4)))
        mixer = operators.ClassMixNet(back.net, 3, mixes)
        assert torch.equal(mixer(x, t, torch.tensor([4, 5, 6, 7])), back.net(x, t, None, class_weights=mixes))
        other = load_model(out, null_class=0)                    # null class 0: difflo's null row -> row 0
        weights5 = torch.zeros(1, 5)
        weights5[0, 4] = 1.0
        assert torch.equal(other.net(x[:1], t[:1], None, class_weights=weights5),
                           other.net(x[:1], t[:1], torch.tensor([4])))
        assert torch.equal(other.net(x[:1], t[:1], torch.tensor([4])), other.net(x[:1], t[:1], torch.tensor([0])))
        bare = load_model(plain)
        bare.net(x[:1], t[:1], None, class_weights=torch.tensor([[0.5, 0.5, 0, 0, 0]]))     # no null weight: fine
        with pytest.raises(DiffloError, match="--null-class K"):
            bare.net(x[:1], t[:1], None, class_weights=torch.tensor([[0.5, 0, 0, 0, 0.5]]))
        with pytest.raises(DiffloError, match="shape"):
            back.net(x[:1], t[:1], None, class_weights=torch.ones(1, 3))


# ----------------------------------------------------------------------------- difflo sample
@pytest.mark.slow
def test_sample(pair, tmp_path):
    """Guided samples (w = 2, the run's default) from the export = the run's, with no --null-class; the
    command line takes class names and writes the same images (uint8, at most one level apart)."""
    run, out, _ = pair
    own, back = load_model(run), load_model(out)
    labels, seeds = torch.tensor([0, 2, 1]), [5, 6, 7]
    for sampler in ("ddpm", "ddim"):
        a, b = (generate(m, labels, seeds, settings_for(m, sampler=sampler, steps=5, w=2.0, precision="fp32"))
                for m in (own, back))
        assert max_diff(a, b) < ATOL
    for name, ckpt in (("own", run), ("export", out)):
        code, stdout, err = run_cli("sample", "--ckpt", ckpt, "--classes", "fox,cat", "--n", "4", "--w", "3",
                                    "--sampler", "ddpm", "--steps", "5", "--precision", "fp32",
                                    "--out", tmp_path / f"{name}.npz")
        assert code == 0, err
    a, b = (np.load(tmp_path / f"{n}.npz")["images"].astype(int) for n in ("own", "export"))
    assert a.shape == (4, 8, 8, 3) and np.abs(a - b).max() <= 1


# ----------------------------------------------------------------------------- difflo edit
def cli_techniques() -> list[str]:
    """The techniques `difflo edit` offers, from its own parser (the choices its usage error lists)."""
    code, _, err = run_cli("edit", "no-such-technique")
    assert code == 2
    listed = re.search(r"choose from (.*?)\)", err).group(1)
    return [name.strip(" '") for name in listed.split(",")]


def technique_args(root) -> dict[str, list[str]]:
    """Small, fast arguments for each technique (classes by name: the export must know them)."""
    img, mask = str(root / "in.png"), str(root / "mask.png")
    return {"forward": ["--class", "dog", "--t", "20,60"],
            "denoise": ["--image", img, "--class", "fox", "--w", "2", "--stride", "20", "--i-start", "2"],
            "sdedit": ["--image", img, "--class", "fox", "--stride", "20", "--levels", "1,3"],
            "inpaint": ["--image", img, "--mask", mask, "--class", "cat", "--steps", "4", "--jump-length", "2",
                        "--jump-n-sample", "2"],
            "anagram": ["--a", "cat", "--b", "dog", "--steps", "4"],
            "hybrid": ["--low", "cat", "--high", "fox", "--steps", "4", "--kernel-size", "3", "--sigma", "1"],
            "invert": ["--image", img, "--class", "dog", "--steps", "4,8"],
            "interpolate": ["--seed-a", "1", "--seed-b", "2", "--class-a", "cat", "--class-b", "fox", "--frames",
                            "4", "--steps", "4", "--w", "2"]}


def run_edit(technique: str, ckpt, extra: list) -> dict[str, torch.Tensor]:
    """`difflo edit TECHNIQUE --ckpt CKPT ...` as the command runs it, but returning the images as float."""
    args = cli.build_parser().parse_args(["edit", technique, "--ckpt", str(ckpt), "--out", "unused",
                                          "--precision", "fp32", *map(str, extra)])
    model = load_model(args.ckpt, ema=args.ema, null_class=args.null_class)
    return edit_cli.run_technique(args, model).raw


@pytest.mark.slow
def test_every_edit_technique(pair):
    """Every technique of `difflo edit`, at its default guidance (w = 3 unless given), from the export (no
    --null-class) = from the run; interpolation mixes the two classes' embeddings and also runs
    unconditionally (the null class) and between two image ends."""
    run, out, _ = pair
    cases = technique_args(run.parent)
    assert sorted(cases) == sorted(cli_techniques())               # a new technique needs a case here
    cases = [(t, a) for t, a in cases.items()] + [
        ("interpolate", ["--seed-a", "3", "--seed-b", "4", "--frames", "3", "--steps", "4", "--w", "2"]),
        ("interpolate", ["--image-a", run.parent / "in.png", "--seed-b", "4", "--class-a", "dog", "--frames", "3",
                         "--steps", "4"])]
    for technique, extra in cases:
        own, back = run_edit(technique, run, extra), run_edit(technique, out, extra)
        assert sorted(own) == sorted(back) and own
        for name in own:
            assert max_diff(own[name], back[name]) < ATOL, (technique, name, max_diff(own[name], back[name]))


def test_edit_command_line(pair, tmp_path):
    """`difflo edit` on the export at its default w = 3 (guidance) runs and writes the run's result; on the
    plain folder it needs --null-class (one line), with which it equals the export's, bit for bit."""
    run, out, plain = pair
    names, indices = (["anagram", "--a", a, "--b", b, "--steps", "3", "--precision", "fp32"]
                      for a, b in (("dog", "fox"), ("1", "2")))          # the plain folder has no names
    for name, ckpt, argv in (("own", run, names), ("export", out, names),
                             ("plain", plain, indices + ["--null-class", "3"])):
        code, stdout, err = run_cli("edit", *argv, "--ckpt", ckpt, "--out", tmp_path / name)
        assert code == 0, err
    a, b = (np.asarray(Image.open(tmp_path / n / "result_00.png")).astype(int) for n in ("own", "export"))
    assert np.abs(a - b).max() <= 1
    assert (tmp_path / "plain" / "result_00.png").read_bytes() == (tmp_path / "export" / "result_00.png").read_bytes()
    assert_clean_error(*run_cli("edit", *indices, "--ckpt", plain, "--out", tmp_path / "x")[::2], "--null-class K")


# ----------------------------------------------------------------------------- difflo serve
def finish(job, timeout=120):
    t0 = time.time()
    while job.status in ("queued", "running"):
        assert time.time() - t0 < timeout
        time.sleep(0.02)
    assert job.status == "done", job.error
    return job


@pytest.mark.slow
def test_serve(pair, tmp_path):
    """The page's classes are the run's (names, no null class) from the export, and from the plain folder
    with --null-class 3 (indices); a guided sample job gives the run's images, and the command the page
    shows for the plain folder carries --null-class and reproduces the job."""
    run, out, plain = pair
    apps = {"own": App(run, device="cpu", jobs_root=tmp_path / "j1"),
            "export": App(out, device="cpu", jobs_root=tmp_path / "j2"),
            "plain": App(plain, device="cpu", jobs_root=tmp_path / "j3", null_class=3)}
    for a in apps.values():
        a.model.cfg.sample.precision = "fp32"        # the page has no precision field: pin the default to fp32
    try:
        info = {k: a.info() for k, a in apps.items()}
        assert info["own"]["class_names"] == info["export"]["class_names"] == NAMES
        assert info["export"]["num_classes"] == info["plain"]["num_classes"] == 3
        assert info["plain"]["class_names"] == ["0", "1", "2"]
        body = {"n": 2, "steps": 4, "sampler": "ddim", "seed": 3, "w": 2.5}
        jobs = {k: finish(a.submit_sample(body)) for k, a in apps.items()}
        images = {k: np.load(j.dir / "samples.npz")["images"].astype(int) for k, j in jobs.items()}
        assert images["own"].shape == (6, 8, 8, 3)
        assert np.abs(images["own"] - images["export"]).max() <= 1
        assert np.array_equal(images["export"], images["plain"])
        assert "--null-class" not in jobs["export"].result["command"]
        command = jobs["plain"].result["command"].splitlines()[1].split()
        assert command[command.index("--ckpt") + 1:command.index("--ckpt") + 4] == \
            [apps["plain"].ckpt_arg, "--null-class", "3"]
        command[command.index("--out") + 1] = str(tmp_path / "again.npz")
        assert cli.main(command[1:] + ["--precision", "fp32"]) == 0
        assert np.array_equal(np.load(tmp_path / "again.npz")["images"], images["plain"])
        edit = finish(apps["plain"].submit_edit({"technique": "hybrid", "low": 0, "high": 2, "steps": 3}))
        assert "--null-class 3" in edit.result["command"]
    finally:
        for a in apps.values():
            a.close()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.slow
def test_bad_null_class_and_config_give_one_line(pair, tmp_path):
    run, out, plain = pair
    anagram = ["anagram", "--a", "0", "--b", "1", "--steps", "2", "--out", tmp_path / "x"]
    for cmd, needle in (([*anagram, "--ckpt", plain, "--null-class", "4"], "--null-class 4 out of range"),
                        ([*anagram, "--ckpt", plain, "--null-class", "x"], "--null-class"),
                        ([*anagram, "--ckpt", plain, "--null-class", "-1"], "--null-class"),
                        ([*anagram, "--ckpt", run, "--null-class", "2"], "difflo-trained model's null class is")):
        assert_clean_error(*run_cli("edit", *cmd)[::2], needle)
    assert_clean_error(*run_cli("serve", "--ckpt", plain, "--null-class", "9", "--port", "0")[::2], "out of range")
    assert_clean_error(*run_cli("eval", "nll", "--ckpt", plain, "--null-class", "9")[::2], "out of range")
    assert_clean_error(*run_cli("sample", "--ckpt", plain, "--null-class", "5", "--out", tmp_path / "g.png")[::2],
                       "out of range")
    wrong = tmp_path / "wrong"
    shutil.copytree(out, wrong)
    own_config = wrong / "difflo" / "config.yaml"
    own_config.write_text(own_config.read_text().replace("num_classes: 3", "num_classes: 5"))
    assert_clean_error(*run_cli("sample", "--ckpt", wrong, "--out", tmp_path / "g.png")[::2],
                       "model.num_classes = 5 does not fit", "num_class_embeds = 4")
    own_config.write_text("model: [unclosed")
    assert_clean_error(*run_cli("sample", "--ckpt", wrong, "--out", tmp_path / "g.png")[::2],
                       "is not a readable difflo config")
