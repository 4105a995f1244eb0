"""difflo distill: progressive distillation's target on exact Gaussian data, reflow pairs = the teacher's ODE endpoints,
exact resume, a student of a student, the student as a normal checkpoint, and bad inputs (one line each)."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from difflo import checkpoint, config as config_mod, distill as distill_mod, guards
from difflo.distill import (DistillOptions, distill, make_pairs, step_times, truncated_snr_weight,
                            two_step_target)
from difflo.generate import generate, settings_for
from difflo.model import build_net, load_model
from difflo.samplers import ddim_step
from difflo.train import train
from conftest import assert_clean_error, run_cli, tiny_config
from samplers_common import MU, S, GaussianDenoiser, path_for, ztsnr_path

quiet = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Tiny trained teachers: diffusion (v-prediction, sample.w 2) and flow (u), and an unconditional diffusion one."""
    root = tmp_path_factory.mktemp("teachers")
    train(tiny_config("train.steps=2", "sample.w=2"), root / "diffusion", log=lambda *a: None, progress=False)
    train(tiny_config("train.steps=2", "diffusion.objective=flow", "diffusion.prediction=u", "sample.sampler=euler",
                      "sample.w=2"), root / "flow", log=lambda *a: None, progress=False)
    cfg = load_model(root / "diffusion").cfg                      # the same, unconditional (no null class)
    cfg.model.num_classes = 0
    torch.manual_seed(0)
    sd = build_net(cfg).state_dict()
    checkpoint.save_checkpoint(root / "uncond", 1, cfg.to_dict(), sd, sd, {"step": 1})
    return root


def progressive_options(teacher, **kw) -> DistillOptions:
    return DistillOptions(teacher=str(teacher), method="progressive", **{
        "teacher_steps": 8, "rounds": 2, "steps_per_round": 2, "batch_size": 4, "ckpt_every": 1, **kw})


def reflow_options(teacher, **kw) -> DistillOptions:
    return DistillOptions(teacher=str(teacher), method="reflow", **{
        "pairs": 6, "pair_steps": 3, "pair_sampler": "heun", "train_steps": 4, "batch_size": 4, "ckpt_every": 1, **kw})


# ----------------------------------------------------------------------------- the numerics
class PerSample:
    """A denoiser taking one time per sample, from one that takes one time per batch."""

    def __init__(self, den):
        self.den, self.path = den, den.path

    def __call__(self, x, t):
        return torch.cat([self.den(x[i:i + 1], int(t[i])) for i in range(len(x))])


@pytest.mark.parametrize("path", [path_for("cosine"), path_for("linear"), ztsnr_path("cosine")],
                         ids=["cosine", "linear", "cosine-ztsnr"])
