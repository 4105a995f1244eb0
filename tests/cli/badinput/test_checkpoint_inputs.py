"""Checkpoints: another architecture, another format version, non-checkpoint files, damaged bytes.
`difflo sample --ckpt X` and `difflo train --resume` either work or print one line naming the file."""
import json
import shutil
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from difflo import checkpoint
from difflo.errors import CheckpointError
from difflo.model import load_model
from conftest import TINY
from inputcheck import assert_clean_error, call, fuzz, tally


@pytest.fixture(scope="module")
def weights(tiny_run):
    path = checkpoint.list_checkpoints(tiny_run)[-1] / "ema.safetensors"
    return path, *checkpoint.load_weights(path)


def rewrite(tmp_path, weights, name="w.safetensors", state=None, **meta_changes):
    _, st_, cfg, meta = weights
    meta = {**meta, **meta_changes}
    meta = {k: v for k, v in meta.items() if v is not None}
    out = tmp_path / name
    save_file(state if state is not None else st_, str(out), metadata=meta)
    return out


def sample(path, tmp_path):
    return call(["sample", "--ckpt", path, "--grid", "1", "--steps", "1", "--out", tmp_path / "g.png"])


def other_config(weights, **model):
    _, _, cfg, _ = weights
    return json.dumps({**cfg, "model": {**cfg["model"], **model}})


@pytest.mark.parametrize("change, needle", [
    (dict(format_version="2"), "newer difflo (checkpoint format 2"),
    (dict(format_version="0"), "checkpoint format 0, which no difflo writes"),
    (dict(format_version="1.0"), "no valid checkpoint format_version"),
    (dict(format_version=None), "no valid checkpoint format_version"),
    (dict(format="diffusers"), "not a difflo checkpoint"), (dict(config=None), "not a difflo checkpoint"),
    (dict(config="{not json"), "not valid JSON"), (dict(config="[1, 2]"), "not a mapping"),
    (dict(config='{"model": {"channels": "eight"}}'), "model.channels must be of type int"),
    (dict(config='{"modle": {}}'), "did you mean model"),
    (dict(config='{"train": {"lr": -1}}'), "train.lr=-1.0 must be > 0"),
])
@pytest.mark.slow
def test_other_format_versions_and_metadata(weights, tmp_path, change, needle):
    tally("checkpoints: formats and metadata")
    path = rewrite(tmp_path, weights, **change)
    line = assert_clean_error(*sample(path, tmp_path)[::2], needle)
    assert str(path) in line


@pytest.mark.parametrize("model", [dict(channels=16), dict(channel_mult=[1, 2, 2]), dict(num_classes=3),
                                   dict(in_channels=3), dict(attn_resolutions=[]), dict(num_res_blocks=2)])
def test_another_architecture(weights, tmp_path, model):
    tally("checkpoints: other architectures")
    path = rewrite(tmp_path, weights, config=other_config(weights, **model))
    assert_clean_error(*sample(path, tmp_path)[::2], "does not fit the architecture", str(path))


def test_a_model_too_large_to_build(weights, tmp_path):
    tally("checkpoints: other architectures")
    path = rewrite(tmp_path, weights, config=other_config(weights, channels=2**40))
    assert_clean_error(*sample(path, tmp_path)[::2], str(path))


def test_resume_from_another_architecture_or_format(tiny_run, tmp_path):
    tally("checkpoints: other architectures", 2)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    code, out, err = call(["train", *TINY, "model.channels=16", "train.steps=6", "--out", run, "--resume"])
    assert_clean_error(code, err, "config differs from the run's")
    ckpt = checkpoint.list_checkpoints(run)[-1]
    _, st_, _, meta = (None, *checkpoint.load_weights(ckpt / "model.safetensors"))
    save_file(st_, str(ckpt / "model.safetensors"), metadata={**meta, "format_version": "7"})
    manifest = json.loads((ckpt / "manifest.json").read_text())            # a consistent, newer checkpoint
    manifest["sha256"]["model.safetensors"] = checkpoint.sha256_file(ckpt / "model.safetensors")
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = call(["train", *TINY, "train.steps=6", "--out", run, "--resume"])
    assert_clean_error(code, err, "newer difflo", str(ckpt / "model.safetensors"))


@pytest.mark.parametrize("kind", ["png", "torch", "text", "empty", "dir_of_junk", "metrics"])
def test_non_checkpoint_files(tiny_run, tmp_path, kind):
    tally("checkpoints: non-checkpoint files")
    path = tmp_path / f"thing.{ {'png': 'png', 'torch': 'pt'}.get(kind, 'safetensors')}"
    if kind == "png":
        from PIL import Image
        Image.new("L", (8, 8)).save(path)
    elif kind == "torch":
        torch.save({"w": torch.zeros(3)}, path)
    elif kind == "text":
        path.write_text("hello")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "dir_of_junk":
        path = tmp_path / "junkdir"
        (path / "checkpoints" / "step_0000001").mkdir(parents=True)
        (path / "checkpoints" / "step_0000001" / "manifest.json").write_text("{}")
    else:
        path = tiny_run / "metrics.csv"
    code, out, err = sample(path, tmp_path)
    assert_clean_error(code, err, str(path) if kind != "dir_of_junk" else "junkdir")


def header_file(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


tensor_info = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "X9"]),
                                     "shape": st.lists(st.integers(-1, 4), max_size=3),
                                     "data_offsets": st.lists(st.integers(-2, 64), min_size=2, max_size=2)})
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                           max_leaves=8)


@pytest.mark.slow
@fuzz(100)
@given(data=st.data())
def test_crafted_safetensors_files(tmp_path, data):
    """Random headers, metadata and payloads in the safetensors container: CheckpointError, never a crash."""
    meta = data.draw(st.dictionaries(st.sampled_from(["format", "format_version", "config", "step", "x"]),
                                     st.one_of(st.text(max_size=6), st.sampled_from(["difflo", "1", "0", "99"]),
                                               json_values.map(json.dumps)), max_size=4))
    header = data.draw(st.dictionaries(st.text(min_size=1, max_size=4), tensor_info, max_size=3))
    if data.draw(st.booleans()):
        header["__metadata__"] = meta
    raw = data.draw(st.one_of(st.just(header_file(header, bytes(64))), st.binary(max_size=200)))
    tally("checkpoints: crafted safetensors")
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@fuzz(60)
@given(cut=st.integers(0, 10**9), flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)),
                                                max_size=3))
def test_damaged_bare_weights(weights, tmp_path, cut, flips):
    """A .safetensors copied out of its checkpoint (no manifest), truncated and/or with bytes flipped:
    a CheckpointError, or -- for flips inside the tensor data only -- a model that loads."""
    data = bytearray(weights[0].read_bytes())
    cut = len(data) if cut % 3 == 0 else cut % len(data)
    data = data[:cut]
    for pos, bits in flips:
        if data:
            data[pos % len(data)] ^= bits
    tally("checkpoints: damaged bytes")
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(bytes(data))
    try:
        load_model(path)
    except CheckpointError as e:
        assert str(path) in str(e)
