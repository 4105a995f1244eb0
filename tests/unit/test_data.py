"""Data-set loaders: every format written tiny in tmp_path and read back through difflo.data.load,
the decoded-image cache, bad input, flips, `difflo data download/info` (never the network), and a
two-step training run on each data set."""
import argparse
import gzip
import pickle
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflo import data
from difflo.config import DataConfig
from difflo.cli import data as data_cli
from difflo.data import DATASETS, download as dl, decode
from difflo.errors import DataError
from conftest import tiny_config

FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """No test reads or writes ~/.cache/difflo: the default data and cache homes are in tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("DIFFLO_DATA", str(tmp_path / "data-home"))


# ---------------------------------------------------------------- writers of each native format

def write_idx(path: Path, arr: np.ndarray, gz: bool = False, magic: bytes | None = None, cut: int = 0) -> Path:
    arr = np.asarray(arr, np.uint8)
    raw = (magic or bytes([0, 0, 8, arr.ndim])) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    raw = raw[:len(raw) - cut]
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_mnist(root: Path, n_train: int = 20, n_test: int = 10) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n, gz in (("train", n_train, True), ("t10k", n_test, False)):
        ext = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 10, gz)
    return root


def make_cifar(root: Path, per_batch: int = 3, n_test: int = 4) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        batch = {"batch_label": name, "labels": [(i * n + j) % 10 for j in range(n)],
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"{j}.png" for j in range(n)]}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return root


def write_jpeg(path: Path, w: int, h: int, seed: int = 0, mode: str = "RGB", fmt: str = "JPEG") -> Path:
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    x = (np.linspace(0, 255, w)[None, :, None] if mode == "RGB" else np.linspace(0, 255, w)[None, :])
    arr = np.clip(x + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)      # a left-to-right ramp
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path, fmt)
    return path


def make_flowers(root: Path) -> Path:
    from scipy.io import savemat

    labels = np.array([1, 2, 3, 102, 1, 2, 3, 102, 5, 5, 5, 7])            # 12 images, 1-based labels
    for i in range(1, 13):
        write_jpeg(root / "jpg" / f"image_{i:05d}.jpg", 70 + 3 * i, 50 + 5 * (i % 4), seed=i)
    savemat(root / "imagelabels.mat", {"labels": labels[None, :]})
    savemat(root / "setid.mat", {"trnid": np.array([[1, 2, 3, 4]]), "valid": np.array([[5, 6, 7, 8]]),
                                 "tstid": np.array([[9, 10, 11, 12]])})
    return root


ATTRS = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
         "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
         "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
         "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
         "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()          # CelebA's 40, in file order


def make_celeba(root: Path, n: int = 9, attr_rows: int | None = None) -> Path:
    parts = [0, 0, 0, 0, 0, 1, 1, 2, 2][:n]
    names = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    for i, name in enumerate(names):
        write_jpeg(root / "img_align_celeba" / name, 178, 218, seed=i)
    (root / "list_eval_partition.txt").write_text("".join(f"{nm} {p}\n" for nm, p in zip(names, parts)))
    rows = names[:attr_rows] if attr_rows is not None else names
    smiling = ATTRS.index("Smiling")
    lines = [str(len(rows)), " ".join(ATTRS)]
    for i, nm in enumerate(rows):
        vals = ["-1"] * len(ATTRS)
        vals[smiling] = "1" if i % 3 == 0 else "-1"                # images 1, 4, 7 smile
        lines.append(nm + "  " + " ".join(f"{v:>2}" for v in vals))
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    return root


def make_folder(root: Path, labelled: bool = True) -> Path:
    if labelled:          # 3 classes; sizes differ; one grayscale PNG among RGB -> RGB
        for c, n in (("cat", 3), ("dog", 2), ("emu", 1)):
            for i in range(n):
                write_jpeg(root / c / f"{i}.png", 40 + 10 * i, 30 + 5 * i, seed=i, fmt="PNG")
        write_jpeg(root / "dog" / "nested" / "g.png", 36, 36, mode="L", fmt="PNG")
    else:                 # flat, all grayscale, all 20x20
        for i in range(5):
            write_jpeg(root / f"img{i}.png", 20, 20, seed=i, mode="L", fmt="PNG")
    return root


def check_batch(ds, size: int, channels: int):
    x, y = ds.batch(np.arange(min(4, len(ds))))
    assert x.shape == (min(4, len(ds)), channels, size, size) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0 and x.max() > x.min()
    assert y.dtype == torch.int64
    assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (size, size, channels)
    assert ds.labels.dtype == np.int64 and len(ds.labels) == len(ds.images)


# ---------------------------------------------------------------- loaders

def test_registry_has_every_loader():
    assert list(DATASETS) == ["mnist10k", "mnist", "fashion-mnist", "cifar10", "flowers102", "celeba", "folder", "emoji"]
    with pytest.raises(DataError, match="unknown data set 'svhn'; choose one of mnist10k, mnist"):
        data.load("svhn")


def test_mnist10k_unchanged():
    ds = data.load("mnist10k", "train")
    assert len(ds) == 8000 and ds.num_classes == 10 and ds.classes[3] == "3"
    assert len(data.load("mnist10k", "test")) == 2000 and len(data.load("mnist10k", "all")) == 10000
    check_batch(ds, 28, 1)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_loaders(tmp_path, name):
    root = make_mnist(tmp_path / name)
    train, test, both = (data.load(name, s, root) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(both)) == (20, 10, 30)
    assert train.num_classes == 10 and train.class_counts().tolist() == [2] * 10
    assert test.labels.tolist() == list(range(10)) and train.source == str(root)
    check_batch(train, 28, 1)
    assert name != "fashion-mnist" or train.classes[9] == "Ankle boot"
    big = data.load(name, "test", root, image_size=32)           # resized like any data set
    assert big.images.shape == (10, 32, 32, 1)


def test_idx_torchvision_layout(tmp_path):
    """root/MNIST/raw/ (where torchvision puts the files) is found too."""
    make_mnist(tmp_path / "MNIST" / "raw")
    assert len(data.load("mnist", "test", tmp_path)) == 10


def test_cifar10(tmp_path):
    root = make_cifar(tmp_path)
    train, test = data.load("cifar10", "train", root), data.load("cifar10", "test", root)
    assert (len(train), len(test), len(data.load("cifar10", "all", root))) == (15, 4, 19)
    assert train.num_classes == 10 and train.classes[:2] == ("airplane", "automobile")
    check_batch(train, 32, 3)
    # channel layout: row 0 of the batch file is R (1024), G (1024), B (1024)
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f)["data"][0]
    assert np.array_equal(test.images[0, :, :, 1], raw[1024:2048].reshape(32, 32))
    assert data.load("cifar10", "test", root / "cifar-10-batches-py").labels.tolist() == test.labels.tolist()


def test_flowers102(tmp_path):
    root = make_flowers(tmp_path / "flowers")
    cache = tmp_path / "cache"
    train = data.load("flowers102", "train", root, cache_dir=cache)
    assert len(train) == 4 and train.num_classes == 102
    assert train.labels.tolist() == [0, 1, 2, 101]                  # 1..102 -> 0..101
    check_batch(train, 64, 3)
    assert data.load("flowers102", "val", root, cache_dir=cache).labels.tolist() == [0, 1, 2, 101]
    assert data.load("flowers102", "valid", root, cache_dir=cache).split == "val"
    assert data.load("flowers102", "test", root, cache_dir=cache).labels.tolist() == [4, 4, 4, 6]
    allx = data.load("flowers102", "all", root, image_size=16, cache_dir=cache)
    assert allx.images.shape == (12, 16, 16, 3) and allx.class_counts()[[0, 101, 4]].tolist() == [2, 2, 3]


def test_celeba_unconditional_and_attribute(tmp_path):
    root = make_celeba(tmp_path / "celeba")
    cache = tmp_path / "cache"
    ds = data.load("celeba", "train", root, cache_dir=cache)
    assert len(ds) == 5 and ds.num_classes == 0 and ds.labels.tolist() == [0] * 5 and ds.classes == ()
    check_batch(ds, 64, 3)
    assert [len(data.load("celeba", s, root, cache_dir=cache)) for s in ("valid", "val", "test", "all")] == [2, 2, 2, 9]
    smile = data.load("celeba", "all", root, attribute="Smiling", cache_dir=cache)
    assert smile.num_classes == 2 and smile.classes == ("not Smiling", "Smiling")
    assert smile.labels.tolist() == [1, 0, 0, 1, 0, 0, 1, 0, 0]
    # the crop: the 128x128 box (25, 57, 153, 185) of the 178x218 image, resized to 64
    with Image.open(root / "img_align_celeba" / "000001.jpg") as im:
        expect = np.asarray(im.convert("RGB").crop((25, 57, 153, 185)).resize((64, 64), Image.Resampling.BOX))
    assert np.abs(ds.images[0].astype(int) - expect.astype(int)).max() <= 1


def test_celeba_kaggle_layout(tmp_path):
    """Kaggle's copy: .csv lists with a header, and img_align_celeba/img_align_celeba/*.jpg."""
    src = make_celeba(tmp_path / "src")
    root = tmp_path / "kaggle"
    (root / "img_align_celeba").mkdir(parents=True)
    (src / "img_align_celeba").rename(root / "img_align_celeba" / "img_align_celeba")
    parts = [line.split() for line in (src / "list_eval_partition.txt").read_text().splitlines()]
    (root / "list_eval_partition.csv").write_text("image_id,partition\n" + "".join(f"{a},{b}\n" for a, b in parts))
    rows = [line.split() for line in (src / "list_attr_celeba.txt").read_text().splitlines()[2:]]
    (root / "list_attr_celeba.csv").write_text(",".join(["image_id"] + ATTRS) + "\n" +
                                               "".join(",".join(r) + "\n" for r in rows))
    ds = data.load("celeba", "all", root, image_size=8, attribute="Smiling", cache_dir=tmp_path / "c")
    assert len(ds) == 9 and ds.labels.tolist() == [1, 0, 0, 1, 0, 0, 1, 0, 0]


