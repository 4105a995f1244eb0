"""Every registered sampler and time grid reaches the front ends from the registry: `difflo sample`, `edit`,
`eval`, `experiment steps` and the web page, with its network evaluations counted (Sampler.evals); bad
combinations are one clear error line."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, run_cli, tiny_config
from difflo.model import Model, load_model
from difflo.noise_paths import samplers_for
from difflo.generate import generate, settings_for
from difflo.samplers import SAMPLERS
from difflo.schedules import SPACING_CHOICES


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    from difflo.train import train
    run = tmp_path_factory.mktemp("flow_run")
    train(tiny_config("diffusion.objective=flow", "diffusion.prediction=u", "sample.sampler=euler", "train.steps=2",
                      "train.ckpt_every=2"), run, log=lambda *a: None)
    return run


class Counting(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, *a, **k):
        self.calls += 1
        return self.net(*a, **k)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["diffusion", "flow"])
def test_every_sampler_and_grid_generates_with_its_nfe(objective, tiny_run, flow_run):
    """generate.generate (what sample, eval, experiments and the web page call) runs every sampler that fits the
    model on every grid its path takes, with exactly Sampler.evals(steps) network calls per batch."""
    model = load_model(tiny_run if objective == "diffusion" else flow_run)
    assert tuple(model.path.samplers) == samplers_for(objective)
    for name in model.path.samplers:
        for spacing in model.path.spacings:
            counter = Counting(model.net)
            s = settings_for(model, sampler=name, steps=4, spacing=spacing, w=2.0)
            x = generate(Model(counter, model.cfg), torch.tensor([1, 2]), [0, 1], s)
            assert x.shape == (2, 1, 28, 28) and torch.isfinite(x).all(), (name, spacing)
            assert counter.calls == SAMPLERS[name].evals(4), (name, spacing, counter.calls)


def test_sample_cli_new_samplers_and_grids(tiny_run, tmp_path):
    """`difflo sample --sampler X --spacing Y` for the new samplers and grids; the choices are the registry's."""
    for name, spacing in [("euler_ancestral", "karras"), ("dpmpp_2m_sde", "exponential"), ("dpmpp_3m", "karras"),
                          ("dpmpp_3m", "trailing")]:
        out = tmp_path / f"{name}-{spacing}.npz"
        code, stdout, err = run_cli("sample", "--ckpt", tiny_run, "--n", "2", "--steps", "4", "--sampler", name,
                                    "--spacing", spacing, "--out", out)
        assert code == 0, err
        assert f"sampler={name}" in stdout and f"spacing={spacing}" in stdout
    code, _, err = run_cli("sample", "--ckpt", tiny_run, "--sampler", "dpmpp_4m", "--out", tmp_path / "x.png")
    assert code == 2 and all(name in err for name in SAMPLERS)
    code, _, err = run_cli("sample", "--ckpt", tiny_run, "--spacing", "karas", "--out", tmp_path / "x.png")
    assert code == 2 and all(sp in err for sp in SPACING_CHOICES)


def test_stochastic_samplers_are_seeded(tiny_run):
    model = load_model(tiny_run)
    for name in ("euler_ancestral", "dpmpp_2m_sde"):
        s = settings_for(model, sampler=name, steps=4)
        a = generate(model, torch.tensor([3, 3]), [5, 6], s)
        assert torch.equal(a, generate(model, torch.tensor([3, 3]), [5, 6], s))
        # per-sample seeds: image 1 alone is image 1 of the pair, up to float rounding (oneDNN may pick another
        # convolution kernel for another batch size: 2.4e-7 measured on an AVX2 EPYC, 0 on AVX-512 Xeons);
        # another seed moves it by O(1)
        alone = generate(model, torch.tensor([3]), [6], s)[0]
        assert (a[1] - alone).abs().max() < 1e-5 and (a[0] - alone).abs().max() > 0.1


@pytest.mark.slow
def test_flow_churn_from_the_cli(flow_run, tmp_path, monkeypatch):
    """--s-churn makes Euler/Heun stochastic (seeded); 0 is the ODE solver."""
    from difflo import model as model_module
    monkeypatch.setattr(model_module, "_noted", set())                   # notes print once per process: a fresh one
    outs, errs = {}, {}
    for churn in ("0", "3"):
        for rep in (1, 2):
            f = tmp_path / f"{churn}-{rep}.npz"
            code, stdout, err = run_cli("sample", "--ckpt", flow_run, "--sampler", "heun", "--steps", "4", "--n", "2",
                                        "--s-churn", churn, "--s-tmin", "0.1", "--s-tmax", "0.9", "--s-noise", "1.003",
                                        "--out", f)
            assert code == 0, err
            outs[churn, rep], errs[churn, rep] = np.load(f)["images"], err
    assert np.array_equal(outs["3", 1], outs["3", 2]) and not np.array_equal(outs["0", 1], outs["3", 1])
    # the churn window and noise do nothing without churn: a warning line (printed once per process), not an error
    assert "warning: --s-tmin has no effect while --s-churn is 0 (no churn)" in errs["0", 1] + errs["0", 2]
    assert "has no effect" not in errs["3", 1] + errs["3", 2]


