"""Likelihood (difflo eval nll): the probability-flow ODE against the exact log-likelihood of Gaussian
data, the variational bound against its closed form on Gaussian data, the discretized decoder, the
strata, and the command with its bad inputs."""
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from conftest import assert_clean_error, run_cli, tiny_config
from difflo.diffusion import DiscreteSchedule
from difflo.errors import DiffloError
from difflo.eval import nll
from difflo.edm import EDMPath
from difflo.flow import FlowPath

D = 16
MU = torch.linspace(-0.8, 0.8, D, dtype=torch.float64)
EIG = torch.linspace(0.05, 1.2, D, dtype=torch.float64) ** 2        # data variances: sd 0.05 .. 1.2
ROT, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
PATHS = {"cosine": DiscreteSchedule.from_name("cosine"), "linear": DiscreteSchedule.from_name("linear"),
         "flow": FlowPath(), "edm": EDMPath()}


class GaussianDenoiser:
    """The exact E[x0 | x_t] for x0 ~ N(MU, Q diag(EIG) Q^T) on D = 16 dims shaped (1, 4, 4), at per-image
    times: MU + Q diag(alpha EIG / (alpha^2 EIG + sigma^2)) Q^T (x_t - alpha MU). Q = I: diagonal data."""

    def __init__(self, path, rotate=False):
        self.path, self.q = path, ROT if rotate else torch.eye(D, dtype=torch.float64)

    def __call__(self, x, t):
        a, s = (torch.as_tensor(c, dtype=torch.float64).reshape(-1, 1) for c in self.path.alpha_sigma(t))
        gain = a * EIG / (a * a * EIG + s * s)                                   # (B, D) in the eigenbasis
        xf = x.reshape(len(x), -1).double()
        return (MU + (((xf - a * MU) @ self.q) * gain) @ self.q.T).reshape(x.shape)


def marginal(path, t, n, rotate, seed):
    """n draws of x_t = alpha x0 + sigma eps (the data end's distribution), shaped (n, 1, 4, 4)."""
    a, s = (float(c) for c in path.alpha_sigma(t))
    q = ROT if rotate else torch.eye(D, dtype=torch.float64)
    z = torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (a * MU + (z * (a * a * EIG + s * s).sqrt()) @ q.T).reshape(n, 1, 4, 4)


def exact_log_likelihood(path, x, ts, rotate):
    """The ODE's model density at the data end, in closed form: the exact probability flow maps
    N(a0 MU, V0) at ts[0] to N(aT MU, VT) at ts[-1] by x_T = aT MU + Q (VT / V0)^(1/2) Q^T (x - a0 MU)
    (V = a^2 EIG + s^2 in the eigenbasis), and the prior there is N(0, p^2 I) (p = the path's prior_std: 1, or
    EDM's sigma_max): log p(x) = log N(x_T / p; 0, I) - D log p + (1/2) sum log(VT / V0)."""
    (a0, s0), (aT, sT) = ((float(c) for c in path.alpha_sigma(t)) for t in (ts[0], ts[-1]))
    v0, vT = a0 ** 2 * EIG + s0 ** 2, aT ** 2 * EIG + sT ** 2
    q = ROT if rotate else torch.eye(D, dtype=torch.float64)
    x_T = aT * MU + (((x.reshape(len(x), -1) - a0 * MU) @ q) * (vT / v0).sqrt()) @ q.T
    p = path.prior_std
    return (-0.5 * ((x_T / p) ** 2).sum(1) - 0.5 * D * math.log(2 * math.pi) - D * math.log(p)
            + 0.5 * torch.log(vT / v0).sum())


def ode_error(name, steps, n=200, rotate=False, probe="rademacher", seed=0):
    path = PATHS[name]
    ts = nll.ode_times(path, steps)
    x = marginal(path, ts[0], n, rotate, seed)
    r = nll.ode_log_likelihood(GaussianDenoiser(path, rotate), x, ts,
                               nll.BatchDraws(torch.Generator().manual_seed(seed + 1)), probe)
    return r["prior"] + r["divergence"] + r["jacobian"] - exact_log_likelihood(path, x, ts, rotate)


# ---------------------------------------------------------------------------- probability-flow ODE
@pytest.mark.slow
@pytest.mark.parametrize("name", list(PATHS))
def test_ode_matches_the_exact_gaussian_log_likelihood(name):
    """Diagonal data: the Jacobian is diagonal, so a Rademacher probe gives its trace exactly
    (v_i^2 = 1) and the only error is the solver's. It is second order: halving the step about
    quarters it (measured mean error 0.32 / 0.078 / 0.025 nats at 25 / 50 / 100 steps on cosine, 0.39 /
    0.089 / 0.021 on flow; the integer timesteps of a discrete schedule round the log-SNR grid, hence
    the looser ratio), and at 100 steps every image is within 0.1 nats (measured <= 0.061) of the
    exact value: 0.009 bits/dim on these 16 dimensions, whose sds span 0.05 .. 1.2 (1/40 to 1x the
    data range of images)."""
    bias = {steps: ode_error(name, steps).mean().abs().item() for steps in (25, 50)}
    err = ode_error(name, 100)
    assert err.abs().max() < 0.1
    assert bias[25] > 3 * bias[50] > 3 * (3.5 if name == "flow" else 2.5) * err.mean().abs().item()