def test_folder_labelled(tmp_path):
    root = make_folder(tmp_path / "pets")
    ds = data.load("folder", "train", root, image_size=24, cache_dir=tmp_path / "c")
    assert ds.classes == ("cat", "dog", "emu") and ds.num_classes == 3
    assert ds.class_counts().tolist() == [3, 3, 1]                 # dog/nested/g.png counts as dog
    check_batch(ds, 24, 3)                                          # one grey image among RGB -> RGB
    assert data.load("folder", "all", root, image_size=24, cache_dir=tmp_path / "c").num_classes == 3


def test_folder_flat_grayscale_native_size(tmp_path):
    root = make_folder(tmp_path / "flat", labelled=False)
    ds = data.load("folder", "train", root, cache_dir=tmp_path / "c")   # no image_size: all are 20x20
    assert ds.num_classes == 0 and ds.labels.tolist() == [0] * 5
    check_batch(ds, 20, 1)                                          # all grayscale -> 1 channel


def test_parallel_decoding_matches_serial(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "CHUNK", 4)                    # 11 images -> 3 chunks on 2+ threads
    paths = [write_jpeg(tmp_path / f"{i}.png", 12 + i, 10, seed=i, fmt="PNG") for i in range(11)]
    Image.fromarray(np.full((10, 10), 40000, np.uint16)).save(paths[5])          # a 16-bit grey PNG
    batch = decode.decode_all(paths, 8, 3)
    assert batch.shape == (11, 8, 8, 3)
    assert all(np.array_equal(batch[i], decode.decode(p, 8, 3)) for i, p in enumerate(paths))
    assert batch[5].min() == batch[5].max() == 40000 >> 8
    paths[7].write_bytes(b"broken")
    with pytest.raises(DataError, match=r"7.png: cannot decode"):
        decode.decode_all(paths, 8, 3)


