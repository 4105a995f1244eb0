"""Every registered sampler on exact Gaussian data (x0 ~ N(mu, diag(s^2)), the exact denoiser E[x0 | x_t]),
on every time grid it takes: the discretized chain's own moments (computed exactly, no sampling: with an
affine denoiser every sampler is affine in its start and noise draws) reach the data's moments with enough
steps, and sampling N = 20000 images matches those exact moments within 5 standard errors. The cases come from
the registry (samplers_common.SAMPLER_CASES), so a new sampler is covered without listing it here. Zero-terminal-
SNR schedules (alpha_{T-1} = 0, pure noise) run through every discrete sampler too."""
from __future__ import annotations

import math

import pytest
import torch

from difflo.edm import EDMPath
from difflo.samplers import SAMPLERS, sample_dpmpp_3m
from samplers_common import (MU, S, SAMPLER_CASES, GaussianDenoiser, affine_chain_moments, case_id,
                             exact_chain_moments, objective_path, path_for, ztsnr_path)

def _grids(objective: str):
    """(path label, path, spacing) for an objective: diffusion on its timestep grid (cosine), both noise-level
    grids (linear; cosine's sigma_max ~ 2e4 puts most Karras points at t > 990) and a zero-terminal-SNR
    schedule; flow on its uniform grid; EDM on Karras' grid."""
    if objective == "flow":
        return [("flow", objective_path("flow"), "trailing")]
    if objective == "edm":   # sigma_max 500: x_T = sigma_max z misses the data's mean by mu s / sigma_max (0.019 at 80)
        return [("edm", EDMPath(sigma_max=500.0), "karras")]
    return [("cosine", path_for("cosine"), "trailing"), ("linear", path_for("linear"), "karras"),
            ("linear", path_for("linear"), "exponential"), ("cosine-ztsnr", ztsnr_path("cosine"), "trailing")]


CASES = [(name, opts, label, path, spacing) for name, opts, objective in SAMPLER_CASES
         for label, path, spacing in _grids(objective)]
IDS = [f"{case_id(n, o, path.__class__.__name__)}-{label}-{sp}" for n, o, label, path, sp in CASES]


def _errors(mean, var, mu=MU, s=S):
    return (mean - mu[0, 0].double()).abs().max().item(), (var / s[0, 0].double() ** 2 - 1).abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("name,opts,label,path,spacing", CASES, ids=IDS)
def test_exact_chain_reaches_the_data(name, opts, label, path, spacing):
    """With every step of the model (1000 steps; the noise-level grids 1000 fractional timesteps) each sampler's
    chain has the data's moments: means within 0.015 of mu (the linear schedule's alpha_{T-1} = 0.006 > 0
    biases ODE samplers that start from N(0, I) by 0.0095), variances within 3 % of s^2 (worst measured 1.9 %:
    first-order ancestral samplers; 2nd/3rd order < 0.3 %)."""
    ts = path.sampling_times(1000, spacing)
    mean, var = affine_chain_moments(SAMPLERS[name], path, ts, **opts)
    err_mean, err_var = _errors(mean, var)
    assert err_mean < 0.015 and err_var < 0.03, (err_mean, err_var)


N = 20000


@pytest.mark.slow
@pytest.mark.parametrize("name,opts,label,path,spacing", CASES, ids=IDS)
def test_sampled_moments_match_the_exact_chain(name, opts, label, path, spacing):
    """20 steps, N = 20000 samples from seeded noise: every dimension's sample mean within 5 standard errors
    (sqrt(v / N)) of the exact chain's mean and its sample variance within 5 sqrt(2 / N) = 5 % of the chain's
    variance: the noise is drawn fresh where the chain says (a reused or missing draw moves the variance)."""
    ts = path.sampling_times(20, spacing)
    m_ex, v_ex = affine_chain_moments(SAMPLERS[name], path, ts, **opts)
    g = torch.Generator().manual_seed(0)
    shape = (N, 1, 4, 4)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * path.prior_std
    out = SAMPLERS[name](GaussianDenoiser(path, MU.double(), S.double()), x, ts,
                         noise=lambda: torch.randn(shape, generator=g, dtype=torch.float64), **opts)
    mean, var = out.mean(0)[0], out.var(0)[0]
    assert ((mean - m_ex).abs() < 5 * (v_ex / N).sqrt()).all(), ((mean - m_ex).abs() / (v_ex / N).sqrt()).max()
    assert ((var / v_ex - 1).abs() < 5 * math.sqrt(2 / N)).all(), (var / v_ex - 1).abs().max()


