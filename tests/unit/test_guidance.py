"""Guidance options (issue 29): the guidance interval (Kynkaanniemi et al. 2024), rescaled guidance (Lin et al.
2024, Eq. 15-16) and autoguidance (Karras et al. 2024, Eq. 2) as denoiser wrappers, composed by make_denoiser."""
import math

import pytest
import torch

from difflo import config as config_mod
from difflo.config import DiffusionConfig
from difflo.errors import ConfigError, DiffloError
from difflo.guidance import (AutoguidanceDenoiser, CFGDenoiser, ClampDenoiser, IntervalDenoiser, ModelDenoiser,
                             noise_to_signal)
from difflo.model import load_model, make_denoiser
from difflo.noise_paths import make_path
from conftest import assert_clean_error, run_cli, tiny_config

NULL = 3


class ToyNet(torch.nn.Module):
    """net(x, time, y): a prediction that depends on x, the time and the class; records each call's batch size."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(NULL + 1, 2, 1, 1, generator=g)
        self.calls = []

    def forward(self, x, time, y):
        self.calls.append(len(x))
        return torch.tanh(x * (0.3 + time.view(-1, 1, 1, 1) / 2000)) + self.emb[y] * x.mean(dim=(1, 2, 3), keepdim=True)


def paths():
    flow = DiffusionConfig(objective="flow", prediction="u")
    return [make_path(DiffusionConfig(prediction="v")), make_path(flow)]


def batch(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, 5, 5, generator=g), torch.tensor([0, 1, 2, 1][:b])


def mid_times(path):
    """Three times of the path: high, middle and low noise (noise-to-signal decreasing)."""
    ts = path.sampling_times(10, "trailing")
    return ts[1], ts[5], ts[8]


@pytest.mark.parametrize("path", paths(), ids=["diffusion", "flow"])
def test_interval_inside_is_cfg_outside_is_conditional_with_one_call(path):
    net = ToyNet()
    den = ModelDenoiser(net, path, path.predictions[-1])
    cfg = CFGDenoiser(den, 2.5, NULL)
    x, y = batch()
    high, mid, low = mid_times(path)
    lo, hi = noise_to_signal(path, low) * 1.01, noise_to_signal(path, high) * 0.99     # mid inside; high, low not
    ivl = IntervalDenoiser(cfg, den, lo, hi)
    assert torch.equal(ivl(x, mid, y=y), cfg(x, mid, y=y))
    for t in (high, low):
        net.calls.clear()
        out = ivl(x, t, y=y)
        assert net.calls == [len(x)]                    # one network call of B samples: no unconditional half
        assert torch.equal(out, den(x, t, y=y))
    # per-sample times: each row as its own time says
    tt = torch.tensor([high, mid, low, mid], dtype=torch.float64)
    net.calls.clear()
    out = ivl(x, tt, y=y)
    assert sorted(net.calls) == [2, 4]                  # 2 inside (x2 for CFG), 2 outside (x1)
    for i, t in enumerate(tt.tolist()):
        want = (cfg if lo <= noise_to_signal(path, t) <= hi else den)(x[i:i + 1], t, y=y[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], want, atol=1e-6, rtol=0)


def test_noise_to_signal_is_edm_sigma_and_infinite_at_pure_noise():
    vp, flow = paths()
    a, s = vp.alpha_sigma(500)
    assert noise_to_signal(vp, 500) == pytest.approx(s / a)
    assert noise_to_signal(flow, 0.25) == pytest.approx(1 / 3)
    assert noise_to_signal(flow, 1.0) == math.inf
    assert torch.isinf(noise_to_signal(flow, torch.tensor([1.0, 0.5], dtype=torch.float64))[0])


def v_of(path, x, x0, t):
    """difflo's v = alpha eps - sigma x0 of an x0 prediction at x, t."""
    alpha, sigma = path.alpha_sigma(t)
    eps = (x - alpha * x0) / sigma
    return alpha * eps - sigma * x0


