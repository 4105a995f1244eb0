"""Samplers without diffusers: properties shared by every registered sampler (the registry is the one
list: a sampler added to SAMPLERS gets these tests), exact Gaussian checks, DPM-Solver++'s order, and
the guidance wrappers. The comparisons with diffusers are in tests/peer/test_samplers_vs_diffusers.py."""
from __future__ import annotations

import math

import pytest
import torch

from difflo.flow import FlowPath
from difflo.guidance import CFGDenoiser, ClampDenoiser
from difflo.noise_paths import OBJECTIVES, samplers_for
from difflo.samplers import (SAMPLERS, Sampler, SeededNoise, ddim_step, ddpm_step, fitting, sample_ddim, sample_ddpm,
                             sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m, sample_euler,
                             sample_euler_ancestral, sample_heun)
from samplers_common import (MU, S, SAMPLER_CASES, SAMPLER_OPTIONS, SHAPE, T, GaussianDenoiser, case_id, first_spacing,
                             ddim_closed_form, exact_chain_moments, noise_fn, objective_path, path_for, step_inputs)


# --------------------------------------------------------------------------- DDIM and DDPM steps
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_final_output_is_last_x0_hat(spacing, eta):
    """difflo's last step goes to t = -1 (alpha = 1, sigma = 0): the sample IS the last x0_hat, bit for bit."""
    path = path_for("cosine")
    den = ToyDenoiser(path)
    last = {}
    ts = path.sampling_times(6, spacing)
    out = sample_ddim(den, torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)), ts, eta=eta,
                      noise=noise_fn(torch.float32), callback=lambda d: last.update(d))
    assert (last["t"], last["t_prev"]) == (ts[-2], ts[-1]) == (ts[-2], path.t_clean)
    assert torch.equal(out, last["denoised"])


def test_stochastic_steps_require_noise_and_validate_variance():
    path = path_for("linear")
    x, x0 = step_inputs(0, torch.float32)
    with pytest.raises(ValueError):
        ddpm_step(x, x0, path, 500, 400)
    with pytest.raises(ValueError):
        ddim_step(x, x0, path, 500, 400, eta=0.5)
    with pytest.raises(ValueError):
        ddpm_step(x, x0, path, 500, 400, variance="learned", noise=noise_fn(torch.float32))
    # eta = 0 needs no noise at all
    torch.testing.assert_close(ddim_step(x, x0, path, 500, 400), ddim_closed_form(x, x0, path, 500, 400))


# --------------------------------------------------------------------------- every registered sampler
class ToyDenoiser:
    """Deterministic, nonlinear, per-sample (no mixing across the batch); depends on t and on y."""

    def __init__(self, path):
        self.path, self.calls = path, []

    def __call__(self, x, t, y=None):
        self.calls.append((t, x.shape[0], None if y is None else y.clone()))
        a, _ = self.path.alpha_sigma(t)
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        out = 0.9 * torch.tanh(a * x + 0.3 * m) + 0.05 * math.cos(t / 100)
        if y is not None:
            out = out + 0.1 * y.view(-1, 1, 1, 1).to(x.dtype)
        return out


SAMPLE_SHAPE = (3, 4, 4)
N_STEPS = 8


def test_every_sampler_fits_some_objective():
    assert {name for name, _, _ in SAMPLER_CASES} == set(SAMPLERS)


def test_common_tests_run_every_registered_sampler():
    """The cases of the `sampler` fixture are exactly the registry's (sampler, objective) pairs where the
    sampler fits the objective's path, each with every option set listed for it (defaults when none is)."""
    assert all(isinstance(entry, Sampler) for entry in SAMPLERS.values())
    pairs = {(name, objective) for name, _, objective in SAMPLER_CASES}
    assert pairs == {(name, objective) for name, entry in SAMPLERS.items() for objective in OBJECTIVES
                     if entry.fits(objective_path(objective))}
    for objective in OBJECTIVES:
        path = objective_path(objective)
        assert samplers_for(objective) == fitting(path) == tuple(path.samplers)
    assert set(SAMPLER_OPTIONS) <= set(SAMPLERS)
    for name, option_sets in SAMPLER_OPTIONS.items():
        for opts in option_sets:
            assert set(opts) <= set(SAMPLERS[name].options), (name, opts, SAMPLERS[name].options)
    assert len(SAMPLER_CASES) == sum(len(SAMPLER_OPTIONS.get(name, [{}])) for name, _ in pairs)


