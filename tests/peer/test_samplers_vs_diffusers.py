"""Samplers against diffusers: step-level equivalence with its schedulers, and the documented
differences from them. The properties that need no diffusers are in tests/test_samplers.py."""
from __future__ import annotations

import math

import pytest
import torch

from difflo import schedules
from difflo.diffusion import DiscreteSchedule, to_x0
from difflo.flow import FlowPath
from difflo.samplers import ddim_step, ddpm_step, dpmpp_2m_step, sample_ddim, sample_dpmpp_2m
from samplers_common import NOISE_SEED, SHAPE, T, ddim_closed_form, noise_fn, path_for, step_inputs

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler  # noqa: E402

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