@pytest.mark.parametrize("path", paths(), ids=["diffusion", "flow"])
def test_rescale_zero_is_cfg_and_one_matches_the_conditional_std(path):
    den = ModelDenoiser(ToyNet(), path, path.predictions[-1])
    x, y = batch()
    for t in mid_times(path):
        cfg = CFGDenoiser(den, 4.0, NULL)(x, t, y=y)
        assert torch.equal(CFGDenoiser(den, 4.0, NULL, rescale=0.0)(x, t, y=y), cfg)
        cond = den(x, t, y=y)
        full = CFGDenoiser(den, 4.0, NULL, rescale=1.0)(x, t, y=y)
        std = lambda v: v.flatten(1).std(1)                                  # noqa: E731
        torch.testing.assert_close(std(v_of(path, x, full, t)), std(v_of(path, x, cond, t)), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(std(v_of(path, x, cfg, t)), std(v_of(path, x, cond, t)))   # CFG alone does not
        half = CFGDenoiser(den, 4.0, NULL, rescale=0.5)(x, t, y=y)          # Eq. 16: linear in phi (in v, so in x0)
        torch.testing.assert_close(half, (full + cfg) / 2, rtol=1e-5, atol=1e-5)


def test_rescale_at_pure_noise_is_finite():
    """alpha = 0 (the flow path's start): the v form is defined (the eps form would divide by alpha)."""
    _, flow = paths()
    den = ModelDenoiser(ToyNet(), flow, "u")
    x, y = batch()
    out = CFGDenoiser(den, 3.0, NULL, rescale=0.7)(x, 1.0, y=y)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("w", [0.0, 1.0, 2.0, 7.5])
def test_autoguidance_by_itself_is_the_conditional_denoiser(w):
    path = paths()[0]
    den = ModelDenoiser(ToyNet(), path, "v")
    x, y = batch()
    assert torch.equal(AutoguidanceDenoiser(den, den, w)(x, 300, y=y), den(x, 300, y=y))


def test_autoguidance_w1_is_the_good_model_and_skips_the_guide():
    path = paths()[0]
    good_net, bad_net = ToyNet(0), ToyNet(1)
    good, bad = ModelDenoiser(good_net, path, "v"), ModelDenoiser(bad_net, path, "eps")
    x, y = batch()
    assert torch.equal(AutoguidanceDenoiser(good, bad, 1.0)(x, 300, y=y), good(x, 300, y=y))
    assert bad_net.calls == []
    ag = AutoguidanceDenoiser(good, bad, 2.0)(x, 300, y=y)                 # Eq. 2 with the same class for both
    torch.testing.assert_close(ag, bad(x, 300, y=y) + 2.0 * (good(x, 300, y=y) - bad(x, 300, y=y)))


# ----------------------------------------------------------------------------- make_denoiser and the front ends
@pytest.mark.slow
def test_make_denoiser_defaults_are_todays_numbers(tiny_run):
    model = load_model(tiny_run)
    y = torch.tensor([0, 1, 2, 1])
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    r = model.cfg.diffusion.clip_range
    for w in (1.0, 2.0):
        today = ClampDenoiser(CFGDenoiser(ModelDenoiser(model.net, model.path, model.cfg.diffusion.prediction),
                                          w, model.num_classes), -r, r)
        with torch.no_grad():
            want = today(x, 400, y=y)
            assert torch.equal(make_denoiser(model, w)(x, 400, y=y), want)
            assert torch.equal(make_denoiser(model, w, interval=(0.0, 1e9), rescale=0.0)(x, 400, y=y), want)
            if w == 1.0:             # no guidance: the options change nothing
                assert torch.equal(make_denoiser(model, w, interval=(5.0, 6.0), rescale=0.5, guide=model)(x, 400, y=y),
                                   want)


def test_config_validates_the_guidance_keys():
    for bad in (["sample.guidance_interval=[3, 1]"], ["sample.guidance_interval=[-1, 2]"],
                ["sample.guidance_interval=[1]"], ["sample.guidance_rescale=1.5"], ["sample.guidance_rescale=-0.1"]):
        with pytest.raises(ConfigError, match="guidance_"):
            tiny_config(*bad).validate()
    tiny_config("sample.guidance_interval=[0.3, 3]", "sample.guidance_rescale=0.7").validate()


@pytest.mark.slow
def test_sample_with_every_guidance_option(tiny_run, tmp_path):
    out = tmp_path / "s.npz"
    code, stdout, err = run_cli("sample", "--ckpt", tiny_run, "--n", 2, "--steps", 3, "--precision", "fp32",
                                "--guidance-interval", "0.5,20", "--guidance-rescale", "0.7",
                                "--guide", tiny_run / "checkpoints" / "step_0000002", "--out", out)
    assert code == 0, err
    assert "guidance_interval=(0.5, 20.0)" in stdout and "guidance_rescale=0.7" in stdout and "guide" in stdout


@pytest.mark.slow
@pytest.mark.parametrize("flags, needle", [
    (["--guidance-interval", "3,1"], "--guidance-interval=3,1 must be"),
    (["--guidance-interval=-1,2"], "--guidance-interval=-1,2 must be"),
    (["--guidance-interval", "1"], "--guidance-interval"),
    (["--guidance-interval", "1,nan"], "--guidance-interval"),
    (["--guidance-rescale", "1.5"], "--guidance-rescale=1.5 must be in [0, 1]"),
    (["--guidance-rescale", "-0.5"], "--guidance-rescale"),
    (["--guide", "no/such/run"], "--guide: checkpoint no/such/run not found"),
])
def test_bad_guidance_flags_are_one_line(tiny_run, tmp_path, flags, needle):
    code, _, err = run_cli("sample", "--ckpt", tiny_run, "--n", 1, "--steps", 2, *flags, "--out", tmp_path / "s.npz")
    assert_clean_error(code, err, needle)


def one_step_run(tmp_path_factory, name, *overrides):
    from difflo.train import train
    run = tmp_path_factory.mktemp(name)
    train(tiny_config("train.steps=1", *overrides), run, log=lambda *a: None)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("overrides, needles", [
    (("diffusion.objective=flow", "diffusion.prediction=u", "sample.sampler=euler"), ("flow objective",)),
    (("data.image_size=14",), ("14px",)),
    (("diffusion.schedule=linear",), ("noise schedule differs",)),
])
def test_a_guide_of_another_kind_is_one_line(tiny_run, tmp_path_factory, tmp_path, overrides, needles):
    other = one_step_run(tmp_path_factory, "other", *overrides)
    code, _, err = run_cli("sample", "--ckpt", tiny_run, "--n", 1, "--steps", 2, "--guide", other,
                           "--out", tmp_path / "s.npz")
    assert_clean_error(code, err, "--guide:", *needles)


@pytest.mark.slow
def test_eval_flags_reach_the_settings(tiny_run, tmp_path, cached_classifier):
    code, _, err = run_cli("eval", "nearest", "--ckpt", tiny_run, "--n-per-class", 1, "--classes", "0",
                           "--steps", 2, "--guidance-rescale", "2")
    assert_clean_error(code, err, "--guidance-rescale=2 must be in [0, 1]")
    code, _, err = run_cli("eval", "model", "--ckpt", tiny_run, "--n", 2, "--steps", 2, "--guide", tiny_run,
                           "--guidance-interval", "5,1")
    assert_clean_error(code, err, "--guidance-interval=5,1 must be")
    code, out, err = run_cli("eval", "model", "--ckpt", tiny_run, "--n", 2, "--steps", 2, "--guide", tiny_run,
                             "--guidance-interval", "1,5", "--guidance-rescale", "0.5", "--json", tmp_path / "r.json")
    assert code == 0, err
    import json
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["guidance_interval"] == [1.0, 5.0] and res["guidance_rescale"] == 0.5 and res["guide"] == str(tiny_run)


def test_guidance_options_are_not_sampler_options():
    """They apply to every sampler: no sampler's registry entry lists them, every sampler accepts them through
    settings_for (which validates them: one line naming the flag), and describe shows them."""
    from difflo.generate import describe, settings_for
    from difflo.model import Model
    from difflo.samplers import OPTIONS
    assert not {"guidance_interval", "guidance_rescale"} & set(OPTIONS)
    for overrides in ([], ["diffusion.objective=flow", "diffusion.prediction=u", "sample.sampler=euler"]):
        cfg = tiny_config(*overrides)
        model = Model(torch.nn.Identity(), cfg)
        for sampler in model.path.samplers:
            s = settings_for(model, sampler=sampler, guidance_interval=(0.5, 4.0), guidance_rescale=0.7)
            assert "guidance_interval=(0.5, 4.0)" in describe(s) and "guidance_rescale=0.7" in describe(s)
        with pytest.raises(DiffloError, match="^--guidance-interval=4,0.5 must be"):
            settings_for(model, guidance_interval=(4.0, 0.5))
        with pytest.raises(DiffloError, match=r"^--guidance-rescale=1.1 must be in \[0, 1\]$"):
            settings_for(model, guidance_rescale=1.1)


@pytest.mark.slow
def test_edit_takes_the_guidance_flags(tiny_run, tmp_path):
    code, _, err = run_cli("edit", "denoise", "--ckpt", tiny_run, "--guidance-interval", "3,1", "--out", tmp_path / "e")
    assert_clean_error(code, err, "--guidance-interval=3,1 must be")
    code, _, err = run_cli("edit", "denoise", "--ckpt", tiny_run, "--guidance-interval", "x", "--out", tmp_path / "e")
    assert_clean_error(code, err, "--guidance-interval")
    code, out, err = run_cli("edit", "denoise", "--ckpt", tiny_run, "--w", 2, "--class", 1, "--stride", 250,
                             "--i-start", 2, "--guidance-interval", "0.5,9", "--guidance-rescale", "0.5",
                             "--out", tmp_path / "e")
    assert code == 0, err
