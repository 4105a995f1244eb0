"""Samplers against diffusers: step-level equivalence with its schedulers, and the documented
differences from them. The properties that need no diffusers are in tests/test_samplers.py."""
from __future__ import annotations

import math

import pytest
import torch

from difflo import schedules
from difflo.diffusion import DiscreteSchedule, to_x0
from difflo.flow import FlowPath
from difflo.samplers import (SAMPLERS, ddim_step, ddpm_step, dpmpp_2m_step, sample_ddim, sample_dpmpp_2m,
                             sample_euler_ancestral)
from samplers_common import NOISE_SEED, SHAPE, T, ddim_closed_form, noise_fn, path_for, step_inputs, ztsnr_path

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerAncestralDiscreteScheduler)

DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _in_float64(sched, path: DiscreteSchedule):
    """Make a diffusers scheduler compute in float64 on difflo's own alpha_bar (stock diffusers keeps
    float32, whose cancellation in 1 - abar_t/abar_prev etc. costs up to ~1e-4 near t = 0 and t = T-1)."""
    sched.alphas_cumprod = path.alphas_cumprod.clone()
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


def _assert_close(got, ref, dtype):
    # float32: stock diffusers runs its coefficient arithmetic in float32; the worst deviation measured
    # over these cases is 8e-5 (relative to 1 + |ref|), at steps where it cancels catastrophically.
    # float64 (both sides on the same float64 alpha_bar): agreement to ~1e-12.
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert got.dtype == ref.dtype == dtype
    err = ((got - ref).abs() / (1 + ref.abs())).max().item()
    assert err < tol, err


def _set_grid(sched, path: DiscreteSchedule, n, spacing, dtype):
    """Set the scheduler to n steps (in float64 on difflo's alpha_bar for float64) and return difflo's grid
    for them: diffusers' timesteps, then the clean end -1."""
    if dtype == torch.float64:
        _in_float64(sched, path)
    sched.set_timesteps(n)
    ts = path.sampling_times(n, spacing)
    assert ts == sched.timesteps.tolist() + [path.t_clean]
    return ts


def _step_indices(n):
    return sorted({0, 1, n // 2, n - 2, n - 1} & set(range(n)))


# --------------------------------------------------------------------------- equivalence with diffusers
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("spacing,n", [("leading", 10), ("leading", 50), ("trailing", 10), ("trailing", 50)])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddim_step_matches_diffusers(name, prediction, eta, spacing, n, dtype):
    """For leading spacing, and trailing with n dividing T, diffusers' prev timestep t - T//n is the next
    listed timestep, so every step (the last one included: set_alpha_to_one) must agree."""
    path = path_for(name)
    sched = DDIMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name], clip_sample=False,
                          set_alpha_to_one=True, prediction_type=DIFFUSERS_PRED[prediction],
                          timestep_spacing=spacing)
    ts = _set_grid(sched, path, n, spacing, dtype)
    for i in _step_indices(n):
        t, t_prev = ts[i], ts[i + 1]
        assert t_prev == t - T // n or (t_prev == -1 and t - T // n < 0)
        x, out = step_inputs(i, dtype)
        ref = sched.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(NOISE_SEED)).prev_sample
        a, s = path.alpha_sigma(t)
        got = ddim_step(x, to_x0(out, x, a, s, prediction), path, t, t_prev, eta, noise=noise_fn(dtype))
        _assert_close(got, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("spacing,n", [("leading", 10), ("trailing", 10), ("linspace", 7), ("leading", 1000)])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddpm_step_matches_diffusers(name, prediction, variance, spacing, n, dtype):
    """diffusers' DDPMScheduler steps to the next listed timestep for every spacing (linspace too)."""
    path = path_for(name)
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name], clip_sample=False,
                          prediction_type=DIFFUSERS_PRED[prediction], variance_type=variance,
                          timestep_spacing=spacing)
    ts = _set_grid(sched, path, n, spacing, dtype)
    for i in _step_indices(n):
        t, t_prev = ts[i], ts[i + 1]
        if t_prev == -1 and t > 0 and variance == "fixed_large":
            continue   # documented difference, see test_ddpm_last_step_adds_no_noise_unlike_diffusers
        x, out = step_inputs(i, dtype)
        ref = sched.step(out, t, x, generator=torch.Generator().manual_seed(NOISE_SEED)).prev_sample
        a, s = path.alpha_sigma(t)
        got = ddpm_step(x, to_x0(out, x, a, s, prediction), path, t, t_prev, variance, noise=noise_fn(dtype))
        _assert_close(got, ref, dtype)


