"""EDM (Karras et al. 2022) as a difflo objective: Table 1's preconditioning and loss, Eq. 5's grid, the
exact-Gaussian check of Heun (Algorithm 1) on the variance-exploding path, a tiny run through the command
line, and the one-line refusals."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import TINY, assert_clean_error, run_cli, tiny_config
from samplers_common import MU, S, affine_chain_moments
from difflo import config as config_mod
from difflo.config import DiffusionConfig
from difflo.edm import DEFAULTS, EDMPath
from difflo.errors import ConfigError
from difflo.guidance import ModelDenoiser
from difflo.noise_paths import PATHS, make_path, missing_members, samplers_for
from difflo.samplers import sample_euler, sample_heun

PATH = EDMPath()
SD = 0.5
SIGMAS = [0.002, 0.05, 0.5, 1.0, 7.3, 80.0]
EDM = ["diffusion.objective=edm", "diffusion.prediction=edm", "diffusion.t_sampling=log_normal",
       "sample.sampler=heun", "sample.spacing=karras"]


def test_registered_with_every_member():
    assert PATHS["edm"] is EDMPath and missing_members(EDMPath) == [] and missing_members(PATH) == []
    d = DiffusionConfig(objective="edm", prediction="edm", t_sampling="log_normal")
    assert isinstance(make_path(d), EDMPath) and EDMPath.describe(d) == "edm, sigma_data 0.5, edm-prediction"
    assert DEFAULTS == {"sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2, "sigma_min": 0.002, "sigma_max": 80.0,
                        "rho": 7.0}
    assert all(getattr(DiffusionConfig(), k) == v for k, v in DEFAULTS.items())
    assert "ddpm" not in samplers_for("edm") and {"euler", "heun", "ddim", "dpmpp"} <= set(samplers_for("edm"))


@pytest.mark.parametrize("sigma", SIGMAS)
def test_coefficients_are_table_1(sigma):
    """c_skip, c_out, c_in, c_noise and lambda as written in Table 1 ("Ours"), for floats and tensors."""
    assert PATH.c_skip(sigma) == pytest.approx(SD**2 / (sigma**2 + SD**2), rel=1e-14)
    assert PATH.c_out(sigma) == pytest.approx(sigma * SD / math.sqrt(SD**2 + sigma**2), rel=1e-14)
    assert PATH.c_in(sigma) == pytest.approx(1 / math.sqrt(sigma**2 + SD**2), rel=1e-14)
    assert PATH.c_noise(sigma) == pytest.approx(math.log(sigma) / 4, rel=1e-14)
    assert PATH.loss_weight(sigma) * PATH.c_out(sigma) ** 2 == pytest.approx(1.0, rel=1e-12)   # unit weight on F
    t = torch.tensor([sigma], dtype=torch.float64)
    for c in ("c_skip", "c_out", "c_in", "c_noise", "loss_weight"):
        assert getattr(PATH, c)(t).item() == pytest.approx(getattr(PATH, c)(sigma), rel=1e-14)
    assert PATH.model_time(t).item() == pytest.approx(250 * math.log(sigma), rel=1e-6)      # 1000 c_noise


@pytest.mark.parametrize("sigma", SIGMAS)
def test_effective_target_and_input_have_unit_variance(sigma):
    """For data of std sigma_data the network's input c_in x and its target (x0 - c_skip x) / c_out both have
    variance 1 at every noise level (Eq. 8 and App. B.6), checked on 200k samples."""
    g = torch.Generator().manual_seed(0)
    x0 = SD * torch.randn(200_000, generator=g, dtype=torch.float64)
    x = x0 + sigma * torch.randn(200_000, generator=g, dtype=torch.float64)
    target = (x0 - PATH.c_skip(sigma) * x) / PATH.c_out(sigma)
    assert target.var().item() == pytest.approx(1.0, abs=0.01)
    assert (PATH.c_in(sigma) * x).var().item() == pytest.approx(1.0, abs=0.01)


def test_path_is_variance_exploding():
    assert PATH.alpha_sigma(2.5) == (1.0, 2.5) and PATH.alpha_sigma(PATH.t_clean) == (1.0, 0.0)
    t = torch.tensor([0.1, 3.0], dtype=torch.float64)
    a, s = PATH.alpha_sigma(t)
    assert torch.equal(a, torch.ones(2, dtype=torch.float64)) and torch.equal(s, t)
    assert PATH.d_alpha_sigma(1.0) == (0.0, 1.0) and PATH.time_at_nsr(4.0) == 4.0
    assert PATH.prior_std == 80.0 and EDMPath(sigma_max=20.0).prior_std == 20.0


@pytest.mark.parametrize("n", [1, 2, 18, 32])
def test_grid_is_eq_5_then_zero(n):
    ts = PATH.sampling_times(n)
    assert len(ts) == n + 1 and ts[-1] == 0.0 and ts[0] == 80.0
    hi, lo = 80.0 ** (1 / 7), 0.002 ** (1 / 7)
    want = [(hi + i / (n - 1) * (lo - hi)) ** 7 for i in range(n)] if n > 1 else [80.0]
    np.testing.assert_allclose(ts[:-1], want, rtol=1e-12)
    if n > 1:
        assert ts[-2] == 0.002
    assert all(a > b for a, b in zip(ts[:-1], ts[1:]))                               # monotone, noise to data
    ex = PATH.sampling_times(n, "exponential")
    assert ex[0] == 80.0 and ex[-1] == 0.0 and all(a > b for a, b in zip(ex[:-1], ex[1:]))
    assert EDMPath(sigma_min=0.01, sigma_max=10.0, rho=3.0).sampling_times(3)[:-1] == pytest.approx(
        [10.0, ((10 ** (1 / 3) + 0.01 ** (1 / 3)) / 2) ** 3, 0.01], rel=1e-12)


def test_grid_refuses_timestep_settings():
    with pytest.raises(ValueError, match="does not apply to EDM models"):
        PATH.sampling_times(10, "trailing")
    with pytest.raises(ValueError, match="settings of diffusion timestep grids"):
        PATH.sampling_times(10, "karras", step_rule="stride")
    with pytest.raises(ValueError, match=">= 1"):
        PATH.sampling_times(0)


def test_cli_times_follow_the_ramp():
    assert PATH.time_from_cli(1000) == pytest.approx(80.0) and PATH.time_from_cli(1e-9) == pytest.approx(0.002)
    assert PATH.ramp_sigma(0.5) == pytest.approx(((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7)
    with pytest.raises(ValueError, match="out of range"):
        PATH.time_from_cli(0)
    st = PATH.strided_times(250)
    assert st[-1] == 0.0 and st[0] == pytest.approx(80.0) and len(st) == 5 and st == sorted(st, reverse=True)


class Recorder(torch.nn.Module):
    """F = tanh(w x + b + time / 1000), per pixel, with trainable w and b; records what it was given."""

    def __init__(self):
        super().__init__()
        self.w, self.b = torch.nn.Parameter(torch.tensor(0.7)), torch.nn.Parameter(torch.tensor(-0.2))
        self.seen = []

    def forward(self, x, time, y=None):
        self.seen.append((x.detach().clone(), time.detach().clone()))
        return torch.tanh(self.w * x + self.b + time.view(-1, 1, 1, 1) / 1000)


def test_denoiser_is_the_preconditioned_d():
    """ModelDenoiser on the EDM path gives the network c_in x and 1000 c_noise and returns D = c_skip x + c_out F,
    for one time and for per-sample times."""
    torch.manual_seed(0)
    net = Recorder()
    den = ModelDenoiser(net, PATH, "edm")
    x = 3 * torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        d = den(x, 3.0)
        x_in, time = net.seen[-1]
        assert torch.allclose(x_in, x / math.sqrt(9 + SD**2), rtol=1e-6, atol=0)
        assert torch.allclose(time, torch.full((2,), 250 * math.log(3.0)), rtol=1e-6, atol=0)
        assert torch.allclose(d, PATH.c_skip(3.0) * x + PATH.c_out(3.0) * net(x_in, time), rtol=1e-6, atol=1e-7)
        per = den(x, torch.tensor([3.0, 0.2], dtype=torch.float64))
    assert torch.allclose(per[0], d[0], rtol=1e-6, atol=1e-7) and not torch.allclose(per[1], d[1])
    with pytest.raises(ValueError, match="predicts edm, not 'v'"):
        ModelDenoiser(net, PATH, "v")(x, 1.0)


def test_training_loss_is_edm_loss():
    """The loss equals lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2 averaged, with sigma log-normal and the draws
    of the step's generator (sigma first, then the noise); rows take their share of the same draws."""
    torch.manual_seed(0)
    net = Recorder()
    x0 = torch.rand(6, 1, 4, 4) * 2 - 1
    y = torch.zeros(6, dtype=torch.long)
    d = DiffusionConfig(objective="edm", prediction="edm", t_sampling="log_normal")
    loss = PATH.training_loss(net, x0, y, d, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(6, generator=g, dtype=torch.float64))
    n = torch.randn(x0.shape, generator=g)
    den = ModelDenoiser(net, PATH, "edm")
    x = x0 + sigma.float().view(-1, 1, 1, 1) * n
    with torch.no_grad():
        D = den(x, sigma)
    want = (PATH.loss_weight(sigma).view(-1, 1, 1, 1) * (D.double() - x0.double()) ** 2).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    part = PATH.training_loss(net, x0, y, d, torch.Generator().manual_seed(3), rows=slice(2, 4))
    lam = PATH.loss_weight(sigma[2:4]).view(-1, 1, 1, 1)
    assert part.item() == pytest.approx((lam * (D[2:4].double() - x0[2:4].double()) ** 2).mean().item(), rel=1e-4)
    s = PATH.sample_sigma(100_000, torch.Generator().manual_seed(1)).log()
    assert s.mean().item() == pytest.approx(-1.2, abs=0.02) and s.std().item() == pytest.approx(1.2, abs=0.02)