def test_target_makes_one_student_step_land_on_two_teacher_steps(path):
    """Exact Gaussian data, its exact denoiser as the teacher: for every student step of 1..16-step grids, one DDIM
    step (the library's ddim_step) from z_t with the target x0~ lands on the teacher's two DDIM steps z_t''."""
    den = GaussianDenoiser(path, MU.double(), S.double())
    z = torch.randn((3, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.3
    for n in (1, 2, 4, 16):
        times = step_times(path, n)
        assert times[:, 0].tolist() + [-1] == path.sampling_times(n, "trailing")      # the student's DDIM grid
        assert times[:, :2].flatten().tolist() + [-1] == path.sampling_times(2 * n, "trailing")   # the teacher's
        for t, t_mid, t_end in times.tolist():
            z_mid = ddim_step(z, den(z, t), path, t, t_mid)
            z_two = ddim_step(z_mid, den(z_mid, t_mid), path, t_mid, t_end)
            z_end, x0_target = two_step_target(den, z, t, t_mid, t_end)
            torch.testing.assert_close(z_end, z_two, rtol=0, atol=1e-5)
            torch.testing.assert_close(ddim_step(z, x0_target, path, t, t_end), z_two, rtol=0, atol=1e-5)
        # per-sample times (what training draws) give the same targets as one time for the batch
        rows = times[torch.arange(3) % n]
        _, per_sample = two_step_target(PerSample(den), z, *rows.unbind(1))
        for i, (t, t_mid, t_end) in enumerate(rows.tolist()):
            torch.testing.assert_close(per_sample[i:i + 1], two_step_target(den, z[i:i + 1], t, t_mid, t_end)[1],
                                       rtol=1e-12, atol=1e-12)
    if path.alphas_cumprod[-1] > 0:                      # the last step's target is z_t'' itself (alpha = 1, sigma = 0)
        t, t_mid, t_end = step_times(path, 4)[-1].tolist()
        z_end, x0_target = two_step_target(den, z, t, t_mid, t_end)
        assert t_end == -1 and torch.equal(z_end, x0_target)


def test_truncated_snr_weight():
    path = path_for("cosine")
    t = torch.tensor([0, 300, 600, 999])
    a, s = path.alpha_sigma(t)
    torch.testing.assert_close(truncated_snr_weight(path, t), (a**2 / s**2).clamp(min=1.0))
    assert truncated_snr_weight(path, t)[-1] == 1.0


def test_config_records_distill_only_for_students():
    assert "distill" not in config_mod.Config().to_dict()              # an ordinary run's config is as it was
    cfg = tiny_config("distill.method=progressive", "distill.steps=4", "distill.teacher=demo", "distill.w=3")
    cfg.validate()
    again = config_mod.from_dict(cfg.to_dict())
    assert again.distill == cfg.distill and again.to_dict()["distill"]["steps"] == 4
    with pytest.raises(config_mod.ConfigError, match="distill.method"):
        tiny_config("distill.teacher=demo").validate()


# ----------------------------------------------------------------------------- reflow pairs
@pytest.mark.slow
def test_reflow_pairs_are_the_teachers_ode_endpoints(teachers, tmp_path):
    """The cached pairs: the noise of seed + i and the endpoint `generate` gives from it (same sampler, steps, w)."""
    code, out, err = run_cli("distill", "--ckpt", teachers / "flow", "--method", "reflow", "--out", tmp_path / "r",
                             "--pairs", 5, "--pair-steps", 3, "--pair-sampler", "heun", "--train-steps", 1,
                             "--seed", 7, "--w", 1.5, "--batch-size", 2)
    assert code == 0, err
    with np.load(tmp_path / "r" / "pairs.npz") as f:
        noise, ends, labels, seeds = (torch.from_numpy(f[k]) for k in ("noise", "ends", "labels", "seeds"))
    teacher = load_model(teachers / "flow")
    settings = settings_for(teacher, sampler="heun", steps=3, w=1.5)
    assert seeds.tolist() == [7, 8, 9, 10, 11] and labels.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(ends, generate(teacher, labels, seeds.tolist(), settings))
    assert torch.equal(noise[2], torch.randn((1, 28, 28), generator=torch.Generator().manual_seed(9)))
    pairs = make_pairs(teacher, 5, 7, "heun", 3, 1.5, batch_size=3)           # batches do not matter
    assert torch.equal(pairs["ends"], ends) and torch.equal(pairs["noise"], noise)
    cfg = load_model(tmp_path / "r").cfg                                       # a 2-step Euler student, w 1
    assert (cfg.sample.sampler, cfg.sample.steps, cfg.sample.w) == ("euler", 2, 1.0)
    assert (cfg.distill.method, cfg.distill.steps, cfg.distill.w) == ("reflow", 2, 1.5)


# ----------------------------------------------------------------------------- resume
def stop_after(monkeypatch, k: int) -> None:
    """Make the run stop (as on SIGTERM: a checkpoint, then out) after k updates."""
    done = []
    real = distill_mod.update

    def counting(*a, **kw):
        real(*a, **kw)
        done.append(1)
    monkeypatch.setattr(distill_mod, "update", counting)
    monkeypatch.setattr(guards, "stop_requested", lambda: len(done) >= k)


def weights(run) -> dict:
    return load_file(str(checkpoint.list_checkpoints(run)[-1] / "model.safetensors"))


def losses(run) -> list:
    with open(run / "distill.csv") as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.parametrize("method, stop", [("progressive", 3), ("progressive", 2), ("reflow", 2), ("w-range", 3)])
def test_resume_is_exact(teachers, tmp_path, monkeypatch, method, stop):
    """Stopped after `stop` of 4 steps and resumed == uninterrupted, bit for bit (progressive: mid-round 2, whose
    teacher is round 1's student, and at the round boundary; w-range: the same with w as the student's input)."""
    opts = (progressive_options(teachers / "diffusion", teacher_steps=4) if method == "progressive"
            else progressive_options(teachers / "diffusion", teacher_steps=4, w_range=(1.0, 3.0))
            if method == "w-range" else reflow_options(teachers / "flow"))
    full = distill(opts, tmp_path / "full", device="cpu", **quiet)
    with monkeypatch.context() as m:
        stop_after(m, stop)
        distill(opts, tmp_path / "part", device="cpu", **quiet)
    assert int(checkpoint.list_checkpoints(tmp_path / "part")[-1].name.split("_")[1]) == stop
    distill(opts, tmp_path / "part", resume=True, device="cpu", **quiet)
    assert full.name == checkpoint.list_checkpoints(tmp_path / "part")[-1].name
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "full") == losses(tmp_path / "part")


# ----------------------------------------------------------------------------- students
@pytest.mark.slow
def test_student_of_a_student_halves_again(teachers, tmp_path):
    first = tmp_path / "first"
    distill(progressive_options(teachers / "diffusion"), first, device="cpu", **quiet)      # 8 -> 4 -> 2
    cfg = load_model(first).cfg
    assert (cfg.distill.method, cfg.distill.steps, cfg.distill.teacher_steps, cfg.distill.w) == ("progressive", 2, 8, 2)
    assert (cfg.sample.sampler, cfg.sample.steps, cfg.sample.spacing, cfg.sample.w) == ("ddim", 2, "trailing", 1.0)
    assert load_model(first / "students" / "steps_4").cfg.distill.steps == 4            # each round's student kept
    second = tmp_path / "second"
    distill(progressive_options(first, teacher_steps=None, rounds=None), second, device="cpu", **quiet)
    cfg2 = load_model(second).cfg
    assert (cfg2.distill.steps, cfg2.distill.teacher_steps, cfg2.distill.w) == (1, 2, 2)  # halves from 2, keeps w
    assert cfg2.distill.teacher == str(first.resolve()) and cfg2.sample.steps == 1


@pytest.mark.slow
def test_student_samples_with_its_distilled_steps(teachers, tmp_path):
    code, out, err = run_cli("distill", "--ckpt", teachers / "diffusion", "--method", "progressive", "--out",
                             tmp_path / "s", "--teacher-steps", 8, "--rounds", 1, "--steps-per-round", 1,
                             "--batch-size", 2)
    assert code == 0, err
    calls = []
    model = load_model(tmp_path / "s")
    forward = model.net.forward
    model.net.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    generate(model, torch.tensor([3]), [0])
    assert len(calls) == 4                                            # 4 DDIM steps, w 1: one call each
    code, out, err = run_cli("sample", "--ckpt", tmp_path / "s", "--out", tmp_path / "g.png", "--grid", 1)
    assert code == 0, err
    assert "sampler=ddim, steps=4, eta=0.0, w=1.0, spacing=trailing" in out


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.slow
def test_bad_inputs_are_one_line(teachers, tmp_path):
    d, f, u = teachers / "diffusion", teachers / "flow", teachers / "uncond"
    base = ["distill", "--out", tmp_path / "x"]
    cases = [
        (["--ckpt", f, "--method", "progressive"], "this teacher is a flow model; use --method reflow"),
        (["--ckpt", d, "--method", "reflow"], "this teacher is a diffusion model; use --method progressive"),
        (["--ckpt", d, "--method", "progressive", "--teacher-steps", 12], "must be a power of two"),
        (["--ckpt", d, "--method", "progressive", "--teacher-steps", 8, "--rounds", 4],
         "would go below 1 student step; use at most --rounds 3"),
        (["--ckpt", u, "--method", "progressive", "--w", 3], "no null class"),
        (["--ckpt", d, "--method", "progressive", "--pairs", 3], "--pairs is an option of --method reflow"),
        (["--ckpt", f, "--method", "reflow", "--rounds", 2], "--rounds is an option of --method progressive"),
        (["--ckpt", f, "--method", "reflow", "--student-steps", 3], "invalid choice"),
        (["--ckpt", tmp_path / "none", "--method", "reflow"], "not found"),
        (["--ckpt", d, "--method", "progressive", "--w-range", "3,1"], "--w-range 3,1: give LO,HI with 0 <= LO < HI"),
        (["--ckpt", d, "--method", "progressive", "--w-range", "1"], "must be two numbers LO,HI"),
        (["--ckpt", d, "--method", "progressive", "--w-range", "1,3", "--w", 5], "--w 5 (the student's default w) "
                                                                                 "lies outside --w-range 1,3"),
        (["--ckpt", u, "--method", "progressive", "--w-range", "1,3"], "without a null class"),
        (["--ckpt", f, "--method", "reflow", "--w-range", "1,3"], "--w-range is an option of --method progressive"),
    ]
    for argv, needle in cases:
        assert_clean_error(*run_cli(*base, *argv)[::2], needle)
    assert not (tmp_path / "x").exists()
    # an output folder holding another run: refused without --resume, and --resume with other options
    run = tmp_path / "run"
    distill(progressive_options(d, rounds=1, steps_per_round=1), run, device="cpu", **quiet)
    argv = ["distill", "--ckpt", d, "--method", "progressive", "--out", run, "--teacher-steps", 8, "--rounds", 1,
            "--steps-per-round", 1, "--batch-size", 4]
    assert_clean_error(*run_cli(*argv)[::2], "already holds a run", "--resume")
    assert_clean_error(*run_cli(*argv, "--resume", "--lr", 2e-4)[::2], "other options (--lr)")
    assert_clean_error(*run_cli("distill", "--ckpt", d, "--method", "progressive", "--out", teachers / "flow")[::2],
                       "already holds a run")


# ----------------------------------------------------------------------------- w as the student's input
def test_guidance_input_network_starts_as_its_teacher():
    """A UNet with a guidance input, loaded with a teacher's weights, computes the teacher's output at every w (the w
    embedding's last layer starts at zero); once that layer is not zero, w changes the output; a plain UNet refuses
    a w. (64 channels: at 8, one channel per GroupNorm group removes any per-channel embedding.)"""
    cfg = tiny_config("model.channels=64")
    torch.manual_seed(0)
    teacher = randomised(build_net(cfg).eval())
    cfg.model.guidance_input = True
    student = distill_mod.build_net(cfg).eval()
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("w_mlp.") for k in missing)
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([10.0, 500.0, 990.0]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        ref = teacher(x, t, y)
        for w in (None, 0.0, 2.5, torch.tensor([1.0, 3.0, 7.0])):
            assert torch.equal(student(x, t, y, w=w), ref)
        torch.nn.init.normal_(student.w_mlp[-1].weight)
        assert (student(x, t, y, w=1.0) - student(x, t, y, w=3.0)).abs().max() > 1e-5
        with pytest.raises(ValueError, match="no guidance input"):
            teacher(x, t, y, w=2.0)


def test_per_sample_guidance_equals_each_samples_own():
    """CFGDenoiser with one w per sample (what the w-range targets use) == each sample guided at its own w alone;
    GuidanceInput passes a per-sample w through a batch a wrapper doubled."""
    from difflo.guidance import CFGDenoiser, GuidanceInput, ModelDenoiser
    cfg = tiny_config("model.channels=64")
    torch.manual_seed(0)
    net = randomised(build_net(cfg).eval())
    with torch.no_grad():
        den = ModelDenoiser(net, load_model_path(cfg), cfg.diffusion.prediction)
        x, y, w = torch.randn(3, 1, 28, 28), torch.tensor([1, 4, 7]), torch.tensor([0.0, 1.0, 3.5])
        both = CFGDenoiser(den, w, null_class=10)(x, 400, y)
        for i in range(3):
            one = CFGDenoiser(den, float(w[i]), null_class=10)(x[i:i + 1], 400, y[i:i + 1])
            torch.testing.assert_close(both[i:i + 1], one, rtol=0, atol=1e-5)
        assert not torch.allclose(both[2], CFGDenoiser(den, 1.0, null_class=10)(x, 400, y)[2], atol=1e-4)
        cfg.model.guidance_input = True
        wnet = randomised(distill_mod.build_net(cfg).eval())
        doubled = GuidanceInput(wnet, torch.tensor([1.0, 3.0]))(torch.cat([x[:2], x[:2]]), torch.full((4,), 400.0),
                                                                 torch.cat([y[:2], y[:2]]))
        direct = wnet(x[:2], torch.full((2,), 400.0), y[:2], w=torch.tensor([1.0, 3.0]))
        torch.testing.assert_close(doubled, torch.cat([direct, direct]), rtol=0, atol=1e-5)


def randomised(net):
    """Every parameter drawn N(0, 0.2^2): the zero-initialised output convolutions would hide the embeddings."""
    with torch.no_grad():
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.2)
    return net


