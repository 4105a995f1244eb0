"""Non-finite loss or gradients: the step is skipped (no optimizer or EMA update) and counted; after
train.max_nonfinite_steps in a row the run stops naming the step, the last good checkpoint and causes."""
import pytest
import torch
from safetensors.torch import load_file

from difflo.diffusion import DiscreteSchedule
from difflo import checkpoint
from difflo import train as train_mod
from difflo.cli import main
from difflo.guards import TrainingDiverged
from conftest import TINY, tiny_config


class NanGrad(torch.autograd.Function):
    """Identity forward (a finite loss), NaN gradients backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def poison(monkeypatch, bad_steps: set[int], kind: str) -> None:
    """Make the loss (or only its gradient) non-finite at the given 0-based steps."""
    real = DiscreteSchedule.training_loss              # the tiny config's path (difflo.noise_paths)
    calls = []

    def loss(self, *a, **kw):
        value = real(self, *a, **kw)
        calls.append(1)
        if len(calls) - 1 in bad_steps:
            return value * float("inf") if kind == "loss" else NanGrad.apply(value)
        return value

    monkeypatch.setattr(DiscreteSchedule, "training_loss", loss)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch, kind):
    poison(monkeypatch, {2, 3}, kind)
    logs = []
    run = tmp_path / "run"
    train_mod.train(tiny_config("train.steps=5", "train.ckpt_every=2", "train.keep_checkpoints=3"), run,
                    progress=False, log=logs.append)
    what = "loss (inf)" if kind == "loss" else "gradients"
    assert f"step 3: non-finite {what}; skipped the update (1 in a row, 1 in this run)" in logs
    assert f"step 4: non-finite {what}; skipped the update (2 in a row, 2 in this run)" in logs
    ck = {c.name: c for c in checkpoint.list_checkpoints(run)}
    for f in ("model.safetensors", "ema.safetensors"):          # steps 3 and 4 changed nothing
        a, b, c = (load_file(str(ck[f"step_000000{i}"] / f)) for i in (2, 4, 5))
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert all(torch.isfinite(c[k]).all() for k in c) and not all(torch.equal(a[k], c[k]) for k in a)
    s2, s4 = (checkpoint.load_train_state(ck[n])["optimizer"]["state"] for n in ("step_0000002", "step_0000004"))
    assert all(torch.equal(s2[i]["step"], s4[i]["step"]) for i in s2)         # AdamW did not count them


@pytest.mark.slow
def test_k_in_a_row_stop_the_run(tmp_path, monkeypatch):
    poison(monkeypatch, set(range(3, 100)), "loss")
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as e:
        train_mod.train(tiny_config("train.steps=20", "train.ckpt_every=2", "train.max_nonfinite_steps=4"), run,
                        progress=False, log=lambda *a: None)
    msg = str(e.value)
    assert "training stopped at step 7: 4 steps in a row had a non-finite loss" in msg
    assert f"last good checkpoint {run / 'checkpoints' / 'step_0000006'}" in msg
    assert "learning rate" in msg and "fp16" in msg and "--resume" in msg


def test_a_huge_learning_rate_stops_with_one_line(tmp_path, capsys):
    """No monkeypatching: lr 1e30 really overflows the network."""
    code = main(["train", *TINY, "train.lr=1e30", "train.warmup_steps=1", "train.grad_clip=0", "train.steps=30",
                 "train.ckpt_every=2", "train.max_nonfinite_steps=3", "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("difflo: error: training stopped at step ")
    assert "3 steps in a row" in lines[0] and "train.lr=1e+30" in lines[0]
    assert out.count("non-finite") == 3


def test_limit_is_validated():
    from difflo.errors import ConfigError
    with pytest.raises(ConfigError, match="train.max_nonfinite_steps=0 must be > 0"):
        tiny_config("train.max_nonfinite_steps=0").validate()
