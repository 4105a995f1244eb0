"""The emoji data set (difflo.data.emoji) and its npm download, on small fake tarballs (no network)."""
from __future__ import annotations

import io
import json
import os
import shutil
import stat
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_clean_error, run_cli
from difflo import data
from difflo.config import DataConfig
from difflo.data import download as dl, emoji
from difflo.errors import DataError

HIDDEN = (198, 123, 8)              # what Noto hides under its transparent pixels
SMILING = [f"1f6{i:02x}.png" for i in range(12)]          # 12 emoji in face-smiling
AFFECTION = ["1f970.png", "1f60d.png"]                      # 2 in face-affection
HAND, SKIN = "270b.png", ["270b-1f3fb.png", "270b-1f3ff.png"]   # 1 in hand-fingers-open + 2 skin tones


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """No test reads or writes ~/.cache/difflo (nor picks up a real emoji download or npm)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("DIFFLO_DATA", str(tmp_path / "data-home"))
    monkeypatch.delenv("DIFFLO_NPM", raising=False)


def colour_of(name: str) -> tuple[int, int, int]:
    h = sum(ord(c) * 31 ** i for i, c in enumerate(name))
    return 20 + h % 200, 20 + (h // 200) % 200, 20 + (h // 40000) % 200


def emoji_png(name: str, style: str) -> bytes:
    """64x64: the left half opaque (a colour per image and style, the top-left 8x8 block random noise),
    column 32 half transparent, the rest fully transparent over HIDDEN. One image is LA (grey)."""
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, :, :3] = HIDDEN
    rgba[:, :32, :3] = colour_of(style + name)
    rgba[:8, :8, :3] = np.random.default_rng(len(name) + len(style)).integers(0, 256, (8, 8, 3))
    rgba[:, :32, 3] = 255
    rgba[:, 32, 3] = 128
    im = Image.fromarray(rgba, "RGBA")
    if name == AFFECTION[1]:
        im = im.convert("LA")
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def emoji_json(style: str) -> list[dict]:
    flag = f"has_img_{style}"

    def entry(image, category, subcategory, **extra):
        return {"image": image, "category": category, "subcategory": subcategory, flag: True,
                "has_img_apple": True, **extra}

    return ([entry(i, "Smileys & Emotion", "face-smiling") for i in SMILING]
            + [entry(i, "Smileys & Emotion", "face-affection") for i in AFFECTION]
            + [entry(HAND, "People & Body", "hand-fingers-open",
                     skin_variations={s[5:-4].upper(): {"image": s, flag: True} for s in SKIN})]
            + [entry("1f3fb.png", "Component", "skin-tone"),                 # left out
               entry("1f9ff.png", "Objects", "other-object", **{flag: False}),   # no image of this style
               entry("1f9fe.png", "Objects", "other-object")])                  # flagged, but no file


def write_tarball(root: Path, style: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / emoji.TARBALLS[style]
    files = {"package/package.json": json.dumps({"name": f"emoji-datasource-{style}"}).encode(),
             "package/emoji.json": json.dumps(emoji_json(style)).encode()}
    for name in SMILING + AFFECTION + [HAND, *SKIN, "1f3fb.png", "1f9ff.png"]:
        files[f"package/img/{style}/64/{name}"] = emoji_png(name, style)
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def make_emoji(root: Path, styles=emoji.STYLES) -> Path:
    for s in styles:
        write_tarball(root, s)
    return root


def per_class(ds) -> dict[str, int]:
    return {c: int(n) for c, n in zip(ds.classes, ds.class_counts())}


# ---------------------------------------------------------------- loading

def test_classes_and_counts_per_label(tmp_path):
    root = make_emoji(tmp_path / "emoji")
    ds = data.load("emoji", "all", root, cache_dir=tmp_path / "cache")
    assert ds.classes == ("face-affection", "face-smiling", "hand-fingers-open")      # Component left out
    assert per_class(ds) == {"face-affection": 4, "face-smiling": 24, "hand-fingers-open": 6}
    assert ds.images.shape == (34, 64, 64, 3) and ds.images.dtype == np.uint8 and ds.labels.dtype == np.int64
    assert ds.name == "emoji" and ds.source == str(root) and ds.num_classes == 3
    cat = data.load("emoji", "all", root, label="category", cache_dir=tmp_path / "cache")
    assert per_class(cat) == {"People & Body": 6, "Smileys & Emotion": 28}
    assert np.array_equal(cat.images, ds.images)                      # same images, other labels
    x, y = ds.batch([0, 1])
    assert tuple(x.shape) == (2, 3, 64, 64) and -1 <= x.min() and x.max() <= 1


def test_skin_variations_and_styles(tmp_path):
    root = make_emoji(tmp_path / "emoji")
    google = data.load("emoji", "all", root, styles=("google",), cache_dir=tmp_path / "cache")
    assert len(google) == 17 and per_class(google)["hand-fingers-open"] == 3        # 1 emoji + 2 skin tones
    twitter = emoji.load_emoji("all", root, styles="twitter", cache_dir=tmp_path / "cache")
    both = emoji.load_emoji("all", root, styles=["twitter", "google"], cache_dir=tmp_path / "cache")
    assert len(twitter) == 17 and len(both) == 34
    # styles are told apart by their colours; both = google's images then twitter's
    assert np.array_equal(both.images[:17], google.images) and np.array_equal(both.images[17:], twitter.images)
    first = sorted(SMILING + AFFECTION + [HAND, *SKIN])[0]
    assert google.images[0, 40, 10].tolist() == list(colour_of("google" + first))
    (root / emoji.TARBALLS["twitter"]).unlink()                       # only the chosen styles are needed
    assert len(emoji.load_emoji("train", root, styles=("google",), cache_dir=tmp_path / "cache")) > 0


def test_transparency_composited_over_the_background(tmp_path):
    root = make_emoji(tmp_path / "emoji", ("google",))
    white = emoji.load_emoji("all", root, styles=("google",), cache_dir=tmp_path / "cache")
    black = data.load("emoji", "all", root, styles=("google",), background="black", cache_dir=tmp_path / "cache")
    red = data.load("emoji", "all", root, styles=("google",), background="255,0,0", cache_dir=tmp_path / "cache")
    for ds, bg in ((white, (255, 255, 255)), (black, (0, 0, 0)), (red, (255, 0, 0))):
        assert (ds.images[:, :, 33:] == bg).all()                      # transparent: the background, never orange
        fg = ds.images[:, 40, 10]                                      # opaque: the image's own colour
        assert np.array_equal(fg, white.images[:, 40, 10])
        rgb = [it[1] != AFFECTION[1] for it in emoji.index("all", root, styles=("google",))[0]]   # not the LA one
        half = ds.images[rgb, 40, 32].astype(int)                      # alpha 128 over HIDDEN: a blend (rounded)
        assert np.abs(half - (np.array(HIDDEN) * 128 + np.array(bg) * 127) / 255).max() <= 1
    assert not (white.images == HIDDEN).all(axis=-1).any()


def test_image_size_32_is_the_2x2_box_mean(tmp_path):
    root = make_emoji(tmp_path / "emoji")
    big = data.load("emoji", "test", root, cache_dir=tmp_path / "cache")
    small = data.load("emoji", "test", root, image_size=32, cache_dir=tmp_path / "cache")
    assert small.images.shape == (len(big), 32, 32, 3) and np.array_equal(small.labels, big.labels)
    mean = big.images.astype(np.float64).reshape(len(big), 32, 2, 32, 2, 3).mean(axis=(2, 4))
    assert np.array_equal(small.images, np.floor(mean + 0.5))        # the mean of each 2x2 block, rounded
    assert data.load("emoji", "all", root, image_size=16, cache_dir=tmp_path / "cache").image_size == 16
    odd = data.load("emoji", "all", root, image_size=24, cache_dir=tmp_path / "cache")     # area-weighted box
    assert odd.image_size == 24 and (odd.images[:, :, 13:] == 255).all()
    with pytest.raises(DataError, match=r"emoji images are 64x64 .* from 1 to 64, e.g. 32"):
        data.load("emoji", "train", root, image_size=128)


def test_split_is_deterministic_disjoint_and_ten_percent(tmp_path):
    root = make_emoji(tmp_path / "emoji")
    for label in ("subcategory", "category"):
        items = {s: emoji.index(s, root, label)[:2] for s in ("train", "test", "all")}
        keys = {s: [it[:2] for it in items[s][0]] for s in items}
        assert not set(keys["train"]) & set(keys["test"])
        assert sorted(keys["train"] + keys["test"]) == sorted(keys["all"]) and len(set(keys["all"])) == len(keys["all"])
        total = np.bincount(items["all"][1])
        test = np.bincount(items["test"][1], minlength=len(total))
        assert test.tolist() == [max(1, (n + 5) // 10) for n in total]     # 10%, at least one per class
        again = emoji.index("test", root, label)[:2]                        # deterministic
        assert items["test"][0] == again[0] and np.array_equal(items["test"][1], again[1])
    assert sorted(emoji.index("test", root)[1].tolist()) == [0, 1, 1, 2]    # 4 -> 1, 24 -> 2, 6 -> 1
    ds = {s: data.load("emoji", s, root, cache_dir=tmp_path / "cache") for s in ("train", "test")}
    assert (len(ds["train"]), len(ds["test"])) == (30, 4) and ds["test"].split == "test"


def test_a_class_of_one_image_is_train_only(tmp_path, monkeypatch):
    root = make_emoji(tmp_path / "emoji", ("google",))
    real = emoji.entries_of
    monkeypatch.setattr(emoji, "entries_of", lambda r, s: [it for it in real(r, s) if it[1] != AFFECTION[1]])
    train, test = (emoji.index(s, root, styles=("google",)) for s in ("train", "test"))
    assert "face-affection" in train[2] and train[1].tolist().count(0) == 1 and 0 not in test[1].tolist()


def test_cache_holds_every_image_once(tmp_path, monkeypatch):
    root = make_emoji(tmp_path / "emoji")
    cache = tmp_path / "cache"
    train = data.load("emoji", "train", root, cache_dir=cache)
    assert [p.name.split("-")[:5] for p in cache.glob("*.npy")] == [["emoji", "google", "twitter", "all", "64"]]

    def no_decoding(*a, **k):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(emoji, "decode_items", no_decoding)
    again = data.load("emoji", "train", root, cache_dir=cache)
    assert np.array_equal(again.images, train.images)
    data.load("emoji", "test", root, label="category", cache_dir=cache)     # other split and label: same entry
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    data.load("emoji", "train", root, background="black", cache_dir=cache)  # other pixels: a new entry
    before = set(cache.glob("*.npy"))
    write_tarball(root, "google")                                           # a replaced tarball: a new entry,
    os.utime(root / emoji.TARBALLS["google"], ns=(1, 1))
    data.load("emoji", "train", root, cache_dir=cache)
    after = set(cache.glob("*.npy"))
    assert len(before) == len(after) == 2 and len(before & after) == 1     # which replaced the white one only


def test_from_config(tmp_path):
    root = make_emoji(tmp_path / "emoji")
    cfg = DataConfig(name="emoji", root=str(root), split="train", image_size=32, label="category",
                     styles=("google",), background="black", cache_dir=str(tmp_path / "cache"))
    ds = data.from_config(cfg)
    assert ds.classes == ("People & Body", "Smileys & Emotion") and ds.image_size == 32 and len(ds) == 15
    assert (ds.images[:, :, 17:] == 0).all()


def test_bad_options(tmp_path):
    root = make_emoji(tmp_path / "emoji")
    with pytest.raises(DataError, match=r"data.label='emotion' is not an emoji label; choose one of subcategory, "
                                        r"category"):
        data.load("emoji", "train", root, label="emotion")
    for bad in (("apple",), [], "google,facebook", ("google", 3)):
        with pytest.raises(DataError, match=r"is not a set of emoji styles; give one or both of google, twitter"):
            data.load("emoji", "train", root, styles=bad)
    with pytest.raises(DataError, match="emoji has no split 'valid'"):
        data.load("emoji", "valid", root)
    with pytest.raises(DataError, match="data.label='category' is only for emoji, not mnist10k"):
        data.load("mnist10k", "train", label="category")


def test_missing_and_broken_tarballs(tmp_path):
    root = make_emoji(tmp_path / "emoji", ("google",))
    twitter = root / emoji.TARBALLS["twitter"]
    with pytest.raises(DataError) as e:
        data.load("emoji", "train", root)
    assert f"{twitter} is missing" in str(e.value) and "difflo data download emoji" in str(e.value)
    assert f"put the file in {root}" in str(e.value)
    with pytest.raises(DataError, match=r"no files were found in the default location.*difflo data download emoji"):
        data.load("emoji", "train")
    twitter.write_bytes(b"not a tarball")
    with pytest.raises(DataError, match=r"not a readable \.tgz.*delete it and run `difflo data download emoji`"):
        data.load("emoji", "train", root)
    with tarfile.open(twitter, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("package/README.md"), io.BytesIO(b""))
    with pytest.raises(DataError, match="has no package/emoji.json"):
        data.load("emoji", "train", root)


# ---------------------------------------------------------------- download (a fake npm)

FAKE_NPM = """\
    import json, os, shutil, sys
    from pathlib import Path
    with open(os.environ["FAKE_NPM_LOG"], "a") as log:
        log.write(" ".join(sys.argv[1:]) + "\\n")
    if os.environ.get("FAKE_NPM_FAIL"):
        sys.stderr.write("npm error code ENOTFOUND\\nnpm error network request failed, reason: getaddrinfo\\n"
                         "npm error A complete log of this run can be found in: /x.log\\n")
        sys.exit(1)
    out = []
    for spec in sys.argv[2:]:
        if spec.startswith("--"):
            continue
        name, version = spec.rsplit("@", 1)
        filename = f"{name}-{version}.tgz"
        shutil.copy(Path(os.environ["FAKE_NPM_SRC"]) / filename, filename)
        out.append({"id": spec, "name": name, "version": version, "filename": filename, "files": []})
    print("npm notice packing")
    print(json.dumps(out, indent=2))
