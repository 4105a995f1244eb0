"""Editing techniques: wrappers and callbacks around the shared samplers (see docs/editing.md)."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import assert_clean_error, run_cli
from difflo.edit import operators, techniques
from difflo.cli import main
from difflo.errors import DiffloError
from difflo.images import load_image, load_mask
from difflo.model import load_model, make_denoiser
from difflo.generate import generate, settings_for


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """On a loaded 2-core machine, 2 intra-op threads make these small convolutions ~30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model(tiny_run):
    return load_model(tiny_run)


def _digit(path, size=28, mode="L"):
    img = Image.new(mode, (size, size), 0)
    ImageDraw.Draw(img).line([(8, 6), (20, 6), (12, 22)], fill=255 if mode == "L" else (255,) * len(mode), width=3)
    img.save(path)
    return path


def test_inpaint_keeps_known_pixels(model):
    den = make_denoiser(model, 2.0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 28, 28, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., 8:20, 5:15] = 1
    ts = model.path.sampling_times(5)
    y = torch.tensor([3, 4])
    for kw in ({}, {"jump_length": 2, "jump_n_sample": 2}):
        out = operators.inpaint(den, x, mask, y, ts, [0, 1], "ddpm", **kw)
        known = mask.expand_as(x) == 0
        assert torch.allclose(out[known], x[known], atol=1e-6)
        assert not torch.allclose(out[~known], x[~known], atol=1e-2)


def test_repaint_chunks():
    assert operators.repaint_chunks(5, 2, 2) == [(0, 2, False), (0, 2, True), (2, 4, False), (2, 4, True),
                                                 (4, 5, False), (4, 5, True)]


def test_sdedit_zero_and_full_strength(model):
    den = make_denoiser(model, 3.0)
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    ts = model.path.sampling_times(6)                       # 6 steps: 7 times, the last the clean end
    y = torch.tensor([1, 7])
    assert torch.equal(operators.sdedit(den, x, y, ts, 0, [5, 6]), x)
    for sampler in ("ddim", "ddpm"):
        full = operators.sdedit(den, x, y, ts, len(ts) - 1, [5, 6], sampler)
        plain = generate(model, y, [5, 6], settings_for(model, sampler=sampler, steps=6, w=3.0))
        assert torch.allclose(full, plain, atol=1e-5)
    part = operators.sdedit(den, x, y, ts, 2, [5, 6])
    assert not torch.allclose(part, full, atol=1e-3)


def test_anagram_identity_equals_conditional_sampling(model):
    den = operators.AnagramDenoiser(make_denoiser(model, 2.0, clip_x0=False), ["identity", "identity"])
    from difflo.guidance import ClampDenoiser
    ts = model.path.sampling_times(4)
    y = torch.tensor([[2, 2], [6, 6]])
    out = operators.sample_plain(ClampDenoiser(den), y, ts, [0, 1], (1, 28, 28), "ddim")
    plain = generate(model, torch.tensor([2, 6]), [0, 1], settings_for(model, sampler="ddim", steps=4, w=2.0))
    assert torch.allclose(out, plain, atol=1e-5)


def _eps(den, x, t, y):
    a, s = den.path.alpha_sigma(t)
    return (x - a * den(x, t, y=y)) / s


def test_wrappers_match_the_eps_formulas(model):
    base = make_denoiser(model, 2.0, clip_x0=False)
    x, t = torch.randn(2, 1, 28, 28), 600
    a, s = model.path.alpha_sigma(t)
    A, B = torch.tensor([6, 1]), torch.tensor([9, 7])
    for view in ("flip", "rot90", "rot180", "hflip"):
        assert torch.equal(operators.apply_view(operators.apply_view(x, view), view, inverse=True), x)
        ana = operators.AnagramDenoiser(base, ["identity", view])
        eps = (_eps(base, x, t, A) + operators.apply_view(_eps(base, operators.apply_view(x, view), t, B), view,
                                                        inverse=True)) / 2
        assert torch.allclose((x - a * ana(x, t, y=torch.stack([A, B], 1))) / s, eps, atol=1e-4)
    hyb = operators.HybridDenoiser(base, 7, 1.5)
    lp = hyb.lowpass
    eA, eB = _eps(base, x, t, A), _eps(base, x, t, B)
    eps = lp(eA) + (eB - lp(eB))
    assert torch.allclose((x - a * hyb(x, t, y=torch.stack([A, B], 1))) / s, eps, atol=1e-4)


def test_hybrid_all_pass_low_equals_class_a(model):
    for size, sigma in ((1, 2.0), (5, 0.0)):
        hyb = operators.HybridDenoiser(make_denoiser(model, 2.0), size, sigma)
        out = operators.sample_plain(hyb, torch.tensor([[3, 8]]), model.path.sampling_times(4), [4], (1, 28, 28))
        plain = generate(model, torch.tensor([3]), [4], settings_for(model, sampler="ddim", steps=4, w=2.0))
        assert torch.allclose(out, plain, atol=1e-5)