def exact_endpoint(sigma_max: float):
    """The probability-flow ODE's exact endpoint moments from x = sigma_max z for x0 ~ N(mu, s^2): the flow map is
    x0 = mu + s / sqrt(s^2 + sigma^2) (x - mu), so mean mu (1 - s / r) and variance s^2 sigma_max^2 / r^2 with
    r^2 = s^2 + sigma_max^2."""
    mu, s = MU[0, 0].double(), S[0, 0].double()
    r = (s**2 + sigma_max**2).sqrt()
    return mu * (1 - s / r), s**2 * sigma_max**2 / r**2


def test_heun_reproduces_gaussian_data():
    """EDM's Algorithm 1 (difflo's heun) with the exact denoiser on Karras' grid: the chain's moments (exact, no
    sampling) reach the ODE's own, second order in the steps (measured: variance 4.2 % off at 32 steps, 0.95 % at
    64; Euler 19 % at 32), and the data's mean within the prior's bias (|mu| s / sigma_max <= 0.019)."""
    m_ode, v_ode = exact_endpoint(80.0)
    errors = {}
    for n in (32, 64):
        mean, var = affine_chain_moments(sample_heun, PATH, PATH.sampling_times(n))
        assert (mean - m_ode).abs().max().item() < 1e-3
        assert (mean - MU[0, 0].double()).abs().max().item() < 0.02
        errors[n] = (var / v_ode - 1).abs().max().item()
    assert errors[32] < 0.05 and errors[64] < 0.012 and errors[64] < errors[32] / 3        # second order
    assert (v_ode / S[0, 0].double() ** 2 - 1).abs().max().item() < 4e-4                    # the ODE's is the data's
    _, euler_var = affine_chain_moments(sample_euler, PATH, PATH.sampling_times(32))       # first order: worse
    assert (euler_var / v_ode - 1).abs().max().item() > 3 * errors[32]


