"""``io.atomic_dir``: the one directory write (checkpoints, RUN/best, exports). The target is the whole
old directory or the whole new one; an error leaves the old one and no temporary directory."""
from __future__ import annotations

import os

import pytest

from difflo import io


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_success_renames_into_place(tmp_path):
    target = tmp_path / "out"
    with io.atomic_dir(target) as tmp:
        assert tmp == tmp_path / ".tmp-out" and tmp.is_dir() and not target.exists()
        (tmp / "a.txt").write_text("new")
    assert names(tmp_path) == ["out"] and (target / "a.txt").read_text() == "new"


def test_success_replaces_an_existing_target(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with io.atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert names(tmp_path) == ["out"] and names(target) == ["new.txt"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_an_error_leaves_the_old_target_and_no_temporary_dir(tmp_path, error):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(type(error)):
        with io.atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("partial")
            raise error
    assert names(tmp_path) == ["out"] and (target / "old.txt").read_text() == "old" and names(target) == ["old.txt"]


def test_an_error_without_a_target_leaves_nothing(tmp_path):
    with pytest.raises(OSError):
        with io.atomic_dir(tmp_path / "out"):
            raise OSError(5, "Input/output error")
    assert names(tmp_path) == []


def test_a_failed_rename_puts_the_old_target_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real = os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp-out"):
            raise OSError(30, "Read-only file system")
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(OSError):
        with io.atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("new")
    assert names(tmp_path) == ["out"] and names(target) == ["old.txt"]


def test_what_a_kill_left_is_removed_by_the_next_write(tmp_path):
    for left in (".tmp-out", ".tmp-del-out"):                  # killed while writing / while replacing
        (tmp_path / left).mkdir()
        (tmp_path / left / "junk").write_text("")
    with io.atomic_dir(tmp_path / "out") as tmp:
        assert names(tmp) == []
    assert names(tmp_path) == ["out"]


def test_discard_dir(tmp_path):
    doomed = tmp_path / "step_1"
    (doomed / "sub").mkdir(parents=True)
    io.discard_dir(doomed)
    assert names(tmp_path) == []