# --------------------------------------------------------------------------- documented differences
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_diffusers_ddim_prev_timestep_bug(spacing):
    """diffusers' DDIMScheduler.step always goes to t - T//n. With n = 7 that is 999 -> 857, a timestep
    that is not in its own list ([999, 832, ...] for linspace, [999, 856, ...] for trailing). difflo goes
    to the next listed timestep, so the two differ there; difflo's step is the closed-form DDIM step to
    that timestep, and diffusers agrees once its alpha_bar at 857 is made that of the true prev."""
    n, dtype = 7, torch.float64
    path = path_for("linear")
    sched = _in_float64(DDIMScheduler(num_train_timesteps=T, clip_sample=False, set_alpha_to_one=True,
                                      timestep_spacing=spacing), path)
    sched.set_timesteps(n)
    ts = schedules.timesteps(T, n, spacing).tolist()
    assert ts == sched.timesteps.tolist()
    t, true_prev, diffusers_prev = ts[0], ts[1], ts[0] - T // n
    assert (t, diffusers_prev) == (999, 857) and true_prev != diffusers_prev and diffusers_prev not in ts

    x, eps_out = step_inputs(0, dtype)
    ref = sched.step(eps_out, t, x, eta=0.0).prev_sample
    x0 = to_x0(eps_out, x, *path.alpha_sigma(t), "eps")

    _assert_close(ddim_step(x, x0, path, t, diffusers_prev), ref, dtype)   # what diffusers actually does
    ours = ddim_step(x, x0, path, t, true_prev)
    assert (ours - ref).abs().max().item() > 1e-2
    torch.testing.assert_close(ours, ddim_closed_form(x, x0, path, t, true_prev), atol=1e-12, rtol=1e-12)

    sched.alphas_cumprod = sched.alphas_cumprod.clone()
    sched.alphas_cumprod[diffusers_prev] = path.alphas_cumprod[true_prev]
    _assert_close(ours, sched.step(eps_out, t, x, eta=0.0).prev_sample, dtype)

    # and the sampler itself visits exactly the listed timesteps, stepping 999 -> true_prev
    class Den:
        def __init__(self):
            self.path, self.ts = path, []

        def __call__(self, x_, t_):
            self.ts.append(t_)
            return x0 if t_ == t else torch.zeros_like(x_)

    steps = []
    den = Den()
    sample_ddim(den, x, ts + [path.t_clean], callback=lambda d: steps.append(d["x"]))
    assert den.ts == ts
    torch.testing.assert_close(steps[0], ours)


def test_ddpm_last_step_adds_no_noise_unlike_diffusers():
    """Trailing spacing ends at t = T/n - 1 > 0. difflo steps from there to t = -1 and returns the
    posterior mean (= x0_hat). diffusers adds noise whenever t > 0: with fixed_large its std is
    sqrt(beta) = sqrt(1 - abar_t), so its "final" sample is still noisy."""
    path = path_for("linear")
    dtype = torch.float64
    sched = _in_float64(DDPMScheduler(num_train_timesteps=T, clip_sample=False, variance_type="fixed_large",
                                      timestep_spacing="trailing"), path)
    sched.set_timesteps(10)
    t = int(sched.timesteps[-1])
    assert t == 99
    x, eps_out = step_inputs(3, dtype)
    x0 = to_x0(eps_out, x, *path.alpha_sigma(t), "eps")

    def no_noise():
        raise AssertionError("ddpm_step drew noise on its last step")

    for variance in ("fixed_small", "fixed_large"):
        ours = ddpm_step(x, x0, path, t, -1, variance, noise=no_noise)
        torch.testing.assert_close(ours, x0, atol=1e-12, rtol=1e-12)
    ref = sched.step(eps_out, t, x, generator=torch.Generator().manual_seed(NOISE_SEED)).prev_sample
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(NOISE_SEED), dtype=dtype)
    torch.testing.assert_close(ref, ours + math.sqrt(1 - path.alphas_cumprod[t].item()) * z, atol=1e-9, rtol=1e-9)
    assert (ref - ours).abs().max().item() > 0.5


