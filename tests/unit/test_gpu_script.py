"""benchmarks/gpu_emoji64.py and benchmarks/pack_emoji64.py (gpu.sh's emoji64 section) on a CPU: a tiny
fake packed data set, a tiny model, two steps; every output is written (no timing is asserted)."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("face-smiling", "heart", "keycap")


def _script(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))        # gpu_emoji64 imports pack_emoji64 as the script does
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _fake(split, n, seed):
    from difflo import data

    rng = np.random.default_rng(seed)
    return data.ArrayDataset(rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8),
                             np.arange(n, dtype=np.int64) % len(CLASSES), len(CLASSES), name="emoji",
                             classes=CLASSES, split=split)


def test_pack_writes_both_splits_and_class_names(tmp_path, monkeypatch):
    from difflo import data

    pack = _script("pack_emoji64")
    asked = []

    def fake_load(name, split, *a, **k):
        asked.append((name, split, k.get("image_size"), k.get("background")))
        return _fake(split, {"train": 12, "test": 6}[split], len(asked))

    monkeypatch.setattr(data, "load", fake_load)
    out = tmp_path / "gpu-data" / "emoji64.npz"
    assert pack.main(["--out", str(out)]) == 0
    assert asked == [("emoji", "train", 64, "white"), ("emoji", "test", 64, "white")]   # the config's options
    with np.load(out, allow_pickle=False) as npz:
        assert set(npz.files) == set(pack.KEYS)
        assert npz["train_images"].shape == (12, 64, 64, 3) and npz["train_images"].dtype == np.uint8
        assert npz["test_labels"].tolist() == [0, 1, 2, 0, 1, 2]
        assert tuple(npz["classes"]) == CLASSES
    ds = pack.load_packed(out, "test")
    assert len(ds) == 6 and ds.num_classes == 3 and ds.classes == CLASSES and ds.name == "emoji"


def test_load_packed_names_the_fix(tmp_path):
    from difflo.errors import DataError

    pack = _script("pack_emoji64")
    with pytest.raises(DataError, match="pack_emoji64.py"):
        pack.load_packed(tmp_path / "missing.npz")
    np.savez_compressed(tmp_path / "old.npz", train_images=np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(DataError, match="lacks train_labels"):
        pack.load_packed(tmp_path / "old.npz")


def _write_fake_pack(path):
    train, test = _fake("train", 12, 0), _fake("test", 6, 1)
    np.savez_compressed(path, train_images=train.images, train_labels=train.labels, test_images=test.images,
                        test_labels=test.labels, classes=np.array(CLASSES))


TINY = ["model.channels=8", "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[32]",
        "model.attn_heads=1", "train.batch_size=4", "train.warmup_steps=0", "sample.steps=2"]


def test_gpu_emoji64_smoke_run_writes_everything(tmp_path, capsys):
    packed = tmp_path / "emoji64.npz"
    _write_fake_pack(packed)
    script = _script("gpu_emoji64")
    out = tmp_path / "out"
    argv = ["--data", str(packed), "--out", str(out), "--minutes", "5", "--device", "cpu", "--steps-cap", "2",
            "--n", "6", "--classes", "heart,keycap", "--per-class", "2", "--run", str(tmp_path / "run")]
    for o in TINY:
        argv += ["--set", o]
    assert script.main(argv) == 0
    assert {p.name for p in out.iterdir()} == {"emoji64.json", "emoji64.txt", "emoji64-metrics.csv",
                                               "emoji64-grid.png", "samples.npz"}
    r = json.loads((out / "emoji64.json").read_text())
    assert r["steps"] == 2 and r["images_seen"] == 8 and r["classes"] == 3 and r["train_images"] == 12
    assert r["images_per_s"] > 0 and r["peak_cuda_mib_train"] is None and r["n_samples"] == 6
    assert {"train.device=cpu", "train.max_minutes=5.0", "train.sample_every=0", "train.steps=2"} <= set(r["overrides"])
    with np.load(out / "samples.npz") as s:
        assert s["images"].shape == (6, 64, 64, 3) and s["images"].dtype == np.uint8
        assert sorted(s["labels"].tolist()) == [0, 0, 1, 1, 2, 2]           # class-balanced
    from PIL import Image
    w, h = Image.open(out / "emoji64-grid.png").size
    assert h > 2 * 64 and w > 2 * 64                                          # 2 named rows of 2
    assert "images/s" in capsys.readouterr().out


def test_gpu_emoji64_refuses_a_missing_pack_in_one_line(tmp_path, capsys):
    script = _script("gpu_emoji64")
    rc = script.main(["--data", str(tmp_path / "none.npz"), "--out", str(tmp_path / "o"), "--minutes", "1",
                      "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "pack_emoji64.py" in err and not (tmp_path / "o").exists()
