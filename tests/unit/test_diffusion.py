"""The forward process, the eps / x0 / v parameterizations, loss weights and the training loss. The
comparisons with diffusers are in tests/peer/test_diffusion_vs_diffusers.py."""
from __future__ import annotations

import pytest
import torch

from difflo import diffusion
from difflo.diffusion import DiscreteSchedule, loss_weight, q_sample, target, to_eps, to_x0, training_loss

# The variance-preserving parameterizations; "u" (flow velocity) lives on the flow path: tests/test_flow.py.
VP_PREDICTIONS = ("eps", "x0", "v")

SHAPE = (6, 3, 5, 5)
TS = torch.tensor([0, 1, 17, 500, 998, 999])


def _randn(seed, shape=SHAPE, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------- forward process
def test_q_sample_scalar_coefficients_and_clean_limit():
    path = DiscreteSchedule.from_name("linear")
    x0, eps = _randn(0), _randn(1)
    a, s = path.alpha_sigma(300)
    torch.testing.assert_close(q_sample(x0, eps, a, s), a * x0 + s * eps)
    a, s = path.alpha_sigma(-1)
    assert torch.equal(q_sample(x0, eps, a, s), x0)         # t = -1 is the clean data


# --------------------------------------------------------------------------- parameterizations
@pytest.mark.parametrize("prediction", VP_PREDICTIONS)
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_conversions_are_mutual_inverses(prediction, name):
    """target(x0, eps) fed to to_x0 / to_eps gives back x0 / eps, and any output o is recovered from
    the (x0, eps) it implies. float64 throughout, per-sample (B,) coefficients including t = 0, T-1."""
    path = DiscreteSchedule.from_name(name)
    x0, eps, out = (_randn(k, dtype=torch.float64) for k in (10, 11, 12))
    alpha, sigma = path.alpha_sigma(TS)
    x_t = q_sample(x0, eps, alpha, sigma)

    tgt = target(x0, eps, alpha, sigma, prediction)
    torch.testing.assert_close(to_x0(tgt, x_t, alpha, sigma, prediction), x0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(to_eps(tgt, x_t, alpha, sigma, prediction), eps, atol=1e-9, rtol=1e-9)

    # the other direction: an arbitrary output -> (x0_hat, eps_hat) -> the same output
    x0_hat = to_x0(out, x_t, alpha, sigma, prediction)
    eps_hat = to_eps(out, x_t, alpha, sigma, prediction)
    torch.testing.assert_close(q_sample(x0_hat, eps_hat, alpha, sigma), x_t, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(target(x0_hat, eps_hat, alpha, sigma, prediction), out, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("prediction", VP_PREDICTIONS)
def test_conversions_with_python_float_coefficients(prediction):
    path = DiscreteSchedule.from_name("cosine")
    a, s = path.alpha_sigma(400)
    x0, eps = _randn(3, dtype=torch.float64), _randn(4, dtype=torch.float64)
    x_t = q_sample(x0, eps, a, s)
    tgt = target(x0, eps, a, s, prediction)
    torch.testing.assert_close(to_x0(tgt, x_t, a, s, prediction), x0)
    torch.testing.assert_close(to_eps(tgt, x_t, a, s, prediction), eps)


def test_target_values_and_v_sign_convention():
    path = DiscreteSchedule.from_name("linear")
    x0, eps = _randn(5, dtype=torch.float64), _randn(6, dtype=torch.float64)
    alpha, sigma = path.alpha_sigma(TS)
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    assert torch.equal(target(x0, eps, alpha, sigma, "eps"), eps)
    assert torch.equal(target(x0, eps, alpha, sigma, "x0"), x0)
    # v = alpha eps - sigma x0 (Salimans & Ho 2022), not the opposite sign
    torch.testing.assert_close(target(x0, eps, alpha, sigma, "v"), a * eps - s * x0)
    # at t = -1 (alpha = 1, sigma = 0) v is eps
    torch.testing.assert_close(target(x0, eps, 1.0, 0.0, "v"), eps)


@pytest.mark.parametrize("fn", [to_x0, to_eps, target])
def test_unknown_prediction_raises(fn):
    x = _randn(0)
    with pytest.raises(ValueError):
        fn(x, x, 0.5, 0.5, "score")


# --------------------------------------------------------------------------- loss weights
SNR = torch.logspace(-4, 4, 41, dtype=torch.float64)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights(gamma):
    m = torch.minimum(SNR, torch.full_like(SNR, gamma))
    torch.testing.assert_close(loss_weight(SNR, "eps", "min_snr", gamma), m / SNR)
    torch.testing.assert_close(loss_weight(SNR, "x0", "min_snr", gamma), m)
    torch.testing.assert_close(loss_weight(SNR, "v", "min_snr", gamma), m / (SNR + 1))
    # spot values: above gamma the eps weight is gamma/snr, below it 1
    w = loss_weight(torch.tensor([gamma / 2, 4 * gamma], dtype=torch.float64), "eps", "min_snr", gamma)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.25], dtype=torch.float64))


def test_min_snr_weights_agree_across_parameterizations():
    """Each weight times the prediction-space MSE gives the same x0-space weight min(SNR, gamma):
    ||eps err||^2 = SNR ||x0 err||^2 and ||v err||^2 = (SNR + 1) ||x0 err||^2."""
    x0w = loss_weight(SNR, "x0", "min_snr")
    torch.testing.assert_close(loss_weight(SNR, "eps", "min_snr") * SNR, x0w)
    torch.testing.assert_close(loss_weight(SNR, "v", "min_snr") * (SNR + 1), x0w)


@pytest.mark.parametrize("prediction", VP_PREDICTIONS)
def test_no_weighting_is_ones(prediction):
    w = loss_weight(SNR, prediction, "none")
    assert w.shape == SNR.shape and torch.equal(w, torch.ones_like(SNR))


def test_unknown_weighting_raises():
    with pytest.raises(ValueError):
        loss_weight(SNR, "eps", "p2")


# --------------------------------------------------------------------------- training loss
B, C, H, W = 8, 3, 6, 6
NUM_CLASSES = 10


def _x0_y():
    x0 = torch.linspace(-1, 1, B * C * H * W).reshape(B, C, H, W).sin()
    y = torch.arange(B) % NUM_CLASSES
    return x0, y


def _draw(schedule, seed):
    """Replicates training_loss's draws: t first, then eps, from one generator."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, schedule.T, (B,), generator=g)
    eps = torch.randn((B, C, H, W), generator=g)
    return t, eps


class PerfectNet:
    """Knows x0 and the eps that training_loss will draw, and computes its answer from the x_t and
    time it is given (so a wrong x_t, t or target in training_loss shows up as a nonzero loss)."""

    def __init__(self, x0, eps, y, schedule, prediction):
        self.x0, self.eps, self.y, self.schedule, self.prediction = x0, eps, y, schedule, prediction
        self.calls = 0

    def __call__(self, x_t, time, y):
        self.calls += 1
        assert torch.equal(y, self.y)
        assert time.dtype == torch.float32
        t = time.round().long()
        a, s = self.schedule.alpha_sigma(t)
        a, s = a.view(-1, 1, 1, 1).float(), s.view(-1, 1, 1, 1).float()
        if self.prediction == "eps":
            return (x_t - a * self.x0) / s
        if self.prediction == "x0":
            return (x_t - s * self.eps) / a
        eps_hat = (x_t - a * self.x0) / s
        return a * eps_hat - s * self.x0


@pytest.mark.parametrize("weighting", ["none", "min_snr"])
@pytest.mark.parametrize("prediction", VP_PREDICTIONS)
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_training_loss_perfect_net_is_zero(name, prediction, weighting):
    schedule = DiscreteSchedule.from_name(name)
    x0, y = _x0_y()
    t, eps = _draw(schedule, seed=123)
    net = PerfectNet(x0, eps, y, schedule, prediction)
    loss = training_loss(net, x0, y, schedule, prediction, weighting, generator=torch.Generator().manual_seed(123))
    assert net.calls == 1
    assert loss.ndim == 0 and torch.isfinite(loss)
    # float32 round-off only (the x0 net divides by alpha_t, which is ~0.006 at t = T-1)
    assert loss.item() < 1e-6, loss.item()

    # the same net off by a constant 0.1 everywhere: loss = 0.01 * mean_b w(t_b)
    def shifted(x_t, time, y):
        return net(x_t, time, y) + 0.1

    loss = training_loss(shifted, x0, y, schedule, prediction, weighting, generator=torch.Generator().manual_seed(123))
    a, s = schedule.alpha_sigma(t)
    w = loss_weight((a**2 / s**2).float(), prediction, weighting)
    torch.testing.assert_close(loss, 0.01 * w.mean(), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("prediction", VP_PREDICTIONS)
def test_training_loss_zero_net(prediction):
    schedule = DiscreteSchedule.from_name("linear")
    x0, y = _x0_y()
    t, eps = _draw(schedule, seed=7)
    loss = training_loss(lambda x, time, y: torch.zeros_like(x), x0, y, schedule, prediction,
                         generator=torch.Generator().manual_seed(7))
    assert loss.item() > 0
    # with no weighting the loss is exactly mean ||target||^2
    a, s = schedule.alpha_sigma(t)
    expected = target(x0, eps, a, s, prediction).float().pow(2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_training_loss_min_snr_weighting_applied():
    schedule = DiscreteSchedule.from_name("cosine")
    x0, y = _x0_y()
    t, eps = _draw(schedule, seed=3)
    a, s = schedule.alpha_sigma(t)
    snr = (a**2 / s**2).float()
    mse = eps.pow(2).mean(dim=(1, 2, 3))
    loss = training_loss(lambda x, time, y: torch.zeros_like(x), x0, y, schedule, "eps", "min_snr", gamma=5.0,
                         generator=torch.Generator().manual_seed(3))
    expected = (torch.clamp(snr, max=5.0) / snr * mse).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_training_loss_deterministic_given_generator():
    schedule = DiscreteSchedule.from_name("linear")
    x0, y = _x0_y()

    def net(x, time, y):
        return 0.5 * x + 1e-3 * time.view(-1, 1, 1, 1) + 0.1 * y.view(-1, 1, 1, 1).float()

    l1 = training_loss(net, x0, y, schedule, "eps", generator=torch.Generator().manual_seed(42))
    l2 = training_loss(net, x0, y, schedule, "eps", generator=torch.Generator().manual_seed(42))
    l3 = training_loss(net, x0, y, schedule, "eps", generator=torch.Generator().manual_seed(43))
    assert torch.equal(l1, l2)
    assert not torch.equal(l1, l3)