def test_ddim_leading_final_step_matches_diffusers_pred_original():
    """With set_alpha_to_one=True diffusers' last DDIM step also lands on its x0 prediction."""
    sched = DDIMScheduler(num_train_timesteps=T, clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(10)
    x, out = step_inputs(5, torch.float32)
    res = sched.step(out, 0, x, eta=0.0)
    torch.testing.assert_close(res.prev_sample, res.pred_original_sample)
    path = path_for("linear")
    x0 = to_x0(out, x, *path.alpha_sigma(0), "eps")
    assert torch.equal(ddim_step(x, x0, path, 0, -1), x0)


# --------------------------------------------------------------------------- DPM-Solver++(2M)
def _fake_net(x, t):
    """A fixed nonlinear 'network' output (any parameterization), per sample, depending on t."""
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return 0.8 * torch.tanh(x + 0.3 * m) + 0.05 * math.cos(float(t) / 100)


class _FakeDenoiser:
    """_fake_net read as a prediction of kind ``prediction``, in the input's dtype (no float32 cast)."""

    def __init__(self, path, prediction):
        self.path, self.prediction = path, prediction

    def __call__(self, x, t):
        return to_x0(_fake_net(x, t), x, *self.path.alpha_sigma(t), self.prediction)


def _dpm_scheduler(name, prediction, spacing, lower_order_final=True):
    return DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name],
                                       algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                       prediction_type=DIFFUSERS_PRED[prediction], timestep_spacing=spacing,
                                       lower_order_final=lower_order_final)


def _dpm_sigmas_float64(sched, path, ts):
    """diffusers' DPM sigmas (sqrt((1 - abar) / abar), then 0) in float64 on difflo's alpha_bar."""
    ab = path.alphas_cumprod[ts]
    sched.sigmas = torch.cat([((1 - ab) / ab).sqrt(), torch.zeros(1, dtype=torch.float64)])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("spacing,n,lower_order_final", [("trailing", 10, True), ("trailing", 10, False),
                                                         ("trailing", 25, True), ("leading", 10, True),
                                                         ("linspace", 7, True)])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_dpmpp_chain_matches_diffusers(name, prediction, spacing, n, lower_order_final, dtype):
    """The whole chain (first step first order, then 2M, the last step to sigma = 0 first order) against
    DPMSolverMultistepScheduler(dpmsolver++, order 2, midpoint) driven by the same fake network, every
    intermediate state compared. Trailing grids are equal to diffusers' own; for leading/linspace diffusers'
    DPM grid differs (see test_dpmpp_leading_linspace_grids_differ_from_diffusers), so it is given difflo's.
    Tolerances: float32 runs diffusers' float32 coefficients (worst measured 1.8e-4 relative, cosine eps,
    where x0 = (x - sigma eps) / alpha amplifies them near t = T-1); float64 runs diffusers on float64 sigmas,
    but its step() rounds the sample to float32 every step (worst measured 1.9e-6). A wrong order on any
    step (first vs second) or a wrong r moves the result by > 1e-3."""
    path = path_for(name)
    sched = _dpm_scheduler(name, prediction, spacing, lower_order_final)
    ts = schedules.timesteps(T, n, spacing)
    if spacing == "trailing":
        sched.set_timesteps(n)
        assert torch.equal(sched.timesteps, ts)
    else:
        sched.set_timesteps(timesteps=ts.tolist())
    if dtype == torch.float64:
        _dpm_sigmas_float64(sched, path, ts)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ref, got = [], []
    xr = x.clone()
    for t in sched.timesteps:
        xr = sched.step(_fake_net(xr, int(t)), t, xr).prev_sample
        ref.append(xr)
    out = sample_dpmpp_2m(_FakeDenoiser(path, prediction), x, path.sampling_times(n, spacing),
                          callback=lambda d: got.append(d["x"]))
    assert len(got) == len(ref) == n and torch.equal(out, got[-1])
    tol = 5e-4 if dtype == torch.float32 else 1e-5
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype == dtype
        err = ((g - r).abs() / (1 + r.abs())).max().item()
        assert err < tol, err


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_dpmpp_step_matches_diffusers_float64(name, prediction):
    """Single steps in float64 against diffusers' own update functions (which, unlike step(), do not round
    the sample to float32): the first-order step at i = 0, the 2M step elsewhere, to ~1e-12."""
    path = path_for(name)
    n = 10
    sched = _dpm_scheduler(name, prediction, "trailing")
    sched.set_timesteps(n)
    ts = schedules.timesteps(T, n, "trailing")
    _dpm_sigmas_float64(sched, path, ts)
    for i in (0, 1, n // 2, n - 2, n - 1):
        t, t_prev = int(ts[i]), int(ts[i + 1]) if i + 1 < n else -1
        x, out = step_inputs(i, torch.float64)
        x0 = to_x0(out, x, *path.alpha_sigma(t), prediction)
        x0_prev = (to_x0(step_inputs(i + 50, torch.float64)[1], x, *path.alpha_sigma(int(ts[i - 1])), "x0")
                   if i else None)
        sched._step_index = i
        if i in (0, n - 1):            # no history yet / the step to sigma = 0
            ref = sched.dpm_solver_first_order_update(x0, sample=x)
        else:
            ref = sched.multistep_dpm_solver_second_order_update([x0_prev, x0], sample=x)
        got = dpmpp_2m_step(x, x0, x0_prev, path, t, t_prev, int(ts[i - 1]) if i else None)
        _assert_close(got, ref, torch.float64)


@pytest.mark.parametrize("n", [5, 20])
def test_dpmpp_flow_path_matches_diffusers(n):
    """On the flow path (alpha = 1 - t, sigma = t, the network predicting u), difflo's DPM-Solver++ over
    diffusers' flow sigmas equals DPMSolverMultistepScheduler(use_flow_sigmas, flow_prediction)."""
    sched = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)
    sched.set_timesteps(n)
    ts = sched.sigmas.double().tolist()                    # 0.999 ... 0.999/n, then the clean end 0
    assert ts[-1] == FlowPath.t_clean == 0.0 and len(ts) == n + 1
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ref, got = [], []
    xr = x.clone()
    for i, t in enumerate(sched.timesteps):
        xr = sched.step(_fake_net(xr, ts[i]), t, xr).prev_sample
        ref.append(xr)
    sample_dpmpp_2m(_FakeDenoiser(FlowPath(), "u"), x, ts, callback=lambda d: got.append(d["x"]))
    for g, r in zip(got, ref):
        _assert_close(g, r, torch.float32)