def test_folder_split_subfolders(tmp_path):
    for split, n in (("train", 2), ("test", 1)):
        for c in ("a", "b"):
            for i in range(n):
                write_jpeg(tmp_path / "ds" / split / c / f"{i}.jpg", 16, 16, seed=i)
    write_jpeg(tmp_path / "ds" / "test" / "c" / "0.jpg", 16, 16)   # a class only the test split has
    kw = dict(image_size=16, cache_dir=tmp_path / "c")
    train, test = (data.load("folder", s, tmp_path / "ds", **kw) for s in ("train", "test"))
    assert train.classes == test.classes == ("a", "b", "c")
    assert train.class_counts().tolist() == [2, 2, 0] and test.class_counts().tolist() == [1, 1, 1]
    with pytest.raises(DataError, match="no split 'val'.*train, test, all"):
        data.load("folder", "val", tmp_path / "ds", **kw)


def test_fashion_mnist_debian_package():
    if not FASHION_DEBIAN.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    train, test = data.load("fashion-mnist", "train"), data.load("fashion-mnist", "test")   # root=None finds it
    assert train.source == str(FASHION_DEBIAN)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.class_counts().tolist() == [6000] * 10 and test.class_counts().tolist() == [1000] * 10
    assert train.images.shape == (60000, 28, 28, 1)
    assert train.labels[:5].tolist() == [9, 0, 0, 3, 0]           # the published first labels