@pytest.fixture(params=SAMPLER_CASES, ids=[case_id(*c) for c in SAMPLER_CASES])
def sampler(request):
    name, opts, objective = request.param
    fn = SAMPLERS[name]
    path = objective_path(objective)
    ts = path.sampling_times(N_STEPS, first_spacing(path))   # N_STEPS + 1 times, from pure noise to the clean end

    def run(seeds, callback=None, denoiser=None, y=None, n_steps=N_STEPS):
        noise = SeededNoise(seeds, SAMPLE_SHAPE)
        x = noise() * path.prior_std   # t = T-1: start from standard normal noise (first draw of each generator)
        den = denoiser or ToyDenoiser(path)
        extra = None if y is None else {"y": y}
        grid = ts if n_steps == N_STEPS else path.sampling_times(n_steps, first_spacing(path))
        return fn(den, x, grid, extra_args=extra, callback=callback, noise=noise, **opts)

    run.ts, run.path, run.name, run.opts = ts, path, name, opts
    return run


def test_sampler_shape_dtype_finite(sampler):
    out = sampler([0, 1, 2])
    assert out.shape == (3, *SAMPLE_SHAPE) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.abs().max().item() < 10


def test_sampler_deterministic(sampler):
    a, b = sampler([5, 6]), sampler([5, 6])
    assert torch.equal(a, b)
    c = sampler([7, 8])
    assert not torch.allclose(a, c)


