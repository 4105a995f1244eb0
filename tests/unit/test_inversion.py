"""DDIM inversion and interpolation (`difflo edit invert`, `difflo edit interpolate`; docs/editing.md)."""
import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_clean_error, run_cli, tiny_config
from difflo.edit import operators, techniques
from difflo.data import load_mnist10k
from difflo.diffusion import DiscreteSchedule
from difflo.flow import FlowPath
from difflo.model import load_model, make_denoiser
from difflo.generate import generate, settings_for
from difflo.train import train

FLOW = ["diffusion.objective=flow", "diffusion.prediction=u", "sample.sampler=euler", "sample.steps=4"]
STEPS = [5, 10, 20]


def _train(tmp_path_factory, name, *extra):
    """A tiny model trained 150 steps (~10 s): enough that its round trip is far better than chance."""
    run = tmp_path_factory.mktemp(name)
    return train(tiny_config(*extra, "train.steps=150", "train.lr=3e-3", "train.log_every=50",
                             "train.ckpt_every=150"), run, log=lambda *a: None, progress=False), run


@pytest.fixture(scope="module")
def diffusion_run(tmp_path_factory):
    return _train(tmp_path_factory, "inv_diffusion")[1]


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    return _train(tmp_path_factory, "inv_flow", *FLOW)[1]


@pytest.fixture(scope="module")
def digit():
    """A held-out mnist10k 3 (test split) in [-1, 1], (1, 1, 28, 28)."""
    ds = load_mnist10k("test")
    return ds.batch([int((ds.labels == 3).nonzero()[0][0])])[0]


def _opts(model, w=1.0):
    return techniques.EditOptions([0], techniques.ode_sampler(model), w, True, "fp32").check(model)


# ----------------------------------------------------------------------------- the numerical core
class GaussianDenoiser:
    """The exact denoiser of data ~ N(mu, s0^2) per pixel on a path: E[x0 | x_t]."""

    def __init__(self, path, mu=0.3, s0=0.5):
        self.path, self.mu, self.s0 = path, mu, s0

    def __call__(self, x, t, y=None):
        a, s = self.path.alpha_sigma(t)
        return self.mu + a * self.s0**2 / (a**2 * self.s0**2 + s**2) * (x - a * self.mu)


@pytest.mark.parametrize("path", [DiscreteSchedule.from_name("cosine", 1000), FlowPath()], ids=["diffusion", "flow"])
def test_round_trip_converges_with_the_exact_denoiser(path):
    """With the exact denoiser the round trip's only error is the discretisation: first order in the step."""
    den = GaussianDenoiser(path)
    x0 = 0.3 + 0.5 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    err = {}
    for n in (10, 100, 500):
        ts = path.sampling_times(n)
        back = operators.run_sampler("ddim", den, operators.ddim_invert(den, x0, ts), ts, None, None, None)
        err[n] = (back - x0).abs().max().item()
    assert err[100] < err[10] / 5 and err[500] < err[100] / 3 and err[500] < 0.02, err   # ~1/n


def test_flow_inversion_is_backward_euler():
    """On the flow path the DDIM-inverse update is the Euler step x += (t_next - t) u, u = eps_hat - x0_hat."""
    path = FlowPath()
    den = GaussianDenoiser(path)
    x0 = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ts = path.sampling_times(7)
    up = ts[::-1]
    x = x0.clone()
    for i, (t, t_next) in enumerate(zip(up[:-1], up[1:])):
        at = t_next if t == 0 else t                        # eps at the clean end: from the next time
        d = den(x, at)
        a, s = path.alpha_sigma(at)
        u = (x - a * d) / s - d                             # eps_hat - x0_hat
        x = x + (t_next - t) * u if t > 0 else (1 - t_next) * d + t_next * (x - a * d) / s
    torch.testing.assert_close(operators.ddim_invert(den, x0, ts), x)


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(3, 1, 28, 28, generator=g), torch.randn(3, 1, 28, 28, generator=g)
    assert torch.equal(operators.slerp(z0, z1, 0.0), z0) and torch.equal(operators.slerp(z0, z1, 1.0), z1)
    e0, e1 = torch.zeros(1, 5), torch.zeros(1, 5)
    e0[0, 0], e1[0, 3] = 1.0, 1.0                            # orthogonal unit vectors
    for a in (0.1, 0.25, 0.5, 0.9):
        mid = operators.slerp(e0, e1, a)
        assert abs(mid.norm().item() - 1.0) < 1e-6
        assert torch.allclose(mid[0, [0, 3]], torch.tensor([math.cos(a * math.pi / 2), math.sin(a * math.pi / 2)]))
    half = operators.slerp(z0, z1, 0.5)                         # Gaussian noises keep their norm, a linear mix does not
    assert (half.flatten(1).norm(dim=1) / z0.flatten(1).norm(dim=1) - 1).abs().max() < 0.1
    assert torch.allclose(operators.slerp(z0, 2 * z0, 0.5), 1.5 * z0)   # parallel: the linear fallback