@pytest.mark.slow
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased_on_correlated_gaussian_data(probe):
    """Rotated (correlated) data: v^T J v now varies with the probe. Over N = 2000 images the mean error
    must lie within 4 standard errors of the mean (sd / sqrt(N), from the images' own errors: a
    correct estimator fails with probability 6e-5) plus the solver's own bias at 100 steps (<= 0.03
    nats on average in the diagonal test above; 0.05 allowed)."""
    err = ode_error("cosine", 100, n=2000, rotate=True, probe=probe)
    se = err.std() / math.sqrt(len(err))
    assert err.std() > 0.5                        # the probe noise is really there (unlike the diagonal case)
    assert err.mean().abs() < 4 * se + 0.05, (err.mean().item(), se.item())


def test_ode_grid_is_uniform_in_log_snr_and_ends_at_pure_noise():
    cos = nll.ode_times(PATHS["cosine"], 20)
    assert cos[0] == 0 and cos[-1] == 999 and cos == sorted(set(cos))
    flow = nll.ode_times(PATHS["flow"], 20)
    assert flow[0] == pytest.approx(nll.FLOW_DATA_END) and flow[-1] == 1.0 and len(flow) == 21
    lams = [nll.log_snr(PATHS["flow"], t) for t in flow[:-1]]
    assert np.allclose(np.diff(lams), np.diff(lams)[0])                    # uniform in lambda, then t = 1
    assert lams[-1] == pytest.approx(nll.LOG_SNR_FLOOR)
    assert nll.FLOW_DATA_END == pytest.approx(1 / (127.5 * math.sqrt(12)))   # sd of the dequantization noise
    with pytest.raises(DiffloError, match="at least 2"):
        nll.ode_times(PATHS["flow"], 1)


# ----------------------------------------------------------------------------- variational bound
def expected_vlb_nats(path, variance):
    """E over x0 ~ N(MU, diag(EIG)) and q of prior + diffusion terms, in closed form: with the exact
    denoiser, E (x0 - x0_hat)^2 = EIG sigma^2 / (alpha^2 EIG + sigma^2) (the posterior variance), so
    E KL_t = (1/2) sum [log(mv / pv) + pv / mv - 1 + c_x0^2 EIG sigma^2 / ((alpha^2 EIG + sigma^2) mv)]."""
    c = nll.vlb_coefficients(path, variance)
    T = path.max_steps
    ab_T = c["abar"][T - 1]
    prior = 0.5 * (ab_T * (MU ** 2 + EIG) + (1 - ab_T) - 1 - torch.log(1 - ab_T)).sum()
    total = prior.item()
    for t in range(1, T):
        ab = c["abar"][t]
        post_x0 = EIG * (1 - ab) / (ab * EIG + 1 - ab)
        pv, mv = c["post_var"][t], c["model_var"][t]
        total += 0.5 * (torch.log(mv / pv) + pv / mv - 1 + c["c_x0"][t] ** 2 * post_x0 / mv).sum().item()
    return total


@pytest.mark.slow
@pytest.mark.parametrize("variance, terms", [("fixed_small", None), ("fixed_small", 20), ("fixed_large", 50)])
def test_vlb_matches_its_closed_form_on_gaussian_data(variance, terms):
    """All KL terms, or a stratified subset: the estimate's mean over N = 400 images is within 4 of its
    standard errors of the closed form (the decoder term needs discrete data and is tested below)."""
    path = PATHS["cosine"]
    x0 = marginal(path, -1, 400, False, seed=3)                      # t = -1: the clean data
    nats = nll.vlb(GaussianDenoiser(path), x0, terms, variance, nll.BatchDraws(torch.Generator().manual_seed(4)))
    est = nats["prior"] + nats["diffusion"]
    se = est.std() / math.sqrt(len(est))
    assert abs(est.mean().item() - expected_vlb_nats(path, variance)) < 4 * se.item()


def test_vlb_refuses_a_flow_path():
    with pytest.raises(DiffloError, match="discrete diffusion"):
        nll.vlb(GaussianDenoiser(PATHS["flow"]), torch.zeros(2, 1, 4, 4))
    with pytest.raises(DiffloError, match="flow model: use --method ode"):
        nll.methods_for(PATHS["flow"], "vlb")
    assert nll.methods_for(PATHS["flow"], None) == ["ode"] and nll.methods_for(PATHS["cosine"], None) == ["vlb"]


@pytest.mark.parametrize("T, terms", [(1000, 100), (1000, 20), (50, 7), (10, 9), (10, 30)])
def test_strata_cover_every_timestep_once_and_their_estimate_is_unbiased(T, terms):
    parts = nll.strata(T, terms)
    assert len(parts) == min(terms, T - 1)
    assert np.concatenate(parts).tolist() == list(range(1, T))            # contiguous, in order, no gaps
    f = np.random.default_rng(0).random(T) / np.arange(1, T + 1)          # any per-timestep term
    expected = sum(len(p) * f[p].mean() for p in parts)                    # E[size x f(uniform draw)]
    assert expected == pytest.approx(f[1:].sum())