def test_dpmpp_leading_linspace_grids_differ_from_diffusers():
    """Documented difference: difflo gives every sampler the same timestep grid (schedules.timesteps, equal
    to diffusers' DDIM/DDPM grids). diffusers' DPM scheduler builds leading and linspace from n + 1 points
    and drops the last, a different grid; trailing agrees. So `--sampler dpmpp --spacing leading` visits
    difflo's leading grid; passing that grid to diffusers (set_timesteps(timesteps=...)) makes the samplers
    agree (test_dpmpp_chain_matches_diffusers)."""
    n = 10
    for spacing, theirs in [("leading", [900, 810, 720, 630, 540, 450, 360, 270, 180, 90]),
                            ("linspace", [999, 899, 799, 699, 599, 500, 400, 300, 200, 100])]:
        sched = _dpm_scheduler("linear", "eps", spacing)
        sched.set_timesteps(n)
        assert sched.timesteps.tolist() == theirs
        ddim = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        ddim.set_timesteps(n)
        assert schedules.timesteps(T, n, spacing).tolist() == ddim.timesteps.tolist() != theirs
    sched = _dpm_scheduler("linear", "eps", "trailing")
    sched.set_timesteps(n)
    assert sched.timesteps.tolist() == schedules.timesteps(T, n, "trailing").tolist()