"""


@pytest.fixture
def fake_npm(tmp_path, monkeypatch):
    """A fake `npm` ($DIFFLO_NPM) that `npm pack`s from prepared tarballs; returns (src, log)."""
    src = make_emoji(tmp_path / "npm-src")
    script = tmp_path / "bin" / "npm"
    script.parent.mkdir()
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(FAKE_NPM))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "npm.log"
    monkeypatch.setenv("DIFFLO_NPM", str(script))
    monkeypatch.setenv("FAKE_NPM_SRC", str(src))
    monkeypatch.setenv("FAKE_NPM_LOG", str(log))
    return src, log


def pin_to(src: Path, monkeypatch):
    monkeypatch.setitem(dl.NPM_SOURCES, "emoji", [dl.NpmPackage(p.spec, p.filename,
                                                                dl.sha512_integrity(src / p.filename))
                                                  for p in dl.NPM_SOURCES["emoji"]])


def test_pinned_integrities():
    assert [(p.spec, p.filename) for p in dl.NPM_SOURCES["emoji"]] == [
        ("emoji-datasource-google@16.0.0", "emoji-datasource-google-16.0.0.tgz"),
        ("emoji-datasource-twitter@16.0.0", "emoji-datasource-twitter-16.0.0.tgz")]
    assert all(p.integrity.startswith("sha512-") and len(p.integrity) == 95 for p in dl.NPM_SOURCES["emoji"])


def test_download_with_npm(tmp_path, monkeypatch, fake_npm):
    src, log = fake_npm
    pin_to(src, monkeypatch)
    lines = []
    root = dl.download("emoji", tmp_path / "dest", log=lines.append)
    assert sorted(p.name for p in root.iterdir()) == sorted(emoji.TARBALLS.values())      # no temporary left
    assert log.read_text().split() == ["pack", "emoji-datasource-google@16.0.0", "emoji-datasource-twitter@16.0.0",
                                       "--json"]
    assert any("sha512 integrity verified" in line for line in lines)
    assert len(data.load("emoji", "all", root, cache_dir=tmp_path / "cache")) == 34
    log.unlink()
    (root / emoji.TARBALLS["twitter"]).unlink()
    dl.download("emoji", root, log=lines.append)                      # only the missing one is fetched
    assert log.read_text().split() == ["pack", "emoji-datasource-twitter@16.0.0", "--json"]
    log.unlink()
    dl.download("emoji", root, log=lines.append)                      # both present and verified: no npm
    assert not log.exists() and "already there, sha512 integrity verified" in lines[-2]
    dl.download("emoji", log=lambda *a: None)                         # default root: DIFFLO_DATA/emoji
    assert len(data.load("emoji", "test", cache_dir=tmp_path / "cache")) == 4


def test_download_integrity_mismatch(tmp_path, monkeypatch, fake_npm):
    with pytest.raises(DataError) as e:                                # the real pins; the fake npm's files differ
        dl.download("emoji", tmp_path / "dest", log=lambda *a: None)
    msg = str(e.value)
    assert "emoji-datasource-google-16.0.0.tgz from npm has integrity sha512-" in msg and "deleted" in msg
    assert dl.NPM_SOURCES["emoji"][0].integrity in msg
    assert not (tmp_path / "dest").exists()                          # nothing left behind
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="integrity"):
        dl.download("emoji", tmp_path / "kept", log=lambda *a: None)
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]


def test_download_replaces_a_corrupt_tarball(tmp_path, monkeypatch, fake_npm):
    src, log = fake_npm
    pin_to(src, monkeypatch)
    root = tmp_path / "dest"
    root.mkdir()
    shutil.copy(src / emoji.TARBALLS["twitter"], root)
    (root / emoji.TARBALLS["google"]).write_bytes(b"truncated")
    lines = []
    dl.download("emoji", root, log=lines.append)
    assert any("differs from the published" in line for line in lines)
    assert log.read_text().split() == ["pack", "emoji-datasource-google@16.0.0", "--json"]
    assert dl.sha512_integrity(root / emoji.TARBALLS["google"]) == dl.NPM_SOURCES["emoji"][0].integrity


def test_download_without_npm_or_network(tmp_path, monkeypatch, fake_npm):
    monkeypatch.setenv("DIFFLO_NPM", str(tmp_path / "no-such-npm"))
    with pytest.raises(DataError) as e:
        dl.download("emoji", tmp_path / "dest", log=lambda *a: None)
    msg = str(e.value)
    assert "npm" in msg and "is not installed" in msg and "apt-get install npm" in msg
    assert all(name in msg for name in emoji.TARBALLS.values()) and str(tmp_path / "dest") in msg
    assert not (tmp_path / "dest").exists()
    src, log = fake_npm
    monkeypatch.setenv("DIFFLO_NPM", str(tmp_path / "bin" / "npm"))
    monkeypatch.setenv("FAKE_NPM_FAIL", "1")
    with pytest.raises(DataError) as e:
        dl.download("emoji", tmp_path / "dest", log=lambda *a: None)
    msg = str(e.value)
    assert "npm pack failed (exit 1: npm error code ENOTFOUND" in msg and "complete log" not in msg
    assert "check the network" in msg and all(name in msg for name in emoji.TARBALLS.values())
    assert not (tmp_path / "dest").exists()


# ---------------------------------------------------------------- the CLI

def test_cli_info_and_download(tmp_path, monkeypatch):
    root = make_emoji(tmp_path / "emoji")
    code, out, err = run_cli("data", "info", "emoji", "--root", root, "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    assert "resolution 64x64, 3 channels (RGB), 3 classes" in out and f"read from {root}" in out
    assert any(line.split() == ["1", "face-smiling", "22", "2"] for line in out.splitlines())
    assert "Twemoji" in out and "CC-BY 4.0" in out and "Apache License 2.0" in out and "MIT" in out
    assert not (tmp_path / "cache").exists() and not (tmp_path / "xdg-cache").exists()   # counted, not decoded
    code, out, err = run_cli("data", "info", "emoji", "--root", root, "--label", "category", "--styles", "google",
                             "--image-size", "32", "--split", "all")
    assert code == 0 and "resolution 32x32" in out
    assert any(line.split() == ["1", "Smileys", "&", "Emotion", "14"] for line in out.splitlines())
    assert_clean_error(*run_cli("data", "info", "emoji", "--root", root, "--label", "mood")[::2],
                       "data.label='mood'", "subcategory, category")
    assert_clean_error(*run_cli("data", "info", "mnist10k", "--styles", "google")[::2], "--styles is only for emoji")
    monkeypatch.setenv("DIFFLO_NPM", str(tmp_path / "no-such-npm"))
    assert_clean_error(*run_cli("data", "download", "emoji", "--root", tmp_path / "dest")[::2], "npm",
                       *emoji.TARBALLS.values())


def test_two_training_steps(tmp_path):
    from conftest import tiny_config
    from difflo.train import train

    root = make_emoji(tmp_path / "emoji")
    cfg = tiny_config("train.steps=2", "train.batch_size=4", "data.name=emoji", f"data.root={root}",
                      f"data.cache_dir={tmp_path / 'cache'}", "data.image_size=16", "model.attn_resolutions=[8]",
                      "data.styles=[google]", "data.label=category", "data.background=black")
    assert train(cfg, tmp_path / "run", log=lambda *a: None, progress=False).name == "step_0000002"
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "num_classes: 2" in saved and "- Smileys & Emotion" in saved and "- google" in saved