def test_config_refusals_are_one_line_each():
    def problems(*over):
        with pytest.raises(ConfigError) as e:
            config_mod.load(None, list(over)).validate()
        return str(e.value)

    assert "diffusion.sigma_data=0.3: read only with diffusion.objective=edm" in problems("diffusion.sigma_data=0.3")
    msg = problems(*EDM, "diffusion.prediction=v")
    assert "diffusion.prediction='v' is not one of edm for diffusion.objective=edm" in msg and msg.count(";") == 0
    assert "sample.sampler='ddpm' is not one of" in problems(*EDM, "sample.sampler=ddpm")
    assert "sample.spacing=trailing does not apply to objective edm" in problems(*EDM, "sample.spacing=trailing")
    assert "0 < sigma_min < sigma_max" in problems(*EDM, "diffusion.sigma_min=90")
    assert "must be > 0" in problems(*EDM, "diffusion.sigma_data=0")
    assert "diffusion.prediction='edm' is not one of eps, x0, v" in problems("diffusion.prediction=edm")
    config_mod.load(None, EDM + ["diffusion.sigma_data=0.3", "diffusion.rho=5"]).validate()


@pytest.mark.slow
def test_tiny_run_trains_samples_and_refuses_export(tmp_path):
    """4 training steps and a sample grid through the command line; export to diffusers refused in one line."""
    run = tmp_path / "run"
    code, out, err = run_cli("train", *TINY, *EDM, "train.steps=4", "train.ckpt_every=4", "--out", run)
    assert code == 0, err
    npz = tmp_path / "s.npz"
    code, out, err = run_cli("sample", "--ckpt", run, "--steps", "3", "--n", "4", "--out", npz)
    assert code == 0, err
    images = np.load(npz)["images"]
    assert images.shape == (4, 28, 28, 1) and images.dtype == np.uint8
    code, out, err = run_cli("sample", "--ckpt", run, "--steps", "3", "--n", "2", "--spacing", "trailing",
                             "--out", tmp_path / "t.npz")
    assert_clean_error(code, err, "does not apply to EDM models")
    code, out, err = run_cli("export", run, tmp_path / "hf")
    assert_clean_error(code, err, "no DDPM beta schedule", "edm")
    assert tiny_config(*EDM).diffusion.objective == "edm"