# --------------------------------------------------------------------------- issue 19: the new samplers and grids
DPM_FAMILY = {"dpmpp": {"algorithm_type": "dpmsolver++", "solver_order": 2},
              "dpmpp_2m_sde": {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
              "dpmpp_3m": {"algorithm_type": "dpmsolver++", "solver_order": 3}}
GRID_CASES = [("trailing", 10), ("trailing", 20), ("leading", 10), ("karras", 10), ("karras", 20), ("exponential", 10)]


def _nsr(path, t):
    a, s = path.alpha_sigma(t)
    return s / a


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("spacing,n", GRID_CASES)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("sampler", sorted(DPM_FAMILY))
def test_dpm_family_chain_matches_diffusers(sampler, name, prediction, spacing, n, dtype):
    """DPM-Solver++(2M), its SDE variant and (3M) against DPMSolverMultistepScheduler (midpoint, the defaults:
    lower_order_final, final_sigmas_type="zero") over difflo's grids, every state compared; the SDE's noise
    is the same tensor on both sides (diffusers' variance_noise). n = 10 and 20 cover 3M's lower-order
    ending below 15 steps. diffusers is given difflo's grid as sigmas (sqrt((1 - abar) / abar) at difflo's
    times, in float64 for f64): for trailing grids and Karras/exponential noise levels these equal its own
    (test_schedules_vs_diffusers.py); the network is called at difflo's (fractional) time, where diffusers'
    DPM scheduler would call it at a rounded one (see test_karras_timesteps_of_dpm_scheduler_are_rounded).
    Tolerances: float32 5e-4 relative (worst measured 3.1e-4, 2M SDE, cosine eps on the Karras grid, whose
    first steps sit at alpha ~ 1e-4); float64 5e-5 (diffusers' step() rounds the sample to float32 every step;
    worst measured 1.1e-5). A wrong order or coefficient on any step moves a state by > 1e-3."""
    path = path_for(name)
    ts = path.sampling_times(n, spacing)
    sched = DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name],
                                        solver_type="midpoint", prediction_type=DIFFUSERS_PRED[prediction],
                                        **DPM_FAMILY[sampler])
    sched.set_timesteps(timesteps=[int(round(t)) for t in ts[:-1]] if spacing not in ("karras", "exponential")
                        else list(range(n - 1, -1, -1)))    # any n decreasing integers: the sigmas are set below
    sched.sigmas = torch.tensor([_nsr(path, t) for t in ts], dtype=torch.float64 if dtype == torch.float64
                                else torch.float32)
    sched.set_begin_index(0)
    g = torch.Generator().manual_seed(NOISE_SEED)
    noises = [torch.randn(SHAPE, generator=g, dtype=dtype) for _ in range(n)]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=dtype)
    ref, got = [], []
    xr = x.clone()
    for i, t in enumerate(sched.timesteps):
        xr = sched.step(_fake_net(xr, ts[i]), t, xr, variance_noise=noises[i]).prev_sample
        ref.append(xr)
    draws = iter(noises)
    out = SAMPLERS[sampler](_FakeDenoiser(path, prediction), x, ts, noise=lambda: next(draws),
                            callback=lambda d: got.append(d["x"]))
    assert len(got) == len(ref) == n and torch.equal(out, got[-1])
    tol = 5e-4 if dtype == torch.float32 else 5e-5
    for i, (g_, r) in enumerate(zip(got, ref)):
        assert g_.dtype == r.dtype == dtype
        err = ((g_ - r).abs() / (1 + r.abs())).max().item()
        assert err < tol, (i, err)


@pytest.mark.parametrize("n", [10, 20])
def test_dpm_family_orders_differ(n):
    """The three DPM samplers are different chains (a wrong registry entry or a 3M that never reaches third
    order would make two of them equal): their outputs differ by > 1e-3 on the same noise."""
    path = path_for("linear")
    ts = path.sampling_times(n, "trailing")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    outs = {name: SAMPLERS[name](_FakeDenoiser(path, "eps"), x, ts, noise=noise_fn(torch.float64))
            for name in DPM_FAMILY}
    for a in outs:
        for b in outs:
            if a < b:
                assert (outs[a] - outs[b]).abs().max().item() > 1e-3, (a, b)


@pytest.mark.parametrize("spacing,n", [("trailing", 10), ("trailing", 25), ("leading", 10)])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_euler_ancestral_matches_diffusers(name, prediction, spacing, n):
    """Euler ancestral against diffusers' EulerAncestralDiscreteScheduler on its own grid (trailing, leading:
    integer timesteps): every step of difflo's chain, from difflo's state before it, against diffusers' step
    from the same state. diffusers works in k-diffusion's scaled variable x / alpha (its sample; the model sees
    scale_model_input = x); difflo's state is x = alpha (x / alpha), so a state is multiplied by
    sqrt(1 + sigma^2) going in and divided by sqrt(1 + sigma_next^2) coming out. The same noise draws (one per
    step; diffusers also draws one on its last step, with weight 0). diffusers computes in float32 only
    (step() casts the sample), and x / alpha is sigma times larger than x: at cosine's t = 999 (sigma = 2e4)
    its step x/alpha + (sigma_down - sigma) d cancels ~4 digits (6.3e-4 measured there, v-prediction), so the
    tolerance per step is 2e-5 + 1e-7 sigma; elsewhere the worst measured is 2.9e-6."""
    path = path_for(name)
    sched = EulerAncestralDiscreteScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name],
                                            prediction_type=DIFFUSERS_PRED[prediction], timestep_spacing=spacing)
    sched.set_timesteps(n)
    ts = path.sampling_times(n, spacing)
    assert sched.timesteps.tolist() == ts[:-1]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    got = [x]
    sample_euler_ancestral(_FakeDenoiser(path, prediction), x, ts, noise=noise_fn(torch.float32),
                           callback=lambda d: got.append(d["x"]))
    g = torch.Generator().manual_seed(NOISE_SEED)
    for i, t in enumerate(sched.timesteps):
        sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
        sched._step_index = i
        x_sigma = got[i] * (1 + sigma**2) ** 0.5                # difflo's state in diffusers' variable
        out = _fake_net(sched.scale_model_input(x_sigma, t), int(t))
        ref = sched.step(out, t, x_sigma, generator=g).prev_sample / (1 + sigma_next**2) ** 0.5
        err = ((got[i + 1] - ref).abs() / (1 + ref.abs())).max().item()
        assert err < 2e-5 + 1e-7 * sigma.item(), (i, err)