def test_sampler_per_sample_seeding(sampler):
    """A sample depends on its seed only, not on the batch it was drawn in, nor its position in it."""
    ab = sampler([11, 22])
    a = sampler([11])
    ba = sampler([22, 11])
    torch.testing.assert_close(ab[0], a[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(ab[0], ba[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(ab[1], ba[0], atol=1e-6, rtol=0)
    assert not torch.allclose(ab[0], ab[1])


def test_sampler_callback(sampler):
    seen = []
    out = sampler([0, 1], callback=lambda d: seen.append(dict(d)))
    assert len(seen) == N_STEPS
    assert [d["i"] for d in seen] == list(range(N_STEPS))
    assert len(sampler.ts) == N_STEPS + 1 and sampler.ts[-1] == sampler.path.t_clean
    assert [d["t"] for d in seen] == sampler.ts[:-1]
    assert [d["t_prev"] for d in seen] == sampler.ts[1:]
    for d in seen:
        assert set(d) == {"i", "t", "t_prev", "x", "denoised"}
        assert isinstance(d["t"], int if isinstance(sampler.path.t_clean, int) else float)
        assert d["x"].shape == d["denoised"].shape == (2, *SAMPLE_SHAPE)
    assert torch.equal(seen[-1]["x"], out)


def test_sampler_calls_denoiser_once_per_step_with_extra_args(sampler):
    den = ToyDenoiser(sampler.path)
    y = torch.tensor([3, 4])
    out_y = sampler([0, 1], denoiser=den, y=y)
    ts = sampler.ts
    called = [c[0] for c in den.calls]
    if sampler.opts.get("s_churn"):   # churn evaluates at t_hat, noisier than t (not at pure noise, flow's t = 1)
        per_step = 2 if sampler.name == "heun" else 1
        t_hats = called[::per_step]
        pure = sampler.path.alpha_sigma(ts[0])[0] == 0          # EDM's sigma_max is not pure noise: it churns
        assert len(called) == SAMPLERS[sampler.name].evals(N_STEPS) and (t_hats[0] == ts[0]) == pure
        assert all(ts[i] < t_hat for i, t_hat in enumerate(t_hats) if i > 0 or not pure)
        assert not pure or all(t_hat < 1.0 for t_hat in t_hats[1:])
    elif sampler.name == "heun":     # predictor at t, corrector at t_prev; the last step (to t_clean) is Euler
        pairs = zip(ts[:-2], ts[1:-1])
        assert called == [u for t, t_prev in pairs for u in (t, t_prev)] + ts[-2:-1]
    else:
        assert called == ts[:-1]
    assert all(c[1] == 2 and torch.equal(c[2], y) for c in den.calls)
    assert not torch.allclose(out_y, sampler([0, 1]))   # y reached the denoiser and changed the result


def test_sampler_evals_counts_network_calls(sampler):
    """Sampler.evals(n) (the NFE the registry states) is the number of denoiser calls on an n-step grid:
    n for one-evaluation samplers, 2n - 1 for Heun (its step to the clean end is an Euler step)."""
    entry = SAMPLERS[sampler.name]
    for n in (1, 2, 5, N_STEPS):
        den = ToyDenoiser(sampler.path)
        sampler([0], denoiser=den, n_steps=n)
        assert len(den.calls) == entry.evals(n), (sampler.name, n, len(den.calls), entry.evals(n))
        if sampler.name == "heun":
            assert len(den.calls) == 2 * n - 1


@pytest.mark.parametrize("fn,opts,flow", [(sample_ddpm, {}, False), (sample_ddim, {"eta": 0.5}, False),
                                          (sample_euler_ancestral, {}, False), (sample_dpmpp_2m_sde, {}, False),
                                          (sample_euler, {"s_churn": 1.0}, True),
                                          (sample_heun, {"s_churn": 1.0}, True)])
def test_stochastic_samplers_without_noise_raise(fn, opts, flow):
    path = FlowPath() if flow else path_for("linear")
    with pytest.raises(ValueError, match="noise"):
        fn(ToyDenoiser(path), torch.zeros(1, *SAMPLE_SHAPE), path.sampling_times(4), **opts)


@pytest.mark.parametrize("fn", [sample_dpmpp_2m, sample_dpmpp_3m, sample_euler, sample_heun])
def test_deterministic_samplers_ignore_noise(fn):
    path = FlowPath() if fn in (sample_euler, sample_heun) else path_for("linear")
    x = torch.randn(2, *SAMPLE_SHAPE, generator=torch.Generator().manual_seed(1))
    ts = path.sampling_times(5)
    assert torch.equal(fn(ToyDenoiser(path), x, ts), fn(ToyDenoiser(path), x, ts,
                                                         noise=SeededNoise([9, 9], SAMPLE_SHAPE)))


def test_ddim_eta0_ignores_noise():
    path = path_for("linear")
    x = torch.randn(2, *SAMPLE_SHAPE, generator=torch.Generator().manual_seed(1))
    ts = path.sampling_times(5)
    a = sample_ddim(ToyDenoiser(path), x, ts)
    b = sample_ddim(ToyDenoiser(path), x, ts, noise=SeededNoise([9, 9], SAMPLE_SHAPE))
    assert torch.equal(a, b)


def test_seeded_noise():
    n1, n2 = SeededNoise([1, 2], (2, 3)), SeededNoise([1], (2, 3))
    a, b = n1(), n2()
    assert a.shape == (2, 2, 3) and b.shape == (1, 2, 3)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], a[1])
    assert torch.equal(a[0], torch.randn((2, 3), generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(n1()[0], a[0])     # successive calls give fresh draws


# --------------------------------------------------------------------------- exact Gaussian data
# x0 ~ N(mu, diag(s^2)) on D = 16 dims, shaped (N, 1, 4, 4). For this data E[x0 | x_t] is known in closed
# form, so samplers driven by the exact denoiser can be checked statistically.
N_GAUSS = 20000


def _run_gaussian(fn, den, ts, n=N_GAUSS, seed=0, **opts):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, 4, 4)
    x = torch.randn(shape, generator=g)   # ts[0] = T-1: standard normal, as diffusers starts
    out = fn(den, x, ts, noise=lambda: torch.randn(shape, generator=g), **opts)
    return out.double().mean(0)[0], out.double().var(0)[0]


MEAN_TOL, VAR_RTOL = 0.05, 0.07
N_DDPM = 10000      # DDPM-1000 is the expensive run (one randn of N x 16 per step)


def _matches_data(mean, var, mu=MU, s=S):
    """The data-level check: every dimension's mean within 0.05 of mu and variance within 7 % of s^2."""
    mu, s2 = mu[0, 0].double(), s[0, 0].double() ** 2
    return bool(((mean - mu).abs() < MEAN_TOL).all() and ((var / s2 - 1).abs() < VAR_RTOL).all())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddpm_1000_steps_recovers_gaussian(name):
    """DDPM (fixed_large) with all 1000 steps samples the data distribution. Statistics for N = 10000:
    the standard error of a mean is s / sqrt(N) <= 0.015, so 0.05 is >= 3.3 SE (>= 25 SE for s = 0.2);
    the relative standard error of a variance is sqrt(2 / N) = 1.4 %, and the exact discretized chain
    is biased by <= 0.9 % (linear) / 0.5 % (cosine), so 7 % leaves >= 4.3 SE. Chance that a correct
    sampler fails on an unlucky seed: ~0.2 % (the seed is fixed, so the test is deterministic)."""
    path = path_for(name)
    ts = path.sampling_times(T, "leading")
    mean, var = _run_gaussian(sample_ddpm, GaussianDenoiser(path), ts, n=N_DDPM, variance="fixed_large")
    mu, s2 = MU[0, 0].double(), S[0, 0].double() ** 2
    assert _matches_data(mean, var), ((mean - mu).abs().max().item(), (var / s2 - 1).abs().max().item())
    # and the exact moments of the discretized chain, within 5 standard errors
    m_ex, v_ex = exact_chain_moments(path, ts, "ddpm", variance="fixed_large")
    assert ((v_ex / s2 - 1).abs() < 0.01).all() and ((m_ex - mu).abs() < 1e-3).all()   # tiny bias
    assert ((mean - m_ex).abs() < 5 * (v_ex / N_DDPM).sqrt()).all()
    assert ((var / v_ex - 1).abs() < 5 * math.sqrt(2 / N_DDPM)).all()


@pytest.mark.slow
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_100_steps_matches_exact_chain(variance):
    """Strided DDPM (100 leading steps): the variance type matters a lot here (fixed_small under-,
    fixed_large over-disperses); the sampled moments match the exact chain's within 5 SE (N = 20000)."""
    path = path_for("linear")
    ts = path.sampling_times(100, "leading")
    mean, var = _run_gaussian(sample_ddpm, GaussianDenoiser(path), ts, variance=variance)
    m_ex, v_ex = exact_chain_moments(path, ts, "ddpm", variance=variance)
    assert ((mean - m_ex).abs() < 5 * (v_ex / N_GAUSS).sqrt()).all()
    assert ((var / v_ex - 1).abs() < 5 * math.sqrt(2 / N_GAUSS)).all(), (var / v_ex - 1).abs().max()


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddim_gaussian(name):
    """DDIM (eta = 0), 50 and 100 steps, from x_{T-1} ~ N(0, I) with trailing spacing (it starts at T-1;
    leading starts at t = 980 where cosine's alpha is 0.03, biasing the mean by ~0.04). N = 20000.

    The means must be within 0.05 of mu (>= 4.7 SE; the exact chain's mean bias is < 0.01). The
    variances are NOT within 7 % of s^2 at these step counts, and that is DDIM's discretization error,
    not a bug: the exact moments of the discretized chain (closed form) have relative variance errors
    up to -24.5 % (linear, 50 steps), -13 % (linear, 100; cosine, 50) and -7 % (cosine, 100), largest
    for the narrowest dimension s = 0.2 and still -6 % / -3 % for s = 1.5 (for N(0, 1) data each DDIM
    step multiplies the variance by cos^2 of its angle step). So the sampled variance is checked
    against those exact moments (5 SE = 5 sqrt(2/N) = 7 % relative), and first-order convergence is
    checked: the variance error of the s = 0.2 dimension halves from 50 to 100 steps."""
    path = path_for(name)
    mu, s2 = MU[0, 0].double(), S[0, 0].double() ** 2
    err = {}
    for n in (50, 100):
        ts = path.sampling_times(n, "trailing")
        mean, var = _run_gaussian(sample_ddim, GaussianDenoiser(path), ts, seed=n)
        assert ((mean - mu).abs() < MEAN_TOL).all(), (mean - mu).abs().max()
        m_ex, v_ex = exact_chain_moments(path, ts, "ddim")
        assert ((mean - m_ex).abs() < 5 * (v_ex / N_GAUSS).sqrt()).all()
        assert ((var / v_ex - 1).abs() < 5 * math.sqrt(2 / N_GAUSS)).all(), (var / v_ex - 1).abs().max()
        # DDIM under-disperses here: never above s^2 by more than 5 SE
        assert (var / s2 - 1 < 5 * math.sqrt(2 / N_GAUSS)).all()
        err[n] = (var[0, 0] / s2[0, 0] - 1).item(), (v_ex[0, 0] / s2[0, 0] - 1).item()   # (sampled, exact) at s = 0.2
    assert err[50][1] < -0.1                                  # a real, sizeable bias at 50 steps
    assert 0.45 < err[100][1] / err[50][1] < 0.6              # exact chain: first order in 1/n
    assert 0.35 < err[100][0] / err[50][0] < 0.7              # the samples show it too


def test_ddim_eta1_gaussian_matches_exact_chain():
    path = path_for("cosine")
    ts = path.sampling_times(50, "trailing")
    mean, var = _run_gaussian(sample_ddim, GaussianDenoiser(path), ts, eta=1.0)
    m_ex, v_ex = exact_chain_moments(path, ts, "ddim", eta=1.0)
    assert ((mean - m_ex).abs() < 5 * (v_ex / N_GAUSS).sqrt()).all()
    assert ((var / v_ex - 1).abs() < 5 * math.sqrt(2 / N_GAUSS)).all()


@pytest.mark.slow
def test_gaussian_check_can_fail():
    """The same DDPM-1000 check with a denoiser that believes the std is 1.3 s gives variances ~1.7 s^2,
    rejected in every dimension; one that believes the mean is mu + 0.2 is rejected in every dimension."""
    path = path_for("cosine")
    ts = path.sampling_times(T, "leading")
    mean, var = _run_gaussian(sample_ddpm, GaussianDenoiser(path, s=1.3 * S), ts, n=2000, seed=2,
                              variance="fixed_large")
    assert not _matches_data(mean, var)
    assert ((var / S[0, 0].double() ** 2 - 1) > VAR_RTOL).all()
    mean, var = _run_gaussian(sample_ddpm, GaussianDenoiser(path, mu=MU + 0.2), ts, n=2000, seed=3,
                              variance="fixed_large")
    assert not _matches_data(mean, var)
    assert ((mean - MU[0, 0]).abs() > MEAN_TOL).all()


@pytest.mark.parametrize("objective", ["diffusion", "flow"])
def test_dpmpp_final_output_is_last_x0_hat(objective):
    """The last step goes to sigma = 0 at first order, which returns the last x0 estimate bit for bit (the
    second-order term has 1/r = h / h_prev = inf there); every other step after the first is second order:
    the state differs from a DDIM step from the same point. Except, on the flow path, the second step: its
    history point t = 1 is pure noise (lambda = -inf, so 1/r = 0), and 2M reduces to first order there."""
    path = FlowPath() if objective == "flow" else path_for("cosine")
    ts = path.sampling_times(6, "trailing")
    den = ToyDenoiser(path)
    seen = []
    out = sample_dpmpp_2m(den, torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)), ts,
                          callback=lambda d: seen.append(dict(d)))
    assert torch.equal(out, seen[-1]["denoised"])
    prev_x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for i, d in enumerate(seen):
        ddim = ddim_step(prev_x, d["denoised"], path, d["t"], d["t_prev"])
        if i == 0 or i == len(seen) - 1 or (objective == "flow" and i == 1):
            torch.testing.assert_close(d["x"], ddim, atol=1e-6, rtol=1e-6)   # first order = DDIM
        else:
            assert (d["x"] - ddim).abs().max().item() > 1e-3
        prev_x = d["x"]


def _exact_ode_transport(path, x, t0, t1, mu=MU, s=S):
    """For Gaussian data each dimension's probability-flow ODE keeps the standardized value
    (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) constant (the monotone map between the marginals)."""
    a0, s0 = path.alpha_sigma(t0)
    a1, s1 = path.alpha_sigma(t1)
    s2 = s.double() ** 2
    return a1 * mu + ((a1 * a1 * s2 + s1 * s1) / (a0 * a0 * s2 + s0 * s0)).sqrt() * (x - a0 * mu)


@pytest.mark.parametrize("objective", ["linear", "cosine", "flow"])
def test_dpmpp_is_second_order_on_gaussian(objective):
    """With the exact Gaussian denoiser the ODE has a closed-form solution, so the sampler's error is
    pure discretization error, checked without sampling noise: from t = 999 (flow: 1) to t = 99 (0.1) on
    uniform grids of 37 and 73 points (halved steps), DPM-Solver++(2M)'s worst error shrinks by < 0.35
    (second order: -> 0.25; measured 0.26 linear, 0.32 cosine, 0.31 flow), DDIM's by > 0.45 (first order:
    0.5), and DPM-Solver++ at 37 points beats DDIM at 73 by > 3x (measured 13x, 3.7x, 8.5x). The grids end at
    t = 99 (0.1), so the step to t_clean (the last x0 estimate, the same for every sampler) is not taken:
    a sampler walks the grid it is given."""
    path = FlowPath() if objective == "flow" else path_for(objective)
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    den = GaussianDenoiser(path, MU.double(), S.double())
    err = {}
    for fn in (sample_dpmpp_2m, sample_ddim):
        for n in (37, 73):
            if objective == "flow":
                ts = torch.linspace(1.0, 0.1, n, dtype=torch.float64).tolist()
            else:
                ts = [int(v) for v in torch.linspace(999, 99, n, dtype=torch.float64).round()]
            out = fn(den, x.clone(), ts)
            err[fn.__name__, n] = (out - _exact_ode_transport(path, x, ts[0], ts[-1])).abs().max().item()
    assert err["sample_dpmpp_2m", 73] / err["sample_dpmpp_2m", 37] < 0.35, err
    assert err["sample_ddim", 73] / err["sample_ddim", 37] > 0.45, err
    assert err["sample_ddim", 73] > 3 * err["sample_dpmpp_2m", 37], err


@pytest.mark.parametrize("objective", ["linear", "cosine", "flow"])
def test_dpmpp_3m_step_local_error_on_gaussian(objective):
    """One step from exact history (the exact ODE solution's x0 estimates at t + 2 dt, t + dt, t) to t - dt.
    A step of order p has local error O(dt^(p+1)): halving dt shrinks it by 1/8 for p = 2, 1/16 for p = 3.

    Pinned finding: DPM-Solver++(3M) as diffusers, k-diffusion and the DPM-Solver code write it (and difflo,
    to equal them) has local error O(dt^3), like 2M (ratio 0.11-0.12 here, 2M's 0.12-0.13), but 4-7x smaller. Its
    D2 = (D1_0 - D1_1) / (r0 + r1) estimates h^2 x0''/2, while its coefficient alpha (phi_2/h - 1/2) = alpha
    h phi_3(h) is the one of h^2 x0'' in the Taylor integral: twice the coefficient makes the step third order
    (ratio 0.061-0.071 here, -> 1/16), a documented difference that difflo
    does not make, so that `dpmpp_3m` equals diffusers' DPMSolverMultistepScheduler(solver_order=3)."""
    from difflo.samplers import dpmpp_2m_step, dpmpp_3m_step
    path = FlowPath() if objective == "flow" else path_for(objective)
    t0, dt0 = (0.5, 0.02) if objective == "flow" else (500, 20)
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    den = GaussianDenoiser(path, MU.double(), S.double())
    lam = lambda u: math.log(path.alpha_sigma(u)[0] / path.alpha_sigma(u)[1])
    err = {}
    for dt in (dt0, dt0 / 2):
        t2, t1, t, tp = t0 + 2 * dt, t0 + dt, t0, t0 - dt
        exact = {u: _exact_ode_transport(path, x, 1.0 if objective == "flow" else 999, u) for u in (t2, t1, t, tp)}
        m2, m1, m0 = (den(exact[u], u) for u in (t2, t1, t))
        x3 = dpmpp_3m_step(exact[t], m0, m1, m2, path, t, tp, t1, t2)
        h, r0, r1 = lam(tp) - lam(t), (lam(t) - lam(t1)) / (lam(tp) - lam(t)), (lam(t1) - lam(t2)) / (lam(tp) - lam(t))
        d2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
        taylor = x3 - path.alpha_sigma(tp)[0] * ((math.expm1(-h) + h) / h**2 - 0.5) * d2     # twice the D2 term
        err["3m", dt] = (x3 - exact[tp]).abs().max().item()
        err["taylor", dt] = (taylor - exact[tp]).abs().max().item()
        err["2m", dt] = (dpmpp_2m_step(exact[t], m0, m1, path, t, tp, t1) - exact[tp]).abs().max().item()
    ratio = {k: err[k, dt0 / 2] / err[k, dt0] for k in ("3m", "taylor", "2m")}
    assert 0.09 < ratio["3m"] < 0.14 and 0.1 < ratio["2m"] < 0.14, ratio
    assert err["3m", dt0 / 2] < err["2m", dt0 / 2] / 3, err
    assert ratio["taylor"] < 0.08, ratio                # measured 0.061-0.071


@pytest.mark.parametrize("objective", ["diffusion", "flow"])
def test_euler_ancestral_is_ddim_eta1(objective):
    """Euler ancestral (k-diffusion's sigma-space step plus ancestral noise) is, in x = alpha x_sigma, DDIM
    with eta = 1: the same states from the same noise, pure noise (flow's t = 1) included; on a variance-
    preserving path that is also DDPM with fixed_small variance (the same posterior)."""
    path = FlowPath() if objective == "flow" else path_for("cosine")
    ts = path.sampling_times(7, "trailing")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = sample_euler_ancestral(ToyDenoiser(path), x, ts, noise=SeededNoise([1, 2], SHAPE[1:]))
    b = sample_ddim(ToyDenoiser(path), x, ts, eta=1.0, noise=SeededNoise([1, 2], SHAPE[1:]))
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    if path.variance_preserving:   # and on a VP path DDIM eta = 1 is DDPM's fixed_small posterior step
        c = sample_ddpm(ToyDenoiser(path), x, ts, variance="fixed_small", noise=SeededNoise([1, 2], SHAPE[1:]))
        torch.testing.assert_close(a, c, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("fn", [sample_dpmpp_2m_sde, sample_dpmpp_3m, sample_euler_ancestral])
def test_new_samplers_final_output_is_last_x0_hat(fn):
    """Every step to the clean end is first order and noiseless: the sample is the last x0 estimate."""
    path = path_for("cosine")
    seen = []
    out = fn(ToyDenoiser(path), torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)),
             path.sampling_times(6), noise=noise_fn(torch.float32), callback=seen.append)
    assert torch.equal(out, seen[-1]["denoised"])