def test_discretized_decoder_is_a_distribution_over_the_256_bins():
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1                 # every pixel value
    for mean, scale in [(0.3, 0.01), (-0.999, 0.004), (1.0, 0.5), (0.0, 1e-4)]:
        logp = nll.discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), scale)
        assert torch.isfinite(logp).all() or scale < 1e-3
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    x = torch.tensor([-1.0, 20 / 127.5 - 1, 1.0, 0.6], dtype=torch.float64)
    mean = torch.tensor([-0.9, -0.8, 0.95, 0.99], dtype=torch.float64)
    lo, hi = (x - 1 / 255 - mean) / 0.05, (x + 1 / 255 - mean) / 0.05
    ref = np.log(np.where(x > 0.999, 1.0, norm.cdf(hi)) - np.where(x < -0.999, 0.0, norm.cdf(lo)))
    np.testing.assert_allclose(nll.discretized_gaussian_log_likelihood(x, mean, 0.05).numpy(), ref, rtol=1e-9)
    far = nll.discretized_gaussian_log_likelihood(torch.tensor([0.9], dtype=torch.float64),
                                                  torch.tensor([-0.9], dtype=torch.float64), 0.01)
    assert torch.isfinite(far).all() and far.item() < -1000                 # 180 sd away: tiny, not -inf


def test_bits_convention():
    """bits/dim = -log p / (D ln 2) + log2(127.5): the bins are 2/255 wide in model units."""
    assert nll.BIN_OFFSET == pytest.approx(8 - math.log2(256 / 127.5))
    assert nll.BIN_OFFSET == pytest.approx(6.99435, abs=1e-5)
    assert nll.to_bits(torch.tensor([D * math.log(2)]), D)[0] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------- command
@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    from difflo.train import train
    run = tmp_path_factory.mktemp("flow_run")
    train(tiny_config("train.steps=1", "diffusion.objective=flow", "diffusion.prediction=u",
                      "diffusion.t_sampling=logit_normal", "sample.sampler=euler", "sample.steps=4"), run,
          log=lambda *a: None)
    return run


@pytest.mark.slow
def test_eval_nll_command_both_methods_per_image_seeds(tiny_run, tmp_path):
    out = tmp_path / "nll.json"
    code, text, err = run_cli("eval", "nll", "--ckpt", tiny_run, "--n", "3", "--method", "both", "--terms", "4",
                              "--steps", "3", "--json", out)
    assert code == 0, err
    assert "variational bound" in text and "probability-flow ODE" in text and "N=3 test images of mnist10k" in text
    assert "4 of the 999 KL terms" in text and "log p(x | y)" in text and "+ log2(127.5)" in text
    res = json.loads(out.read_text())["results"]
    assert [r["method"] for r in res] == ["vlb", "ode"] and all(r["n"] == 3 for r in res)
    for r in res:
        assert np.isfinite(r["bits_per_dim"]) and r["standard_error"] > 0 and r["bits_per_dim"] > 0
        assert r["bits_per_dim"] == pytest.approx(sum(p["mean"] for p in r["parts"].values())
                                                  + r.get("bin_offset", 0.0))
    # Image i draws from seed + i: the batch it is scored in changes nothing.
    code, _, err = run_cli("eval", "nll", "--ckpt", tiny_run, "--n", "3", "--method", "both", "--terms", "4",
                           "--steps", "3", "--batch-size", "2", "--json", tmp_path / "b.json")
    assert code == 0, err
    again = json.loads((tmp_path / "b.json").read_text())["results"]
    assert [r["bits_per_dim"] for r in again] == pytest.approx([r["bits_per_dim"] for r in res], rel=1e-6)


@pytest.mark.slow
def test_eval_nll_of_a_flow_model_uses_the_ode(flow_run):
    code, text, err = run_cli("eval", "nll", "--ckpt", flow_run, "--n", "2", "--steps", "2", "--unconditional")
    assert code == 0, err
    assert "probability-flow ODE" in text and "variational bound" not in text and "null class" in text


def test_eval_nll_bad_input_is_one_line(tiny_run, flow_run, tmp_path):
    cases = [
        (["--ckpt", tiny_run, "--n", "1"], "at least 2 images"),
        (["--ckpt", flow_run, "--method", "vlb"], "flow model: use --method ode"),
        (["--ckpt", flow_run, "--method", "both"], "flow model"),
        (["--ckpt", tiny_run, "--method", "ode", "--steps", "1"], "--steps must be at least 2"),
        (["--ckpt", tiny_run, "--n", "5000"], "has only 2000 images"),
        (["--ckpt", tiny_run, "--terms", "0"], "must be >= 1"),
        (["--ckpt", tiny_run, "--json", tmp_path / "x.txt"], "--json"),
        (["--ckpt", tiny_run, "--split", "nope"], "nope"),
    ]
    for argv, msg in cases:
        code, _, err = run_cli("eval", "nll", *argv)
        assert msg in assert_clean_error(code, err), (argv, err)