@pytest.mark.parametrize("n", [5, 10, 50])
def test_zero_terminal_snr_ddim_chain_matches_diffusers(n):
    """A zero-terminal-SNR schedule (diffusion.zero_terminal_snr) with v-prediction: DDIM from t = 999, where
    alpha = 0 (x0 = -v there), against DDIMScheduler(rescale_betas_zero_snr=True, trailing spacing, the
    configuration Lin et al. 2024 recommend), every state compared in float64 on difflo's alpha_bar."""
    path = ztsnr_path("linear")
    sched = DDIMScheduler(num_train_timesteps=T, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                          prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=True)
    torch.testing.assert_close(sched.alphas_cumprod, path.alphas_cumprod.float(), atol=1e-6, rtol=1e-5)
    ts = _set_grid(sched, path, n, "trailing", torch.float64)
    assert ts[0] == T - 1 and path.alpha_sigma(ts[0]) == (0.0, 1.0)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref, got = [], []
    xr = x.clone()
    for t in ts[:-1]:
        xr = sched.step(_fake_net(xr, t), t, xr, eta=0.0).prev_sample
        ref.append(xr)
    sample_ddim(_FakeDenoiser(path, "v"), x, ts, callback=lambda d: got.append(d["x"]))
    for g_, r in zip(got, ref):
        _assert_close(g_, r, torch.float64)


@pytest.mark.parametrize("n", [1, 4, 10])
def test_flow_euler_and_heun_match_diffusers(n):
    """Euler and Heun on the flow path (no churn) against FlowMatchEulerDiscreteScheduler and
    FlowMatchHeunDiscreteScheduler (shift 1) given difflo's uniform grid, every state compared (float32; the
    network predicts u = x1 - x0, diffusers' flow model output). Heun's last step is Euler in both.
    Churn is not compared: diffusers' FlowMatchHeun adds its churn noise after the network call whose output it
    then uses, without the path's alpha scaling; difflo's churn is EDM's Algorithm 2 (the network evaluated at
    the churned point), which keeps the path's marginals (tests/unit/test_samplers.py::test_churn_keeps_the_marginal)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    from difflo.samplers import sample_euler, sample_heun
    path = FlowPath()
    ts = path.sampling_times(n)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    s = torch.tensor(ts, dtype=torch.float32)
    for fn, sched in [(sample_euler, FlowMatchEulerDiscreteScheduler(shift=1.0)),
                      (sample_heun, FlowMatchHeunDiscreteScheduler(shift=1.0))]:
        got = []
        fn(_FakeDenoiser(path, "u"), x, ts, callback=lambda d: got.append(d["x"]))
        if fn is sample_euler:
            sched.set_timesteps(sigmas=ts[:-1])
            assert torch.equal(sched.sigmas, s)
            calls = [(i, ts[i]) for i in range(n)]
        else:
            sched.set_timesteps(n)
            sched.sigmas = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
            sched.timesteps = 1000 * torch.cat([s[:1], s[1:-1].repeat_interleave(2)])
            calls = [(i, u) for i in range(n) for u in ((ts[i], ts[i + 1]) if i < n - 1 else (ts[i],))]
        sched.set_begin_index(0)
        xr, ref = x.clone(), []
        for k, (i, t) in enumerate(calls):
            xr = sched.step(_fake_net(xr, t), sched.timesteps[k], xr).prev_sample
            if fn is sample_euler or t != ts[i] or i == n - 1:     # the end of step i
                ref.append(xr)
        assert len(ref) == len(got) == n
        for g_, r in zip(got, ref):
            _assert_close(g_, r, torch.float32)
