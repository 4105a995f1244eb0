"""Post-hoc EMA (EDM2, Karras et al. 2024): sigma_rel <-> gamma, the power-function update against its
closed form, reconstruction from snapshots, training with snapshots (exact resume) and `difflo ema`."""
import math

import pytest
import torch
from safetensors.torch import load_file

from difflo import checkpoint, posthoc_ema as ph
from difflo.config import ConfigError
from difflo.errors import DiffloError
from difflo.train import train
from conftest import assert_clean_error, run_cli, tiny_config

quiet = dict(log=lambda *a: None, progress=False)


def test_gamma_sigma_rel_round_trip_and_paper_values():
    assert ph.gamma_of(0.05) == pytest.approx(16.97, abs=0.01)      # EDM2 Sec. 3
    assert ph.gamma_of(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.001, 0.01, 0.05, 0.08, 0.1, 0.2, 0.28, ph.SIGMA_REL_MAX):
        assert ph.sigma_rel_of(ph.gamma_of(s)) == pytest.approx(s, rel=1e-9)
    for g in (ph.GAMMA_AT_MAX, 0.0, 1.0, 6.94, 16.97, 500.0):
        assert ph.gamma_of(ph.sigma_rel_of(g)) == pytest.approx(g, rel=1e-6, abs=1e-6)
    for bad in (0.0, -0.1, 0.31, math.nan):
        with pytest.raises(DiffloError, match="sigma_rel"):
            ph.gamma_of(bad)