@pytest.mark.parametrize("argv,needles", [
    (["--sampler", "heun", "--spacing", "karras"], ["karras", "flow", "trailing or linspace"]),
    (["--sampler", "ddim", "--s-churn", "2"], ["--s-churn has no effect with sampler ddim", "euler, heun"]),
    (["--sampler", "heun", "--s-tmin", "0.9", "--s-tmax", "0.1"], ["s_tmin <= s_tmax"]),
])
def test_bad_flow_options_are_one_line(flow_run, tmp_path, argv, needles):
    code, _, err = run_cli("sample", "--ckpt", flow_run, "--steps", "3", "--n", "2", *argv, "--out", tmp_path / "x.npz")
    assert_clean_error(code, err, *needles)


def test_churn_on_a_diffusion_model_is_one_line(tiny_run, tmp_path):
    code, _, err = run_cli("sample", "--ckpt", tiny_run, "--sampler", "dpmpp_3m", "--s-churn", "1", "--steps", "3",
                           "--n", "2", "--out", tmp_path / "x.npz")
    assert_clean_error(code, err, "--s-churn has no effect", "none of which fits this model")


def test_edit_takes_every_sampler(tiny_run, tmp_path):
    """`difflo edit --sampler` lists the registry: a new sampler runs an edit technique."""
    code, out, err = run_cli("edit", "anagram", "--ckpt", tiny_run, "--a", "1", "--b", "2", "--steps", "3",
                             "--n", "1", "--sampler", "dpmpp_2m_sde", "--out", tmp_path / "anagram")
    assert code == 0, err
    assert (tmp_path / "anagram" / "figure.png").is_file()


def test_eval_generates_with_new_samplers(tiny_run):
    from difflo.eval.evaluate import generate_samples
    images, labels, s = generate_samples(load_model(tiny_run), 4, sampler="dpmpp_3m", steps=3)
    assert images.shape == (4, 28, 28, 1) and s["sampler"] == "dpmpp_3m"


def test_experiment_steps_takes_samplers_from_the_registry():
    from difflo.experiments.common import Options
    from difflo.experiments.steps import OTHER_STEPS, family, settings
    rows = settings(Options(out=Path(".")), 1000)
    diffusion = {s["sampler"] for kind, s in rows if kind == "diffusion"}
    assert diffusion == set(samplers_for("diffusion"))                  # every one, with the cheap defaults
    assert all(s["steps"] in OTHER_STEPS for kind, s in rows if s["sampler"] in ("euler_ancestral", "dpmpp_3m"))
    some = settings(Options(out=Path("."), extra={"samplers": ["dpmpp_3m", "heun"], "other_steps": (5, 8),
                                                  "spacing": "karras"}), 1000)
    assert {(kind, s["sampler"], s["steps"]) for kind, s in some} == {
        ("diffusion", "dpmpp_3m", 5), ("diffusion", "dpmpp_3m", 8), ("flow", "dpmpp_3m", 5), ("flow", "dpmpp_3m", 8),
        ("flow", "heun", 5), ("flow", "heun", 10), ("flow", "heun", 20)}
    assert all(s.get("spacing") == ("karras" if kind == "diffusion" else None) for kind, s in some)
    assert family({"sampler": "dpmpp_3m", "steps": 5, "spacing": "karras"}) == "dpmpp_3m (karras)"


def test_web_page_lists_samplers_and_grids_and_reproduces(tiny_run, tmp_path):
    """The web page's choices come from the model's path (the registry); a served sample with a new sampler and
    grid is reproduced byte for byte by the `difflo sample` command it shows."""
    import shlex

    from difflo import cli
    from difflo.serve.app import App, RequestError

    app = App(tiny_run, device="cpu", jobs_root=tmp_path / "jobs")
    try:
        info = app.info()
        assert info["samplers"] == list(samplers_for("diffusion")) and info["spacings"] == list(SPACING_CHOICES)
        assert info["defaults"]["spacing"] == "trailing"
        with pytest.raises(RequestError, match="spacing must be one of"):
            app.submit_sample({"spacing": "karas"})
        job = app.submit_sample({"classes": 2, "n": 1, "steps": 3, "sampler": "dpmpp_3m", "spacing": "karras"})
        t0 = time.time()
        while job.status in ("queued", "running"):
            assert time.time() - t0 < 60
            time.sleep(0.02)
        assert job.status == "done", job.error
        assert "3 network evaluations each" in job.result["summary"]
        cmd = job.result["command"].splitlines()[1]
        assert "--sampler dpmpp_3m" in cmd and "--spacing karras" in cmd
        argv = shlex.split(cmd)[1:]
        argv[argv.index("--out") + 1] = str(tmp_path / "cli.npz")
        assert cli.main(argv) == 0
        assert np.array_equal(np.load(tmp_path / "cli.npz")["images"], np.load(job.dir / "samples.npz")["images"])
    finally:
        app.close()


def test_eval_model_takes_a_grid(tiny_run, cached_classifier, tmp_path):
    """`difflo eval model --spacing karras --sampler dpmpp_3m`: the settings it reports are the ones asked."""
    import json
    out = tmp_path / "eval.json"
    code, _, err = run_cli("eval", "model", "--ckpt", tiny_run, "--n", "4", "--steps", "3", "--sampler", "dpmpp_3m",
                           "--spacing", "karras", "--json", out)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["spacing"] == "karras" and res["sampler"] == "dpmpp_3m"
    code, _, err = run_cli("eval", "model", "--ckpt", tiny_run, "--spacing", "karas")
    assert code == 2 and "karras" in err