def test_from_config_passes_everything(tmp_path):
    root = make_celeba(tmp_path / "celeba")
    cfg = DataConfig(name="celeba", root=str(root), split="all", image_size=8, flip=True, attribute="Smiling",
                     cache_dir=str(tmp_path / "cache"))
    ds = data.from_config(cfg)
    assert ds.flip and ds.images.shape == (9, 8, 8, 3) and ds.num_classes == 2
    assert list((tmp_path / "cache").glob("celeba-all-8-*.npy"))
    assert not data.from_config(DataConfig()).flip


# ---------------------------------------------------------------- cache

def test_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    root = make_flowers(tmp_path / "flowers")
    cache = tmp_path / "cache"
    first = data.load("flowers102", "train", root, image_size=16, cache_dir=cache)
    entries = list(cache.glob("*.npy"))
    assert len(entries) == 1 and entries[0].name.startswith("flowers102-train-16-")
    assert sorted(cache.iterdir()) == [entries[0].with_suffix(".json"), entries[0]]    # the entry and its record

    def no_decoding(*a, **k):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(decode, "decode", no_decoding)
    again = data.load("flowers102", "train", root, image_size=16, cache_dir=cache)
    assert np.array_equal(first.images, again.images)
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    img = root / "jpg" / "image_00002.jpg"
    write_jpeg(img, 90, 60, seed=99)                               # an edited source file -> a new entry,
    data.load("flowers102", "train", root, image_size=16, cache_dir=cache)
    now = list(cache.glob("*.npy"))
    assert len(now) == 1 and now != entries and not list(cache.glob(".*"))   # which replaced the first
    # an unreadable entry is rebuilt, not trusted (first's rows are copied out first: writing into a
    # mapped file in place, as this test does and difflo never does, would pull the pages from under it)
    before = np.array(first.images)
    for p in cache.glob("*.npy"):
        p.write_bytes(b"garbage")
    rebuilt = data.load("flowers102", "train", root, image_size=16, cache_dir=cache)
    assert np.array_equal(rebuilt.images[[0, 2, 3]], before[[0, 2, 3]])           # image 2 was edited
    assert not np.array_equal(rebuilt.images[1], before[1])
    assert sum(p.stat().st_size > 100 for p in cache.glob("*.npy")) == 1


def test_default_cache_dir_is_under_xdg_cache(tmp_path):
    root = make_folder(tmp_path / "flat", labelled=False)
    data.load("folder", "train", root)
    assert list((tmp_path / "xdg-cache" / "difflo").glob("folder-flat-train-native-*.npy"))