@pytest.mark.slow
def test_class_weights_hook(diffusion_run):
    """One-hot class weights give exactly the labels' output; a mix is the mixed embedding (the UNet's hook)."""
    model = load_model(diffusion_run)
    net, k = model.net, model.num_classes
    x, time = torch.randn(3, 1, 28, 28), torch.tensor([10.0, 500.0, 900.0])
    y = torch.tensor([2, 7, k])
    with torch.no_grad():
        plain = net(x, time, y)
        assert torch.equal(net(x, time, None, class_weights=torch.eye(k + 1)[y]), plain)
        mixer = operators.ClassMixNet(net, k, operators.ClassMixNet.mix(k, 2, 7, [0.0, 1.0, 0.5]))
        y_mix = torch.tensor([mixer.label(0), mixer.label(1), k])
        assert torch.equal(mixer(x, time, y_mix), plain)           # a = 0, a = 1 and the null class: exact
        half = mixer(x, time, torch.tensor([mixer.label(2)] * 3))
        ref = copy.deepcopy(net)                                    # class 2's embedding replaced by the mix
        ref.class_emb.weight[2] = 0.5 * (net.class_emb.weight[2] + net.class_emb.weight[7])
        torch.testing.assert_close(half, ref(x, time, torch.full((3,), 2)), atol=1e-5, rtol=0)
        assert not torch.equal(half, plain)


# ----------------------------------------------------------------------------- trained tiny models
@pytest.mark.slow
@pytest.mark.parametrize("which", ["diffusion", "flow"])
def test_inversion_reconstructs(which, diffusion_run, flow_run, digit):
    """Inverting a held-out digit and sampling back beats sampling from random noise by far, and improves
    with the step count. Measured (150-step tiny models): diffusion 21.5 / 27.0 / 32.1 dB at 5 / 10 / 20
    steps, flow 32.0 / 36.1 / 40.9 dB, random noise 8.4-8.7 dB."""
    model = load_model(diffusion_run if which == "diffusion" else flow_run)
    res = techniques.invert(model, _opts(model), digit, 3, STEPS)
    m = res.metrics
    psnr = [m[f"psnr_{n}"] for n in STEPS]
    assert psnr == sorted(psnr), m
    assert psnr[-1] > (28.0 if which == "diffusion" else 35.0), m
    assert all(m[f"psnr_random_{n}"] < 12.0 for n in STEPS), m
    assert psnr[0] > m[f"psnr_random_{STEPS[0]}"] + 10, m
    assert res.results.shape == (len(STEPS), 1, 28, 28) and len(res.grid) == len(STEPS)


@pytest.mark.slow
def test_inversion_with_guidance_is_measured(diffusion_run, digit):
    model = load_model(diffusion_run)
    res = techniques.invert(model, _opts(model, w=3.0), digit, 3, [5, 10])
    assert {"psnr_5", "psnr_10", "psnr_5_w1", "psnr_10_w1"} <= set(res.metrics)
    assert res.metrics["psnr_5_w1"] == techniques.invert(model, _opts(model), digit, 3, [5]).metrics["psnr_5"]
    assert any("inexact" in n and "w=3" in n for n in res.notes)
    assert len(res.grid) == 4 and res.results.shape[0] == 4


