"""Flow matching: the time direction, the loss, Euler/Heun against the exact Gaussian flow, and the
objective switch through config, training and the CLI."""
import numpy as np
import pytest
import torch

from difflo import config as config_mod
from difflo.cli import main
from difflo.diffusion import q_sample, target, to_eps, to_x0
from difflo.errors import ConfigError
from difflo.flow import FlowPath, sample_t, training_loss
from difflo.samplers import sample_ddim, sample_euler, sample_heun
from conftest import tiny_config

PATH = FlowPath()


def test_time_direction_t0_is_data_t1_is_noise():
    x0, x1 = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)).unbind(0)
    x0, x1 = x0[None], x1[None]
    assert torch.equal(q_sample(x0, x1, *PATH.alpha_sigma(0.0)), x0)
    assert torch.equal(q_sample(x0, x1, *PATH.alpha_sigma(1.0)), x1)
    torch.testing.assert_close(q_sample(x0, x1, *PATH.alpha_sigma(0.25)), 0.75 * x0 + 0.25 * x1)
    # the velocity points from data to noise: u = dx_t/dt = x1 - x0
    assert torch.equal(target(x0, x1, 0.3, 0.7, "u"), x1 - x0)
    assert PATH.sampling_times(4) == [1.0, 0.75, 0.5, 0.25, 0.0] and PATH.t_clean == 0.0


def test_sampling_times_end_at_the_clean_data_and_refuse_leading():
    """n steps are n + 1 times from pure noise (t = 1) to the clean end; trailing and linspace are the same
    uniform grid, and leading (which never visits pure noise) is refused."""
    for n in (1, 3, 50):
        ts = PATH.sampling_times(n)
        assert len(ts) == n + 1 and ts[0] == 1.0 and ts[-1] == PATH.t_clean
        assert all(isinstance(t, float) for t in ts) and all(a > b for a, b in zip(ts, ts[1:]))
        assert PATH.sampling_times(n, "linspace") == PATH.sampling_times(n, "trailing") == ts
    with pytest.raises(ValueError, match="leading"):
        PATH.sampling_times(4, "leading")
    with pytest.raises(ValueError):
        PATH.sampling_times(0)


def test_velocity_conversions_are_exact_on_the_straight_path():
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(2, 3, 1, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    a, s = PATH.alpha_sigma(t)
    x_t, u = q_sample(x0, x1, a, s), x1 - x0
    torch.testing.assert_close(to_x0(u, x_t, a, s, "u"), x0)
    torch.testing.assert_close(to_eps(u, x_t, a, s, "u"), x1)


def test_t_sampling():
    g = torch.Generator().manual_seed(0)
    u = sample_t(20000, "uniform", g)
    ln = sample_t(20000, "logit_normal", g)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.003
    assert 0 < ln.min() and ln.max() < 1 and abs(ln.mean() - 0.5) < 0.01
    assert ((ln > 0.25) & (ln < 0.75)).float().mean() > ((u > 0.25) & (u < 0.75)).float().mean() + 0.1
    with pytest.raises(ValueError):
        sample_t(3, "beta", g)


def test_loss_is_zero_for_the_true_velocity_and_deterministic():
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))

    class Oracle(torch.nn.Module):        # knows x0, so u = (x_t - x0) / t exactly
        def forward(self, x_t, time, y):
            t = (time / PATH.time_scale).view(-1, 1, 1, 1)
            return (x_t - x0) / t

    zero = lambda x, t, y: torch.zeros_like(x)
    assert training_loss(Oracle(), x0, None, PATH, generator=torch.Generator().manual_seed(0)) < 1e-8
    l1 = training_loss(zero, x0, None, PATH, generator=torch.Generator().manual_seed(0))
    l2 = training_loss(zero, x0, None, PATH, generator=torch.Generator().manual_seed(0))
    assert l1 == l2 and l1 > 0.5


# ---------------------------------------------------------------- exact flow of Gaussian data
MU = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64).view(1, 1, 2, 2)
S0 = torch.tensor([0.2, 1.0, 1.5, 0.5], dtype=torch.float64).view(1, 1, 2, 2)


class GaussianDenoiser:
    """E[x0 | x_t] for x0 ~ N(MU, S0^2) on the straight path: MU + a S0^2 / (a^2 S0^2 + s^2) (x_t - a MU)."""
    path = PATH

    def __init__(self, scale=1.0):
        self.s0 = S0 * scale

    def __call__(self, x, t):
        a, s = PATH.alpha_sigma(t)
        return MU + a * self.s0**2 / (a**2 * self.s0**2 + s**2) * (x - a * MU)