def load_model_path(cfg):
    from difflo.noise_paths import make_path
    return make_path(cfg.diffusion)


@pytest.mark.slow
def test_w_range_student_takes_w_as_input(teachers, tmp_path):
    """--w-range: the student's config records the range and takes w as an input; it samples at any w with one call
    per step, --w changes its images; a student of it keeps the range; fixed-w students refuse another w; a w-input
    student refuses two-branch guidance and notes a w outside its range; it exports in difflo's layout."""
    s = tmp_path / "s"
    code, out, err = run_cli("distill", "--ckpt", teachers / "diffusion", "--method", "progressive", "--out", s,
                             "--teacher-steps", 8, "--rounds", 1, "--steps-per-round", 2, "--batch-size", 4,
                             "--w-range", "1,3")
    assert code == 0, err
    model = load_model(s)
    cfg = model.cfg
    assert cfg.model.guidance_input and list(cfg.distill.w_range) == [1.0, 3.0]
    assert (cfg.distill.w, cfg.sample.w, cfg.sample.steps) == (2.0, 2.0, 4)     # the teacher's w is the default
    calls = []
    forward = model.net.forward
    model.net.forward = lambda *a, **k: calls.append(k.get("w")) or forward(*a, **k)
    lo = generate(model, torch.tensor([3]), [0], settings_for(model, w=1.0))
    hi = generate(model, torch.tensor([3]), [0], settings_for(model, w=3.0))
    assert calls == [1.0] * 4 + [3.0] * 4                                # one call per step, w as the input
    assert not torch.equal(lo, hi)
    code, out, err = run_cli("sample", "--ckpt", s, "--out", tmp_path / "g.png", "--grid", 1, "--w", 5)
    assert code == 0 and "w=5 is outside the range [1, 3] this student was distilled for" in err, err
    assert_clean_error(*run_cli("sample", "--ckpt", s, "--out", tmp_path / "g.png", "--guidance-rescale", 0.5)[::2],
                       "--guidance-rescale: this student takes w as an input")
    second = tmp_path / "second"
    distill(progressive_options(s, teacher_steps=None, rounds=1, steps_per_round=1), second, device="cpu", **quiet)
    cfg2 = load_model(second).cfg
    assert list(cfg2.distill.w_range) == [1.0, 3.0] and cfg2.distill.steps == 2 and cfg2.model.guidance_input
    fixed = tmp_path / "fixed"
    distill(progressive_options(teachers / "diffusion", rounds=1, steps_per_round=1), fixed, device="cpu", **quiet)
    assert_clean_error(*run_cli("sample", "--ckpt", fixed, "--out", tmp_path / "f.png", "--w", 3)[::2],
                       "w=3: this progressive student has guidance w=2 distilled in", "--w-range LO,HI")
    from difflo.export import unet2d_config
    assert unet2d_config(model.net)[0] is None and "guidance scale w as an input" in unet2d_config(model.net)[1]
