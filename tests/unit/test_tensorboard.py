"""train.log: [csv, tensorboard]: the metrics.csv numbers (loss, lr, images/s, evaluations) and the sample
grids as TensorBoard events, a resumed run without duplicate steps, and a missing package as one line."""
import csv
import shutil
import sys

import pytest

from difflo.errors import ConfigError
from difflo.train import train
from conftest import assert_clean_error, run_cli, tiny_config

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

quiet = dict(log=lambda *a: None, progress=False)
TB = ["train.log=[csv,tensorboard]", "train.steps=4", "train.ckpt_every=2"]


def events(run):
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def csv_column(run, name):
    with open(run / "metrics.csv") as f:
        return [(int(r["step"]), float(r[name])) for r in csv.DictReader(f) if r[name]]


def scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_a_run_writes_its_metrics_and_grids_as_events(tmp_path, clf_file):
    run = tmp_path / "run"
    train(tiny_config(*TB, "train.sample_every=2", "sample.steps=2", "eval.every=2", "eval.n=10", "eval.steps=2",
                      f"eval.classifier={clf_file}", "eval.ref_n=30"), run, **quiet)
    acc = events(run)
    assert set(acc.Tags()["scalars"]) >= {"loss", "lr", "images_per_s", "fd_classifier", "class_accuracy"}
    assert "step" not in acc.Tags()["scalars"] and "elapsed_s" not in acc.Tags()["scalars"]
    for tag in ("loss", "lr", "images_per_s", "fd_classifier", "class_accuracy"):
        tb, rows = scalars(acc, tag), csv_column(run, tag)
        assert [s for s, _ in tb] == [s for s, _ in rows] and len(tb) in (2, 4)
        assert all(v == pytest.approx(r, rel=1e-6) for (_, v), (_, r) in zip(tb, rows))
    grids = acc.Images("samples")
    assert [g.step for g in grids] == [2, 4] and grids[0].width > 100
    assert (run / "samples" / "step_0000004.png").is_file()


@pytest.mark.slow
def test_a_resumed_run_continues_the_events_without_duplicates(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_config(*TB), straight, **quiet)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")
    train(tiny_config(*TB), resumed, resume=True, **quiet)
    loss = scalars(events(resumed), "loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4]                       # steps 3 and 4 of the first run purged
    assert [v for _, v in loss] == pytest.approx([v for _, v in csv_column(straight, "loss")], rel=1e-6)


def test_csv_only_by_default(tmp_path):
    train(tiny_config("train.steps=1"), tmp_path / "run", **quiet)
    assert (tmp_path / "run" / "metrics.csv").is_file() and not (tmp_path / "run" / "tensorboard").exists()


def test_missing_tensorboard_package_is_one_line_before_training(tmp_path, monkeypatch):
    for name in ("tensorboard", "torch.utils.tensorboard"):          # `import` of a None entry raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    code, out, err = run_cli("train", "train.log=[csv,tensorboard]", "train.steps=1", "--out", tmp_path / "run")
    assert_clean_error(code, err, "tensorboard package is not installed", 'pip install "difflo[tensorboard]"')
    assert not (tmp_path / "run").exists()                             # refused before anything was written


@pytest.mark.parametrize("log", ["[tensorboard]", "[csv,wandb]"])
def test_train_log_choices_are_validated(log):
    with pytest.raises(ConfigError, match=r"must be \[csv\] or \[csv, tensorboard\]"):
        tiny_config(f"train.log={log}").validate()