def affine_map(sampler, steps, den=None):
    """The sampler is affine in x_1 per dimension here: x_0 = A x_1 + b; A^2 is the output variance
    for x_1 ~ N(0, 1) and b its mean, computed exactly from two runs (no sampling noise)."""
    den = den or GaussianDenoiser()
    ts = PATH.sampling_times(steps)
    b = sampler(den, torch.zeros_like(MU), ts)
    A = sampler(den, torch.ones_like(MU), ts) - b
    return b, A**2


@pytest.mark.parametrize("sampler, steps, tol", [(sample_euler, 200, 0.03), (sample_heun, 50, 0.01)])
def test_solvers_reproduce_gaussian_mean_and_variance(sampler, steps, tol):
    # Measured worst relative variance error (over S0 = 0.2 .. 1.5): Euler 9.7% at 50 steps, 2.5% at 200;
    # Heun 0.78% at 50 steps.
    mean, var = affine_map(sampler, steps)
    torch.testing.assert_close(mean, MU, atol=1e-9, rtol=0)        # the mean is exact for any step count
    assert ((var - S0**2).abs() / S0**2).max() < tol
    bad_mean, bad_var = affine_map(sampler, steps, GaussianDenoiser(scale=1.3))
    assert ((bad_var - S0**2).abs() / S0**2).min() > 0.3            # a wrong field is caught


def test_heun_error_falls_faster_than_eulers():
    def err(sampler, n):
        return ((affine_map(sampler, n)[1] - S0**2).abs() / S0**2).max().item()

    e10, e20 = err(sample_euler, 10), err(sample_euler, 20)
    h10, h20 = err(sample_heun, 10), err(sample_heun, 20)
    assert 1.6 < e10 / e20 < 2.5          # first order: halving h halves the error
    assert h10 / h20 > 3.2                # second order: halving h quarters it
    assert h10 < e10 and h20 < e20


def test_ddim_on_the_flow_path_is_euler():
    ts = PATH.sampling_times(7)
    x = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(sample_ddim(GaussianDenoiser(), x, ts), sample_euler(GaussianDenoiser(), x, ts))


# ---------------------------------------------------------------- config, training, CLI
FLOW = ["diffusion.objective=flow", "diffusion.prediction=u", "diffusion.t_sampling=logit_normal",
        "sample.sampler=euler", "sample.steps=4"]


def test_flow_config_validation():
    config_mod.load(None, FLOW).validate()
    with pytest.raises(ConfigError, match="diffusion.prediction='v' is not one of u"):
        config_mod.load(None, ["diffusion.objective=flow", "sample.sampler=euler"]).validate()
    with pytest.raises(ConfigError, match="sample.sampler='ddpm' is not one of"):
        config_mod.load(None, FLOW + ["sample.sampler=ddpm"]).validate()
    with pytest.raises(ConfigError, match="t_sampling='logit_normal' is not one of uniform"):
        config_mod.load(None, ["diffusion.t_sampling=logit_normal"]).validate()
    with pytest.raises(ConfigError, match="objective='score' is not one of"):
        config_mod.load(None, ["diffusion.objective=score"]).validate()


@pytest.mark.slow
def test_flow_trains_resumes_and_samples(tmp_path, capsys):
    from safetensors.torch import load_file
    from difflo import checkpoint
    from difflo.train import train

    quiet = dict(log=lambda *a: None, progress=False)
    train(tiny_config(*FLOW, "train.steps=4", "train.ckpt_every=2"), tmp_path / "full", **quiet)
    train(tiny_config(*FLOW, "train.steps=2", "train.ckpt_every=2"), tmp_path / "part", **quiet)
    train(tiny_config(*FLOW, "train.steps=4", "train.ckpt_every=2"), tmp_path / "part", resume=True, **quiet)
    a = load_file(str(checkpoint.list_checkpoints(tmp_path / "full")[-1] / "model.safetensors"))
    b = load_file(str(checkpoint.list_checkpoints(tmp_path / "part")[-1] / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    run = str(tmp_path / "full")
    for sampler in ("euler", "heun", "dpmpp"):
        assert main(["sample", "--ckpt", run, "--sampler", sampler, "--steps", "3", "--n", "4", "--w", "5",
                     "--out", str(tmp_path / f"{sampler}.npz")]) == 0
        assert np.load(tmp_path / f"{sampler}.npz")["images"].shape == (4, 28, 28, 1)
    assert main(["sample", "--ckpt", run, "--n", "2", "--out", str(tmp_path / "default.npz")]) == 0   # euler
    capsys.readouterr()
    assert main(["sample", "--ckpt", run, "--sampler", "ddpm", "--out", str(tmp_path / "x.png")]) == 2
    assert "does not fit this flow model" in capsys.readouterr().err