# ---------------------------------------------------------------- bad input

def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"data root .*nowhere does not exist .*mnist.*difflo data download mnist"):
        data.load("mnist", "train", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"data.root is not set .*data-home/cifar10.*difflo data download cifar10"):
        data.load("cifar10", "train")
    make_mnist(tmp_path / "m")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz not found"):
        data.load("mnist", "test", tmp_path / "m")


def test_idx_truncated_wrong_magic_swapped_mismatch(tmp_path):
    root = make_mnist(tmp_path)
    img = root / "t10k-images-idx3-ubyte"
    write_idx(img, np.zeros((10, 28, 28)), cut=100)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: truncated: the header says 10 images of shape "
                                        r"28x28 \(7,840 bytes\) but the file holds 7,740"):
        data.load("mnist", "test", root)
    write_idx(img, np.zeros((10, 28, 28)), magic=b"\x08\x03\x00\x00")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: not an IDX file \(magic number 08 03 00 00"):
        data.load("mnist", "test", root)
    write_idx(img, np.zeros(10))                                    # a label file where images belong
    with pytest.raises(DataError, match="1 dimension.*swapped"):
        data.load("mnist", "test", root)
    write_idx(img, np.zeros((9, 28, 28)))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte has 10 labels but .*t10k-images-idx3-ubyte has 9"):
        data.load("mnist", "test", root)
    gz = root / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:200])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        data.load("mnist", "train", root)


def test_cifar_bad_files(tmp_path):
    root = make_cifar(tmp_path)
    d = root / "cifar-10-batches-py"
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"labels": [1, 2], "data": np.zeros((3, 3072), np.uint8)}, f, protocol=2)
    with pytest.raises(DataError, match="test_batch: 2 labels for 3 images"):
        data.load("cifar10", "test", root)
    (d / "test_batch").write_bytes((d / "data_batch_1").read_bytes()[:500])
    with pytest.raises(DataError, match="test_batch: not a readable CIFAR-10 batch.*truncated"):
        data.load("cifar10", "test", root)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(d / "test_batch", "wb") as f:
        pickle.dump({"labels": [], "data": Evil()}, f, protocol=2)
    with pytest.raises(DataError, match=r"test_batch: .*refusing to load (__builtin__|builtins)\.print"):
        data.load("cifar10", "test", root)
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3 not found"):
        data.load("cifar10", "train", root)


