"""A checkpoint corrupted on disk (truncated, bytes flipped) is found by its checksum and named;
--resume falls back to the previous intact one and says so; `difflo sample` refuses it clearly."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from difflo import checkpoint
from difflo.errors import CheckpointError
from difflo.train import train
from conftest import TINY, tiny_config, run_cli, assert_clean_error

ARGS = ("train.steps=6", "train.ckpt_every=2", "train.keep_checkpoints=3")




@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 4-step run (checkpoints 2 and 4) and the uninterrupted 6-step run."""
    root = tmp_path_factory.mktemp("corrupt")
    quiet = dict(progress=False, log=lambda *a: None)
    train(tiny_config("train.steps=4", *ARGS[1:]), root / "four", **quiet)
    train(tiny_config(*ARGS), root / "six", **quiet)
    return root


def flip(path, offset_from_end=100):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def break_manifest(path):
    (path.parent / "manifest.json").write_text('{"step": 4, "sha2')


@pytest.mark.slow
@pytest.mark.parametrize("damage, name", [(flip, "model.safetensors"), (truncate, "ema.safetensors"),
                                          (flip, "state.pt"), (break_manifest, "model.safetensors")])
def test_resume_falls_back_to_the_previous_intact_checkpoint(runs, tmp_path, damage, name):
    run = tmp_path / "run"
    shutil.copytree(runs / "four", run)
    bad = run / "checkpoints" / "step_0000004"
    damage(bad / name)
    with pytest.raises(CheckpointError) as e:
        checkpoint.verify(bad)
    assert str(bad) in str(e.value)
    logs = []
    train(tiny_config(*ARGS), run, resume=True, progress=False, log=logs.append)
    text = "\n".join(logs)
    assert "falling back to the previous checkpoint" in text and str(bad) in text
    assert "resuming from step_0000002, the newest intact checkpoint" in text
    assert "from step 2 (step_0000002)" in text
    final, expected = checkpoint.list_checkpoints(run)[-1], checkpoint.list_checkpoints(runs / "six")[-1]
    checkpoint.verify(run / "checkpoints" / "step_0000004")              # rewritten, intact again
    for f in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(final / f)), load_file(str(expected / f))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_no_intact_checkpoint_is_a_one_line_error(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / "four", run)
    for c in checkpoint.list_checkpoints(run):
        flip(c / "model.safetensors")
    code, out, err = run_cli("train", *TINY, *ARGS, "--out", run, "--resume")
    assert code == 2
    line = assert_clean_error(code, err)
    assert "no intact checkpoint to resume from" in line and "step_0000002/model.safetensors" in line
    assert "falling back" in out                       # each corrupt one was reported on the way


@pytest.mark.parametrize("damage", [flip, truncate])
def test_sample_names_the_corrupt_file(runs, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(runs / "four", run)
    bad = run / "checkpoints" / "step_0000004" / "ema.safetensors"
    damage(bad)
    out = tmp_path / "g.png"
    for ckpt in (run, bad.parent, bad):
        code, _, err = run_cli("sample", "--ckpt", ckpt, "--grid", "1", "--steps", "2", "--out", out)
        assert code == 2
        assert str(bad) in assert_clean_error(code, err) and "corrupt" in err
    assert not out.exists()
    code, _, err = run_cli("sample", "--ckpt", bad, "--no-ema", "--grid", "1", "--steps", "2", "--out", out)
    assert code == 2 and str(bad) in err                # a file given by name is the file used
    code, _, err = run_cli("sample", "--ckpt", run / "checkpoints" / "step_0000002", "--grid", "1",
                           "--steps", "2", "--out", out)
    assert code == 0, err                               # the earlier checkpoint still samples


def test_a_bare_weights_file_without_manifest(runs, tmp_path, capsys):
    """Copied out of its checkpoint, a truncated file is caught by the safetensors reader instead."""
    bare = tmp_path / "ema.safetensors"
    shutil.copy(runs / "four" / "checkpoints" / "step_0000004" / "ema.safetensors", bare)
    truncate(bare)
    code, _, err = run_cli("sample", "--ckpt", bare, "--out", tmp_path / "g.png")
    assert code == 2 and "not a readable safetensors weights file" in assert_clean_error(code, err) and str(bare) in err


def test_manifest_without_checksums(runs, tmp_path):
    ckpt = tmp_path / "c"
    shutil.copytree(runs / "four" / "checkpoints" / "step_0000004", ckpt)
    for text in ("[]", '{"step": 4}', '{"sha256": 3}', "\xff"):
        (ckpt / "manifest.json").write_text(text)
        with pytest.raises(CheckpointError, match="manifest.json"):
            checkpoint.verify(ckpt)
    (ckpt / "manifest.json").write_text(json.dumps({"sha256": {"model.safetensors": "0" * 64}}))
    with pytest.raises(CheckpointError, match="model.safetensors is missing or corrupt"):
        checkpoint.verify(ckpt)