def sequence(n: int, width: int = 3) -> torch.Tensor:
    """A known 'training trajectory' of ``width`` scalar weights: drifting, converging, a little noisy."""
    i = torch.arange(1, n + 1, dtype=torch.float64)[:, None]
    k = torch.arange(1, width + 1, dtype=torch.float64)[None]
    noise = torch.randn(n, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return torch.sin(i * k / 60) + 2 * torch.exp(-i / (40 * k)) + 0.05 * noise


class Weights(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(width))
        self.register_buffer("fixed", torch.arange(2.0))


def tracked(xs: torch.Tensor, sigma_rels, out_dir, every: int = 0):
    """Run PowerEMA over the rows of ``xs`` (as the training loop does); snapshots every ``every`` steps."""
    net = Weights(xs.shape[1])
    ema = ph.PowerEMA(net, sigma_rels, every, out_dir, {})
    for step, x in enumerate(xs, 1):
        with torch.no_grad():
            net.w.copy_(x)
        ema.update(step)
        if every and (step % every == 0 or step == len(xs)):
            ema.snapshot(step)
    return [avg[0] for avg in ema.averages]


def test_power_ema_equals_its_closed_form(tmp_path):
    """avg_t = sum_i w_i x_i, w_i = (i^(g+1) - (i-1)^(g+1)) / t^(g+1): the profile's mass over (i-1, i],
    ~ (g+1) i^g / t^(g+1)."""
    xs = sequence(300)
    for s, avg in zip((0.05, 0.1, 0.25), tracked(xs.float(), (0.05, 0.1, 0.25), tmp_path)):
        g, t = ph.gamma_of(s), len(xs)
        i = torch.arange(1, t + 1, dtype=torch.float64)
        w = (i ** (g + 1) - (i - 1) ** (g + 1)) / t ** (g + 1)
        assert w.sum() == pytest.approx(1.0)
        assert (avg.double() - w @ xs).abs().max() < 1e-5
        w_pow = i ** g / (i ** g).sum()                                  # w_t proportional to t^gamma
        assert (avg.double() - w_pow @ xs).abs().max() < 2e-3


def test_profile_dot_is_the_integral():
    """The closed form of <p_a, p_b> against a numerical integral of the two profiles."""
    tau = torch.linspace(0, 100, 100_001, dtype=torch.float64)[1:]
    for (ta, ga), (tb, gb) in [((100, 6.9), (100, 17.0)), ((40, 6.9), (100, 6.9)), ((100, 3.0), (70, 17.0))]:
        pa = torch.where(tau <= ta, (ga + 1) * tau ** ga / ta ** (ga + 1), 0)
        pb = torch.where(tau <= tb, (gb + 1) * tau ** gb / tb ** (gb + 1), 0)
        numeric = float(torch.trapezoid(pa * pb, tau))
        assert ph.profile_dot(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-3)
        assert ph.profile_dot(ta, ga, tb, gb) == ph.profile_dot(tb, gb, ta, ga)


def test_reconstruction_matches_the_direct_average(tmp_path):
    """Snapshots of sigma_rel 0.05 and 0.10 every 10 of 200 steps rebuild the 0.08 average (tracked
    directly alongside) to a small error; a tracked sigma_rel at the last snapshot comes back exactly."""
    xs = sequence(200).float()
    direct = dict(zip((0.06, 0.08), tracked(xs, (0.06, 0.08), tmp_path / "direct")))
    last = tracked(xs, (0.05, 0.1), tmp_path / "posthoc", every=10)
    assert len(ph.list_snapshots(tmp_path)) == 20
    for s in (0.06, 0.08):
        res = ph.reconstruct(tmp_path, s)
        assert res["step"] == 200 and res["snapshots"] == 20 and res["error"] < 0.02
        assert (res["state"]["w"] - direct[s]).abs().max() < 5e-4
        assert torch.equal(res["state"]["fixed"], torch.arange(2.0))     # buffers: copied
    for s, avg in zip((0.05, 0.1), last):
        res = ph.reconstruct(tmp_path, s)
        assert res["error"] == 0 and torch.equal(res["state"]["w"], avg)
    early = dict(zip((0.06, 0.08), tracked(xs[:100], (0.06, 0.08), tmp_path / "early")))
    for s in (0.06, 0.08):                                       # at an earlier snapshot: from those up to it
        res = ph.reconstruct(tmp_path, s, step=100)
        assert res["step"] == 100 and res["snapshots"] == 10 and res["error"] < 0.02
        assert (res["state"]["w"] - early[s]).abs().max() < 1e-3              # 10 snapshots, not 20
        assert (res["state"]["w"] - direct[s]).abs().max() > 1e-2                  # not the last step's
    with pytest.raises(DiffloError, match="--step 105: .* snapshots at steps 10, 20, 30"):
        ph.reconstruct(tmp_path, 0.08, step=105)
    with pytest.raises(DiffloError, match="outside what the 20 snapshots"):
        ph.reconstruct(tmp_path, 0.01)
    with pytest.raises(DiffloError, match="must be in"):
        ph.reconstruct(tmp_path, 0.4)
    with pytest.raises(DiffloError, match="no post-hoc EMA snapshots"):
        ph.reconstruct(tmp_path / "posthoc", 0.08)
    (tmp_path / "posthoc" / "step_0000200.safetensors").write_bytes(b"junk")
    with pytest.raises(DiffloError, match="not a readable post-hoc EMA snapshot"):
        ph.reconstruct(tmp_path, 0.08)


def test_config_keys_are_validated():
    assert tiny_config().train.posthoc_ema == ()                        # off by default
    tiny_config("train.posthoc_ema=[0.05,0.1]", "train.posthoc_every=5").validate()
    for bad, needle in [("train.posthoc_ema=[0.5]", "train.posthoc_ema"), ("train.posthoc_ema=[0.1,0.1]", "distinct"),
                        ("train.posthoc_ema=[0]", "train.posthoc_ema"), ("train.posthoc_every=10", "read only with"),
                        ("train.posthoc_ema=[0.1]\ntrain.posthoc_every=0", "must be > 0")]:
        with pytest.raises(ConfigError, match=needle):
            tiny_config(*bad.split("\n")).validate()


POSTHOC = ("train.posthoc_ema=[0.05,0.1]", "train.posthoc_every=2", "train.ckpt_every=3")


@pytest.fixture(scope="module")
def posthoc_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("posthoc") / "run"
    train(tiny_config("train.steps=6", *POSTHOC), run, **quiet)
    return run


@pytest.mark.slow
def test_training_writes_snapshots_and_resumes_exactly(posthoc_run, tmp_path):
    assert [ph.snapshot_step(p) for p in ph.list_snapshots(posthoc_run)] == [2, 4, 6]
    state = checkpoint.load_train_state(checkpoint.list_checkpoints(posthoc_run)[-1])
    assert state["posthoc"]["sigma_rels"] == [0.05, 0.1]
    part = tmp_path / "part"
    train(tiny_config("train.steps=3", *POSTHOC), part, **quiet)
    with pytest.raises(DiffloError, match="posthoc_ema"):              # other sigma_rels cannot continue
        train(tiny_config("train.steps=6", "train.posthoc_ema=[0.05]", "train.ckpt_every=3"), part, resume=True,
              **quiet)
    train(tiny_config("train.steps=6", *POSTHOC), part, resume=True, **quiet)
    assert [ph.snapshot_step(p) for p in ph.list_snapshots(part)] == [2, 3, 4, 6]   # 3: the first run's last
    for step in (2, 4, 6):
        a = load_file(str(posthoc_run / "posthoc" / f"step_{step:07d}.safetensors"))
        b = load_file(str(part / "posthoc" / f"step_{step:07d}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step    # bit for bit


@pytest.mark.slow
def test_cli_writes_a_checkpoint_that_sample_loads(posthoc_run, tmp_path):
    out = tmp_path / "ema-0.100"
    code, stdout, err = run_cli("ema", posthoc_run, "--sigma-rel", "0.1", "--out", out)
    assert code == 0 and "sigma_rel 0.1 at step 6" in stdout, err
    ema = load_file(str(checkpoint.resolve_weights(out)))
    snap = load_file(str(posthoc_run / "posthoc" / "step_0000006.safetensors"))
    assert all(torch.equal(v, snap[f"0.1/{k}"]) for k, v in ema.items() if f"0.1/{k}" in snap)
    assert ema.keys() == load_file(str(checkpoint.resolve_weights(posthoc_run))).keys()
    code, stdout, err = run_cli("ema", posthoc_run, "--sigma-rel", "0.1", "--step", "4", "--out", tmp_path / "at4")
    assert code == 0 and "sigma_rel 0.1 at step 4 from 2 snapshots" in stdout, err
    snap = load_file(str(posthoc_run / "posthoc" / "step_0000004.safetensors"))
    ema = load_file(str(checkpoint.resolve_weights(tmp_path / "at4")))
    assert all(torch.equal(v, snap[f"0.1/{k}"]) for k, v in ema.items() if f"0.1/{k}" in snap)
    code, _, err = run_cli("ema", posthoc_run, "--sigma-rel", "0.08", "--out", tmp_path / "ema-0.080")
    assert code == 0, err
    code, _, err = run_cli("sample", "--ckpt", tmp_path / "ema-0.080", "--out", tmp_path / "g.png", "--grid", "1",
                           "--steps", "2")
    assert code == 0 and (tmp_path / "g.png").is_file(), err


@pytest.mark.slow
def test_cli_bad_inputs_are_one_line(posthoc_run, tiny_run, tmp_path):
    for argv, needle in [
        (["ema", tiny_run, "--sigma-rel", "0.08", "--out", tmp_path / "a"], "no post-hoc EMA snapshots"),
        (["ema", tmp_path / "none", "--sigma-rel", "0.08", "--out", tmp_path / "a"], "not found"),
        (["ema", posthoc_run, "--sigma-rel", "0.5", "--out", tmp_path / "a"], "must be in (0, 0.3003]"),
        (["ema", posthoc_run, "--sigma-rel", "0.005", "--out", tmp_path / "a"], "outside what the 3 snapshots"),
        (["ema", posthoc_run, "--sigma-rel", "-1", "--out", tmp_path / "a"], "must be > 0"),
        (["ema", posthoc_run, "--sigma-rel", "0.08", "--out", posthoc_run], "is a training run"),
        (["ema", posthoc_run, "--sigma-rel", "0.08"], "--out"),
        (["ema", posthoc_run, "--sigma-rel", "0.08", "--step", "3", "--out", tmp_path / "a"], "steps 2, 4, 6"),
        (["ema", posthoc_run, "--sigma-rel", "0.08", "--step", "0", "--out", tmp_path / "a"], "--step"),
    ]:
        assert_clean_error(*run_cli(*argv)[::2], needle)