def test_exact_chain_check_can_fail():
    """A denoiser that believes the std is 1.3 s, or the mean mu + 0.2, fails the data check in every dimension."""
    path = path_for("cosine")
    ts = path.sampling_times(1000, "trailing")
    mean, var = affine_chain_moments(sample_dpmpp_3m, path, ts, s=1.3 * S)
    assert ((var / S[0, 0].double() ** 2 - 1) > 0.5).all()
    mean, var = affine_chain_moments(sample_dpmpp_3m, path, ts, mu=MU + 0.2)
    assert ((mean - MU[0, 0].double()).abs() > 0.15).all()


def test_affine_chain_moments_are_the_papers_formulas():
    """The exact-chain moments computed from the samplers themselves equal the DDIM / DDPM closed forms
    (samplers_common.exact_chain_moments, written from the papers' equations) to 1e-12."""
    path = path_for("linear")
    ts = path.sampling_times(50, "trailing")
    for name, opts, kind in [("ddim", {"eta": 0.0}, "ddim"), ("ddim", {"eta": 1.0}, "ddim"),
                             ("ddpm", {"variance": "fixed_large"}, "ddpm")]:
        m, v = affine_chain_moments(SAMPLERS[name], path, ts, **opts)
        m_ref, v_ref = exact_chain_moments(path, ts, kind, eta=opts.get("eta", 0.0),
                                            variance=opts.get("variance", "fixed_small"))
        torch.testing.assert_close(m, m_ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(v, v_ref, atol=1e-12, rtol=1e-10)


# --------------------------------------------------------------------------- zero terminal SNR
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_zero_terminal_snr_schedule(name):
    """alpha_bar_{T-1} is exactly 0 (alpha = 0, sigma = 1: pure noise), alpha_bar_0 is unchanged, alpha_bar
    decreases, and lambda = log(alpha / sigma) is -inf at T-1."""
    path, plain = ztsnr_path(name), path_for(name)
    ab = path.alphas_cumprod
    assert ab[-1].item() == 0.0 and path.alpha_sigma(999) == (0.0, 1.0)
    assert abs(ab[0].item() - plain.alphas_cumprod[0].item()) < 1e-15
    assert (ab[1:] < ab[:-1]).all() and (ab[:-1] > 0).all()
    assert path.spacings == ("leading", "trailing", "linspace")           # no noise-level grids: sigma_max = inf
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        path.sampling_times(10, "karras")


@pytest.mark.parametrize("sampler", [n for n, entry in SAMPLERS.items() if entry.fits(path_for("cosine"))])
def test_zero_terminal_snr_first_step_from_v_prediction(sampler):
    """The first step starts at alpha = 0: the x0 estimate of a v-prediction network (x0 = alpha x - sigma v
    = -v there) and every sampler's step are finite (nothing divides by alpha_{T-1} = 0), for a network
    output that is finite anywhere."""
    from difflo.guidance import ModelDenoiser
    path = ztsnr_path("cosine")

    class Net(torch.nn.Module):
        def forward(self, x, t, y=None):
            return torch.tanh(x) * (1 + t.view(-1, 1, 1, 1) / 1000)

    seen = []
    den = ModelDenoiser(Net(), path, "v")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4, 4, generator=g)
    out = SAMPLERS[sampler](den, x, path.sampling_times(5, "trailing"), callback=seen.append,
                            noise=lambda: torch.randn(2, 1, 4, 4, generator=g))
    assert seen[0]["t"] == 999 and torch.isfinite(seen[0]["x"]).all()
    torch.testing.assert_close(seen[0]["denoised"], -Net()(x, torch.full((2,), 999.0)))
    assert torch.isfinite(out).all()