def test_churn_keeps_the_marginal():
    """EDM's churn moves x_t ~ q(x_t | x0) to x_hat ~ q(x_t_hat | x0) with t_hat where sigma/alpha is
    (1 + gamma) times larger: mean alpha_hat x0, std sigma_hat (N = 20000, within 5 SE)."""
    from difflo.samplers import churn
    path, t, gamma, n = FlowPath(), 0.4, 0.3, 20000
    g = torch.Generator().manual_seed(0)
    x0 = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4).double()
    a, s = path.alpha_sigma(t)
    x = a * x0 + s * torch.randn((n, 1, 4, 4), generator=g, dtype=torch.float64)
    x_hat, t_hat = churn(x, path, t, gamma, lambda: torch.randn((n, 1, 4, 4), generator=g, dtype=torch.float64))
    a_h, s_h = path.alpha_sigma(t_hat)
    assert t_hat > t and abs(s_h / a_h - (1 + gamma) * s / a) < 1e-12
    assert ((x_hat.mean(0) - a_h * x0[0]).abs() < 5 * s_h / n**0.5).all()
    assert ((x_hat.std(0) / s_h - 1).abs() < 5 * (0.5 / n) ** 0.5).all()


def test_churn_window_and_zero_churn():
    """s_churn = 0 is the plain ODE solver bit for bit (no noise drawn); outside [s_tmin, s_tmax] no churn."""
    path = FlowPath()
    ts = path.sampling_times(6)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for fn in (sample_euler, sample_heun):
        plain = fn(ToyDenoiser(path), x, ts)
        assert torch.equal(plain, fn(ToyDenoiser(path), x, ts, s_churn=0.0, noise=noise_fn(torch.float32)))
        assert torch.equal(plain, fn(ToyDenoiser(path), x, ts, s_churn=5.0, s_tmin=2.0, s_tmax=3.0,
                                     noise=noise_fn(torch.float32)))
        den = ToyDenoiser(path)
        churned = fn(den, x, ts, s_churn=5.0, s_tmin=0.3, s_tmax=0.7, noise=noise_fn(torch.float32))
        assert not torch.allclose(plain, churned)
        grid_calls = [c[0] for c in den.calls if c[0] in ts]
        assert sorted({t for t in ts[:-1] if not 0.3 <= t <= 0.7}) == sorted({t for t in grid_calls if t in ts[:-1]
                                                                            and not 0.3 <= t <= 0.7})