def test_gaussian_blur_preserves_mean_and_psnr():
    x = torch.rand(1, 1, 28, 28) * 2 - 1
    assert torch.allclose(operators.gaussian_blur(torch.full_like(x, 0.3), 9, 2.0), torch.full_like(x, 0.3))
    assert operators.psnr(x, x) == float("inf")
    assert abs(operators.psnr(torch.zeros_like(x) + 0.2, torch.zeros_like(x)) - 20.0) < 1e-4   # mse 0.01 on [0, 1]


def test_strided_and_cli_times(model):
    from difflo.diffusion import DiscreteSchedule
    from difflo.flow import FlowPath
    ts = DiscreteSchedule.from_name("cosine", 1000).strided_times(30)
    assert ts[:3] == [990, 960, 930] and ts[-2:] == [0, -1] and len(ts) == 35    # 34 steps, then the clean end
    fts = FlowPath().strided_times(250)
    assert fts == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert FlowPath().time_from_cli(500) == 0.5
    with pytest.raises(DiffloError, match="out of range"):
        techniques.cli_times(model, [5000])


def test_image_loading_converts_and_refuses(tmp_path):
    rgb = _digit(tmp_path / "rgb.png", 56, "RGB")
    notes = []
    x = load_image(rgb, 1, 28, notes)
    assert x.shape == (1, 1, 28, 28) and x.min() >= -1 and x.max() <= 1 and x.max() > 0.5
    assert any("converted RGB to L" in n for n in notes) and any("resized 56x56" in n for n in notes)
    rgba = Image.new("RGBA", (28, 28), (198, 123, 8, 0))          # transparent orange: the background once composited
    rgba.save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png", 1, 28).min() == 1                      # default white
    assert load_image(tmp_path / "rgba.png", 1, 28, background=(0, 0, 0)).max() == -1
    assert torch.equal(load_image(tmp_path / "rgba.png", 3, 28, background=(0, 0, 255))[0, :, 0, 0],
                       torch.tensor([-1.0, -1.0, 1.0]))
    assert load_image(rgb, 3, 28).shape == (1, 3, 28, 28)
    Image.new("L", (20, 20), 255).save(tmp_path / "mask.png")
    with pytest.raises(DiffloError, match="mask .* is 20x20 but image .* is 56x56"):
        load_mask(tmp_path / "mask.png", rgb, 28)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(DiffloError, match="cannot read image"):
        load_image(tmp_path / "bad.png", 1, 28)


def test_cli_errors_are_one_line(tiny_run, tmp_path, capsys):
    img = _digit(tmp_path / "d.png")
    Image.new("L", (14, 14), 255).save(tmp_path / "m.png")
    base = ["--ckpt", str(tiny_run), "--out", str(tmp_path / "o"), "--steps", "2"]
    cases = [(["inpaint", "--image", str(img), "--mask", str(tmp_path / "m.png"), "--class", "1"], "mask"),
             (["anagram", "--a", "6", "--b", "10"], "class index 10 out of range in --b"),
             (["sdedit", "--image", str(img), "--class", "-1", "--stride", "300", "--ckpt", str(tiny_run),
               "--out", str(tmp_path / "o")], "out of range")]
    for argv, msg in cases:
        full = argv if "--ckpt" in argv else argv + base
        code, _, err = run_cli("edit", *full)
        assert_clean_error(code, err, msg)


@pytest.mark.slow
def test_cli_writes_figure_and_raw(tiny_run, tmp_path):
    img = _digit(tmp_path / "d.png")
    mask = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(mask).rectangle([0, 14, 27, 27], fill=255)
    mask.save(tmp_path / "m.png")
    common = ["--ckpt", str(tiny_run), "--n", "2"]
    runs = {"forward": ["--image", str(img), "--t", "100,900"],
            "denoise": ["--image", str(img), "--stride", "300", "--i-start", "1"],
            "sdedit": ["--image", str(img), "--class", "3", "--stride", "300", "--levels", "0,1,4"],
            "inpaint": ["--image", str(img), "--mask", str(tmp_path / "m.png"), "--class", "3", "--steps", "3"],
            "anagram": ["--a", "6", "--b", "9", "--steps", "2"],
            "hybrid": ["--low", "1", "--high", "8", "--steps", "2", "--figure", str(tmp_path / "fig.png")]}
    for tech, argv in runs.items():
        out = tmp_path / tech
        assert main(["edit", tech, "--out", str(out)] + common + argv) == 0
        assert (out / "figure.png").exists() and (out / "result_00.png").exists()
        raw = np.load(out / "raw.npz")
        assert raw["seeds"].tolist() == [0, 1]
    assert (tmp_path / "fig.png").exists()
    sd = np.load(tmp_path / "sdedit" / "raw.npz")
    assert np.array_equal(sd["level_0"], np.repeat(sd["input"], 2, 0))