def test_corrupt_and_truncated_jpeg(tmp_path):
    root = make_flowers(tmp_path / "flowers")
    (root / "jpg" / "image_00003.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=r"image_00003.jpg: cannot decode image .*corrupt"):
        data.load("flowers102", "train", root, cache_dir=tmp_path / "c")
    folder = make_folder(tmp_path / "pets")
    good = write_jpeg(folder / "cat" / "big.jpg", 64, 64).read_bytes()
    (folder / "cat" / "big.jpg").write_bytes(good[:len(good) // 2])
    with pytest.raises(DataError, match=r"big.jpg: cannot decode image"):
        data.load("folder", "train", folder, image_size=8, cache_dir=tmp_path / "c")


def test_label_files_that_do_not_match_the_images(tmp_path):
    from scipy.io import savemat

    root = make_flowers(tmp_path / "flowers")
    savemat(root / "imagelabels.mat", {"labels": np.ones((1, 10))})
    with pytest.raises(DataError, match=r"imagelabels.mat labels 10 images but .*jpg holds 12"):
        data.load("flowers102", "train", root, cache_dir=tmp_path / "c")
    celeba = make_celeba(tmp_path / "celeba", attr_rows=7)
    with pytest.raises(DataError, match=r"list_attr_celeba.txt lists 7 images but list_eval_partition lists 9"):
        data.load("celeba", "train", celeba, attribute="Smiling", cache_dir=tmp_path / "c")
    assert len(data.load("celeba", "train", celeba, cache_dir=tmp_path / "c")) == 5   # attributes not needed


def test_unknown_attribute_lists_valid_names(tmp_path):
    root = make_celeba(tmp_path / "celeba")
    with pytest.raises(DataError, match=r"unknown CelebA attribute 'smiling'.*did you mean 'Smiling'.*"
                                        r"5_o_Clock_Shadow, Arched_Eyebrows.*Young"):
        data.load("celeba", "train", root, attribute="smiling", cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="only for celeba"):
        data.load("mnist10k", attribute="Smiling")


def test_folder_without_images(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"folder data set needs data.root=DIR"):
        data.load("folder", "train")
    with pytest.raises(DataError, match=r"no images found in .*empty"):
        data.load("folder", "train", tmp_path / "empty")
    flat = make_folder(tmp_path / "mixed", labelled=False)
    write_jpeg(flat / "big.png", 30, 20, fmt="PNG")
    with pytest.raises(DataError, match="different sizes.*set data.image_size"):
        data.load("folder", "train", flat, cache_dir=tmp_path / "c")
    pets = make_folder(tmp_path / "pets")
    write_jpeg(pets / "loose.png", 20, 20, fmt="PNG")
    with pytest.raises(DataError, match="mixes images at its top level"):
        data.load("folder", "train", pets, image_size=8)


@pytest.mark.parametrize("name,maker,valid", [
    ("mnist10k", None, "train, test, all"), ("mnist", make_mnist, "train, test, all"),
    ("cifar10", make_cifar, "train, test, all"), ("flowers102", make_flowers, "train, val, test, all"),
    ("celeba", make_celeba, "train, valid, test, all"), ("folder", make_folder, "train, all")])
def test_unknown_split(tmp_path, name, maker, valid):
    root = maker(tmp_path / name) if maker else None
    with pytest.raises(DataError, match=f"no split 'trian'.*{valid}.*did you mean 'train'"):
        data.load(name, "trian", root, cache_dir=tmp_path / "c" if data.DATASETS[name].cached else None)


# ---------------------------------------------------------------- flips

def test_flip_is_random_per_image_and_seeded():
    img = np.tile(np.arange(8, dtype=np.uint8)[None, :, None] * 30, (8, 1, 1))   # (8, 8, 1): a ramp
    ds = data.ArrayDataset(np.repeat(img[None], 32, 0), np.zeros(32, np.int64), 0, "ramp", flip=True)
    idx = np.arange(32)
    x1, _ = ds.batch(idx, generator=torch.Generator().manual_seed(5))
    x2, _ = ds.batch(idx, generator=torch.Generator().manual_seed(5))
    x3, _ = ds.batch(idx, generator=torch.Generator().manual_seed(6))
    mirrored = x1[:, 0, 0, 0] > x1[:, 0, 0, -1]
    assert 0 < mirrored.sum() < 32                                       # some mirrored, some not
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)               # deterministic given the seed
    assert torch.equal(x1[mirrored], x1[~mirrored][:1].flip(3).expand(int(mirrored.sum()), -1, -1, -1))
    ds.flip = False
    x4, _ = ds.batch(idx, generator=torch.Generator().manual_seed(5))
    assert not (x4[:, 0, 0, 0] > x4[:, 0, 0, -1]).any()


# ---------------------------------------------------------------- download and info (no network)

def parse(argv):
    p = argparse.ArgumentParser(prog="difflo")
    sub = p.add_subparsers(dest="command", required=True)
    data_cli.add_parser(sub)
    return p.parse_args(argv)


def test_download_offline_fails_fast_with_manual_instructions(tmp_path, monkeypatch):
    dead = [dl.Remote(r.filename, r.md5, ("http://127.0.0.1:9/" + r.filename,)) for r in dl.SOURCES["mnist"]]
    monkeypatch.setitem(dl.SOURCES, "mnist", dead)
    t0 = time.time()
    with pytest.raises(DataError) as e:
        data_cli.run(parse(["data", "download", "mnist", "--root", str(tmp_path / "m"), "--timeout", "2"]))
    assert time.time() - t0 < 5
    msg = str(e.value)
    assert "could not download train-images-idx3-ubyte.gz" in msg and "127.0.0.1:9" in msg
    assert f"by hand into {tmp_path / 'm'}" in msg and "f68b3c2dcbeaaa9fbdd348bbdeb94873" in msg
    assert not (tmp_path / "m").exists()                            # nothing left behind


def test_download_verifies_checksums_and_extracts(tmp_path, monkeypatch, capsys):
    src = make_cifar(tmp_path / "src")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    url = archive.as_uri()
    monkeypatch.setitem(dl.SOURCES, "cifar10", [dl.Remote(archive.name, "0" * 32, (url,), "cifar-10-batches-py")])
    with pytest.raises(DataError, match=r"md5 is [0-9a-f]{32}, but the published checksum is 0{32}"):
        dl.download("cifar10", tmp_path / "dest", log=lambda *a: None)
    assert not (tmp_path / "dest").exists()
    monkeypatch.setitem(dl.SOURCES, "cifar10", [dl.Remote(archive.name, dl.md5sum(archive), (url,),
                                                          "cifar-10-batches-py")])
    assert data_cli.run(parse(["data", "download", "cifar10", "--root", str(tmp_path / "dest")])) == 0
    assert "verified" in capsys.readouterr().out
    assert len(data.load("cifar10", "all", tmp_path / "dest")) == 19
    dl.download("cifar10", tmp_path / "dest", log=print)                # present: verified, not fetched
    assert "already there, md5 verified" in capsys.readouterr().out
    dl.download("cifar10", log=lambda *a: None)                        # default root: DIFFLO_DATA/cifar10
    assert len(data.load("cifar10", "test")) == 4


def test_download_celeba_and_folder_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match=r"Google Drive.*img_align_celeba.zip \(md5 00d2c5bc6d35e252742224ab0c1e8fcb\)"
                                        r".*unzip"):
        dl.download("celeba", tmp_path)
    with pytest.raises(DataError, match="nothing to download"):
        dl.download("folder", tmp_path)
    with pytest.raises(DataError, match="unknown data set"):
        dl.download("imagenet", tmp_path)


def test_info(tmp_path, capsys):
    root = make_mnist(tmp_path / "m")
    assert data_cli.run(parse(["data", "info", "mnist", "--root", str(root)])) == 0
    out = capsys.readouterr().out
    assert f"read from {root}" in out and "resolution 28x28, 1 channel (grayscale), 10 classes" in out
    assert "train          20" in out and "test           10" in out and "total          30" in out
    assert any(line.split() == ["9", "2", "1"] for line in out.splitlines())
    celeba = make_celeba(tmp_path / "celeba")
    data_cli.run(parse(["data", "info", "celeba", "--root", str(celeba), "--attribute", "Smiling", "--split", "all"]))
    out = capsys.readouterr().out
    assert "resolution 64x64, 3 channels (RGB), 2 classes" in out and "all             9" in out
    assert any(line.split() == ["1", "Smiling", "3"] for line in out.splitlines())
    assert not (tmp_path / "xdg-cache").exists()                     # counted without decoding
    pets = make_folder(tmp_path / "pets")
    data_cli.run(parse(["data", "info", "folder", "--root", str(pets)]))
    out = capsys.readouterr().out
    assert "mixed (" in out and "3 channels (RGB), 3 classes" in out


def test_info_prints_the_licence(capsys):
    """`difflo data info` prints the licence its DatasetSpec records (the one exported model cards carry)."""
    from difflo import cli
    from difflo.data import DATASETS

    assert cli.main(["data", "info", "mnist10k"]) == 0
    out = capsys.readouterr().out
    assert DATASETS["mnist10k"].licence in out and "CC BY-SA 3.0" in out and "LeCun" in out


def test_wired_into_difflo_cli(tmp_path, capsys):
    from difflo import cli

    try:
        cli.build_parser().parse_args(["data", "info", "mnist10k"])
    except SystemExit:
        pytest.skip("`difflo data` is not wired into difflo.cli yet")
    capsys.readouterr()
    assert cli.main(["data", "info", "mnist10k"]) == 0 and "8,000" in capsys.readouterr().out
    assert cli.main(["data", "info", "mnist", "--root", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("difflo: error: data root") and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- configs and training on each data set

@pytest.mark.parametrize("name,file", [(n, n) for n in ["mnist", "fashion-mnist", "cifar10", "flowers102", "celeba",
                                                         "folder"]] + [("emoji", "emoji32"), ("emoji", "emoji64")])
def test_config_validates_and_fits_its_data(name, file):
    from difflo import config as config_mod
    from difflo.train import resolve

    cfg = config_mod.load(Path(__file__).parents[2] / "configs" / f"{file}.yaml")
    cfg.validate()
    assert cfg.data.name == name and cfg.data.flip == (name in ("cifar10", "flowers102", "celeba", "folder"))
    size = cfg.data.image_size or DATASETS[name].native_size
    fake = data.ArrayDataset(np.zeros((1, size, size, cfg.model.in_channels), np.uint8), np.zeros(1, np.int64),
                             cfg.model.num_classes)
    assert resolve(cfg, fake).model == cfg.model            # the filled-in values are what the data gives


def _prepare(name, tmp_path):
    small64 = ["model.channel_mult=[1,2]", "model.attn_resolutions=[32]"]
    if name == "mnist":
        return make_mnist(tmp_path / "d"), []
    if name == "fashion-mnist":
        return make_mnist(tmp_path / "d"), []
    if name == "cifar10":
        return make_cifar(tmp_path / "d"), ["model.attn_resolutions=[16]", "data.flip=true"]
    if name == "flowers102":
        return make_flowers(tmp_path / "d"), small64 + ["data.flip=true", "data.split=all"]
    if name == "celeba":
        return make_celeba(tmp_path / "d"), ["data.image_size=16", "model.attn_resolutions=[8]",
                                             "data.attribute=Smiling"]
    return make_folder(tmp_path / "d", labelled=False), ["data.image_size=16", "model.attn_resolutions=[8]"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "flowers102", "celeba", "folder"])
def test_two_training_steps(tmp_path, name):          # emoji: tests/unit/test_emoji.py
    from difflo.train import train

    root, extra = _prepare(name, tmp_path)
    cfg = tiny_config("train.steps=2", "train.batch_size=4", f"data.name={name}", f"data.root={root}",
                      *[f"data.cache_dir={tmp_path / 'cache'}"] * data.DATASETS[name].cached, *extra)
    ckpt = train(cfg, tmp_path / "run", log=lambda *a: None, progress=False)
    ds = data.from_config(cfg.data)
    assert ckpt.name == "step_0000002" and (tmp_path / "run" / "metrics.csv").is_file()
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"num_classes: {ds.num_classes}" in saved and f"image_size: {ds.image_size}" in saved
    if name == "folder":                                   # unconditional: num_classes 0, sampling works
        assert ds.num_classes == 0
        from difflo.model import load_model
        from difflo.generate import generate, settings_for

        model = load_model(ckpt)
        imgs = generate(model, torch.zeros(2, dtype=torch.long), [0, 1], settings_for(model, steps=2, w=3.0))
        assert imgs.shape == (2, 1, 16, 16) and torch.isfinite(imgs).all()


def test_batch_is_contiguous_nchw():
    """The batch is a plain contiguous (B, C, H, W) tensor (the training loop sets its layout), not a
    permuted view of the stored (B, H, W, C) images, which would be channels_last."""
    rng = np.random.default_rng(0)
    ds = data.ArrayDataset(rng.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8), np.arange(4) % 2, 2, "rgb")
    x, y = ds.batch([0, 2])
    assert x.shape == (2, 3, 5, 6) and x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x[1, :, 1, 2], torch.from_numpy(ds.images[2, 1, 2]).float() / 127.5 - 1)