def test_exact_ode_transport_is_exact():
    """The reference above is right: Heun (2nd order) converges to it at rate 1/4 on the flow path."""
    path = FlowPath()
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    den = GaussianDenoiser(path, MU.double(), S.double())
    err = []
    for n in (19, 37):
        ts = torch.linspace(1.0, 0.1, n, dtype=torch.float64).tolist()
        out = sample_heun(den, x.clone(), ts)       # ends at t = 0.1: no step to the clean end
        err.append((out - _exact_ode_transport(path, x, ts[0], ts[-1])).abs().max().item())
    assert err[0] < 5e-3 and 0.2 < err[1] / err[0] < 0.3, err


# --------------------------------------------------------------------------- guidance wrappers
class CountingDenoiser:
    """x0_hat = 0.5 x + y (per sample); records every call's batch size and labels."""

    def __init__(self, path):
        self.path, self.calls = path, []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.clone()))
        return 0.5 * x + y.view(-1, 1, 1, 1).to(x.dtype) + 0.001 * t


NULL = 10


def test_cfg_weights():
    path = path_for("linear")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([2, 5])
    inner = CountingDenoiser(path)
    cond, uncond = inner(x, 300, y), inner(x, 300, torch.full_like(y, NULL))

    for w, expected in [(0.0, uncond), (1.0, cond), (3.0, uncond + 3.0 * (cond - uncond)),
                        (-0.5, uncond - 0.5 * (cond - uncond))]:
        den = CountingDenoiser(path)
        cfg = CFGDenoiser(den, w, NULL)
        assert cfg.path is path
        out = cfg(x, 300, y=y)
        torch.testing.assert_close(out, expected)
        assert len(den.calls) == 1, (w, len(den.calls))
        bs, labels = den.calls[0]
        if w == 0.0:
            assert bs == 2 and torch.equal(labels, torch.full_like(y, NULL))
        elif w == 1.0:
            assert bs == 2 and torch.equal(labels, y)
        else:   # one batched call of 2B: conditional first, then the null class
            assert bs == 4 and torch.equal(labels, torch.cat([y, torch.full_like(y, NULL)]))
    assert not torch.allclose(cond, uncond)


def test_cfg_inside_sampler_one_call_per_step():
    path = path_for("linear")
    den = CountingDenoiser(path)
    ts = path.sampling_times(6)
    y = torch.tensor([1, 2, 3])
    x = torch.randn((3, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    out = sample_ddim(CFGDenoiser(den, 4.0, NULL), x, ts, extra_args={"y": y})
    assert torch.isfinite(out).all()
    assert len(den.calls) == len(ts) - 1          # one per step: the grid has n + 1 times
    assert all(bs == 6 for bs, _ in den.calls)


def test_clamp_denoiser():
    path = path_for("linear")
    inner = CountingDenoiser(path)
    x = 4 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1])
    raw = inner(x, 100, y)
    assert raw.max() > 1 and raw.min() < -1
    clamp = ClampDenoiser(inner)
    assert clamp.path is path
    out = clamp(x, 100, y=y)
    assert out.max() <= 1 and out.min() >= -1
    torch.testing.assert_close(out, raw.clamp(-1, 1))
    torch.testing.assert_close(ClampDenoiser(inner, -0.5, 2.0)(x, 100, y=y), raw.clamp(-0.5, 2.0))