@pytest.mark.slow
def test_interpolation_ends(diffusion_run, digit):
    """Seed ends: frames 0 and K-1 are exactly `difflo sample`'s images of those seeds and classes; image ends:
    frame 0 is invert's reconstruction."""
    model = load_model(diffusion_run)
    ts = techniques.time_grid(model, steps=6)
    opts = _opts(model, w=2.0)
    res = techniques.interpolate(model, opts, 4, 9, 1, 8, 5, ts)
    s = settings_for(model, sampler="ddim", steps=6, w=2.0)
    assert torch.allclose(res.results[0], generate(model, torch.tensor([1]), [4], s)[0], atol=1e-6)
    assert torch.allclose(res.results[4], generate(model, torch.tensor([8]), [9], s)[0], atol=1e-6)
    assert not torch.allclose(res.results[2], res.results[0], atol=1e-2)
    res = techniques.interpolate(model, _opts(model), digit, 9, 3, None, 3, ts)
    rec = techniques.invert(model, _opts(model), digit, 3, [6])
    assert torch.allclose(res.results[0], rec.results[0], atol=1e-6)
    assert res.metrics["psnr_a"] == pytest.approx(rec.metrics["psnr_6"], abs=1e-3)


@pytest.mark.slow
def test_cli_round_trip(diffusion_run, tmp_path, digit):
    img = tmp_path / "three.png"
    Image.fromarray(((digit[0, 0].numpy() + 1) * 127.5).round().astype(np.uint8), "L").save(img)
    ck = ["--ckpt", str(diffusion_run)]
    code, out, err = run_cli("edit", "invert", *ck, "--image", img, "--class", "3", "--steps", "4,8",
                             "--w", "2", "--out", tmp_path / "inv", "--figure", tmp_path / "inv.png")
    assert code == 0, err
    assert "inexact" in out and "dB at 4 steps" in out
    raw = np.load(tmp_path / "inv" / "raw.npz")
    assert {"input", "recon_4", "recon_8", "noise_4", "recon_4_w1"} <= set(raw.files)
    assert (tmp_path / "inv.png").exists() and (tmp_path / "inv" / "result_03.png").exists()
    for argv in (["--seed-a", "1", "--seed-b", "2", "--class-a", "3", "--class-b", "8"],
                 ["--image-a", img, "--seed-b", "5", "--class-a", "3"]):
        out_dir = tmp_path / f"int{len(argv)}"
        code, out, err = run_cli("edit", "interpolate", *ck, *argv, "--frames", "4", "--steps", "4", "--out", out_dir)
        assert code == 0, err
        assert [p.name for p in sorted(out_dir.glob("result_*.png"))] == [f"result_{i:02d}.png" for i in range(4)]
        assert (out_dir / "figure.png").exists() and np.load(out_dir / "raw.npz")["frames"].shape == (4, 28, 28, 1)
    assert "frame 0 reconstructs image A" in out


@pytest.mark.slow
def test_cli_errors_are_one_line(diffusion_run, tmp_path):
    ck = ["--ckpt", str(diffusion_run), "--out", str(tmp_path / "o")]
    img = tmp_path / "d.png"
    Image.new("L", (28, 28), 0).save(img)
    cases = [(["invert", "--image", tmp_path / "missing.png", "--class", "3"], "not found"),
             (["invert", "--image", img, "--class", "3", "--steps", "0"], "--steps must be >= 1"),
             (["invert", "--image", img, "--class", "3", "--steps", "10,2000"], "exceeds"),
             (["invert", "--image", img, "--class", "3", "--steps", "10,x"], "comma-separated"),
             (["invert", "--image", img, "--class", "eleven"], "no class 'eleven' in --class"),
             (["interpolate", "--seed-b", "1"], "one of the arguments --image-a --seed-a is required"),
             (["interpolate", "--seed-a", "1", "--image-a", img, "--seed-b", "2"], "not allowed with"),
             (["interpolate", "--seed-a", "1", "--seed-b", "2", "--frames", "1"], "--frames must be >= 2"),
             (["interpolate", "--seed-a", "1", "--seed-b", "2", "--class-b", "10"], "out of range in --class-b"),
             (["interpolate", "--image-a", tmp_path / "nope.png", "--seed-b", "2"], "not found")]
    for argv, msg in cases:
        code, _, err = run_cli("edit", *argv, *ck)
        assert_clean_error(code, err, msg)
