"""Training loop: determinism, learning, resume == uninterrupted, run-directory contents, lr and EMA schedules."""
import csv

import pytest
import torch
from safetensors.torch import load_file

from difflo import checkpoint
from difflo.config import TrainConfig
from difflo.errors import DiffloError
from difflo.model import load_model
from difflo.generate import generate, settings_for
from difflo.train import batch_indices, ema_decay_at, lr_at, train
from conftest import tiny_config

quiet = dict(log=lambda *a: None, progress=False)


def losses(run):
    with open(run / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def test_run_directory_contents(tiny_run):
    assert (tiny_run / "config.yaml").is_file() and (tiny_run / "loss.png").is_file()
    ckpts = checkpoint.list_checkpoints(tiny_run)
    assert [c.name for c in ckpts] == ["step_0000002", "step_0000004"]
    for c in ckpts:
        checkpoint.verify(c)
        assert sorted(p.name for p in c.iterdir()) == ["ema.safetensors", "manifest.json", "model.safetensors",
                                                       "state.pt"]
    state, cfg, meta = checkpoint.load_weights(ckpts[-1] / "ema.safetensors")
    assert meta["step"] == "4" and cfg["model"]["num_classes"] == 10 and cfg["model"]["channels"] == 8
    assert [s for s, _ in losses(tiny_run)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny_config("train.steps=6", "train.ckpt_every=3"), full, **quiet)
    train(tiny_config("train.steps=3", "train.ckpt_every=3"), part, **quiet)
    train(tiny_config("train.steps=6", "train.ckpt_every=3"), part, resume=True, **quiet)
    assert losses(part) == losses(full)
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(checkpoint.list_checkpoints(full)[-1] / name))
        b = load_file(str(checkpoint.list_checkpoints(part)[-1] / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_training_is_deterministic(tmp_path):
    train(tiny_config("train.steps=3", "train.seed=1"), tmp_path / "a", **quiet)
    train(tiny_config("train.steps=3", "train.seed=1"), tmp_path / "b", **quiet)
    train(tiny_config("train.steps=3", "train.seed=2"), tmp_path / "c", **quiet)
    assert losses(tmp_path / "a") == losses(tmp_path / "b") != losses(tmp_path / "c")


@pytest.mark.slow
def test_training_learns(tmp_path):
    """A tiny model on mnist10k: the loss falls by half within 200 steps, and its samples move from
    noise toward digits (mnist digits are ~80% black background; the untrained model's samples ~17%)."""
    def background(steps: int) -> tuple[list[float], float]:
        cfg = tiny_config(f"train.steps={steps}", "train.lr=3e-3", "train.log_every=10", "train.ckpt_every=1000")
        ckpt = train(cfg, tmp_path / f"run{steps}", **quiet)
        model = load_model(ckpt, ema=False)
        x = generate(model, torch.arange(10).repeat(2), range(20), settings_for(model, steps=10, w=1.0))
        return [loss for _, loss in losses(tmp_path / f"run{steps}")], (x < -0.9).float().mean().item()

    _, before = background(2)
    curve, after = background(200)
    assert sum(curve[-3:]) / 3 < 0.5 * curve[0]                       # measured 0.25 vs 0.80
    assert after > before + 0.2                                       # measured 0.55 vs 0.17


def test_existing_run_is_not_overwritten(tiny_run):
    with pytest.raises(DiffloError, match="--resume"):
        train(tiny_config("train.steps=4"), tiny_run, **quiet)


def test_resume_with_other_architecture_is_refused(tiny_run, tmp_path):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    with pytest.raises(DiffloError, match="config differs"):
        train(tiny_config("train.steps=6", "model.channels=16"), run, resume=True, **quiet)


def test_lr_schedule():
    t = TrainConfig(lr=1.0, warmup_steps=10, steps=110, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0) and lr_at(60, t) == pytest.approx(0.55)
    assert lr_at(110, t) == pytest.approx(0.1)
    t.lr_schedule = "exponential"
    assert lr_at(10, t) == pytest.approx(1.0) and lr_at(60, t) == pytest.approx(0.1 ** 0.5)
    assert lr_at(110, t) == pytest.approx(0.1)
    t.lr_schedule = "constant"
    assert lr_at(100, t) == 1.0


def test_lr_schedule_follows_the_time_budget():
    """With train.max_minutes the decay ends when the time runs out, if that comes before the last step."""
    t = TrainConfig(lr=1.0, warmup_steps=10, steps=100_000, lr_schedule="cosine", min_lr_ratio=0.0, max_minutes=2)
    assert lr_at(20, t, elapsed=0.0) == pytest.approx(1.0, abs=1e-6)
    assert lr_at(20, t, elapsed=60.0) == pytest.approx(0.5) and lr_at(20, t, elapsed=600.0) == pytest.approx(0.0)
    t.max_minutes = None
    assert lr_at(20, t, elapsed=60.0) == pytest.approx(1.0, abs=1e-6)


def test_ema_decay_warmup():
    t = TrainConfig(ema_decay=0.999)
    assert ema_decay_at(0, t) == pytest.approx(0.1) and ema_decay_at(10_000, t) == 0.999
    t.ema_warmup = False
    assert ema_decay_at(0, t) == 0.999


def test_batches_cover_each_epoch_once():
    idx = [batch_indices(s, 20, 5, seed=0) for s in range(4)]
    assert sorted(int(i) for b in idx for i in b) == list(range(20))
    assert not (batch_indices(4, 20, 5, 0) == idx[0]).all()      # a new permutation next epoch


def test_resume_keeps_an_older_metrics_file_by_column_name(tmp_path):
    """A run logged before columns were added resumes with its rows kept, in the new columns by name;
    rows after the resumed step and a row cut by a kill are dropped."""
    import csv
    from difflo import train as train_mod
    path = tmp_path / "metrics.csv"
    path.write_text("step,loss,lr,images_per_s,elapsed_s,fid,fd_classifier,class_accuracy\n"
                    "10,0.5,0.001,40.0,12.0,,,\n10,,,,13.0,,2.5,0.9\n20,0.4,0.001,40.0,24.0,,,\n30,0.3,0.0")
    train_mod._start_metrics(path, 10)
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == train_mod.METRICS_FIELDS and "prc_recall" in rows[0]
    assert [(r["step"], r["loss"], r["fd_classifier"], r["prc_recall"]) for r in rows] == [
        ("10", "0.5", "", ""), ("10", "", "2.5", "")]
