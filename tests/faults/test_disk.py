"""Disk full or unwritable run directory: a clear error before training where it can be told, else at
the first failed write, with no partial checkpoint left behind and the earlier ones intact."""
import errno
import os
from collections import namedtuple

import pytest

from difflo import checkpoint
from difflo import guards
from difflo import train as train_mod
from conftest import TINY, run_cli, assert_clean_error

ARGS = [*TINY, "train.steps=4", "train.ckpt_every=2"]




def enospc(path=None):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def test_too_little_free_space_is_refused_before_training(tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(guards.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 200_000, 200_000))
    code, out, err = run_cli("train", *ARGS, "--out", tmp_path / "run")
    assert code == 2
    line = assert_clean_error(code, err)
    assert "not enough free disk space" in line and "0.2 MB free" in line and "--out" in line
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.csv").exists()


def test_posthoc_snapshots_count_in_the_free_space(tmp_path, monkeypatch):
    """Room for the checkpoints alone is not enough when the run also writes post-hoc EMA snapshots."""
    usage = namedtuple("usage", "total used free")
    n = 1_000_000
    room = guards.checkpoint_bytes(n) * 3                       # keep 2 + the one being written
    monkeypatch.setattr(guards.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - room, room))
    guards.check_free_space(tmp_path, n, keep=2)
    with pytest.raises(guards.DiffloError, match="plus 7.6 MB for a post-hoc EMA snapshot"):
        guards.check_free_space(tmp_path, n, keep=2, snapshot_bytes=2 * 4 * n)


def test_estimate_is_not_absurd():
    assert guards.checkpoint_bytes(1_110_000) < 30 * 2**20       # the demo model's checkpoint is ~18 MB


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["save_file", "torch.save"])
def test_disk_full_during_a_checkpoint_write(tmp_path, capsys, monkeypatch, writer):
    """The second checkpoint's write fails half-way: one clear line, no .tmp left, step 2 intact."""
    calls = []
    if writer == "save_file":
        real = checkpoint.save_file

        def failing(tensors, filename, metadata=None):
            calls.append(filename)
            if len(calls) == 3:                        # model.safetensors of the second checkpoint
                with open(filename, "wb") as f:
                    f.write(b"\0" * 1000)              # a partial file, then the disk is full
                raise enospc(filename)
            return real(tensors, filename, metadata=metadata)

        monkeypatch.setattr(checkpoint, "save_file", failing)
    else:
        real = checkpoint.torch.save

        def failing(obj, f, *a, **kw):
            calls.append(f)
            if len(calls) == 2:
                open(f, "wb").write(b"PK\3\4")
                raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed "
                                   "writing file data/0: file write failed")   # what torch.save raises on ENOSPC
            return real(obj, f, *a, **kw)

        monkeypatch.setattr(checkpoint.torch, "save", failing)
    run = tmp_path / "run"
    code, out, err = run_cli("train", *ARGS, "--out", run)
    assert code == 2
    line = assert_clean_error(code, err)
    assert f"could not write checkpoint {run / 'checkpoints' / 'step_0000004'}" in line
    assert f"the previous checkpoint {run / 'checkpoints' / 'step_0000002'} is intact" in line
    assert "--resume" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002"]    # no .tmp-*
    checkpoint.verify(run / "checkpoints" / "step_0000002")
    monkeypatch.undo()
    code, out, err = run_cli("train", *ARGS, "--out", run, "--resume")          # space freed: resume
    assert code == 0 and "from step 2" in out


def test_disk_full_while_logging_metrics(tmp_path, capsys, monkeypatch):
    real_open = open

    def full_open(file, mode="r", *a, **kw):
        if str(file).endswith("metrics.csv") and "a" in mode:
            raise enospc(str(file))
        return real_open(file, mode, *a, **kw)

    monkeypatch.setattr(train_mod, "open", full_open, raising=False)
    code, out, err = run_cli("train", *ARGS, "--out", tmp_path / "run")
    assert code == 2
    line = assert_clean_error(code, err)
    assert "No space left on device" in line and "metrics.csv" in line and "--resume" in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_run_directory(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run_cli("train", *ARGS, "--out", ro / "run")
    finally:
        ro.chmod(0o700)
    assert code == 2 and "cannot write to run directory" in assert_clean_error(code, err)


def test_run_directory_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli("train", *ARGS, "--out", blocker / "run")
    assert code == 2 and "cannot write to run directory" in assert_clean_error(code, err)
