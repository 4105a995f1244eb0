"""Colour inputs: transparency composited over data.background in every loader and edit input, and class
names that travel with the model (checkpoint, --classes by name, grid rows, the web page)."""
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import assert_clean_error, run_cli, tiny_config
from difflo import data
from difflo.errors import DiffloError
from difflo.model import Model, load_model
from difflo.nn import UNet
from difflo.images import flatten_alpha, load_image, parse_colour

ORANGE_HIDDEN = (198, 123, 8, 0)           # what Noto's emoji hide under their transparent pixels


def emoji_like(path, mode="RGBA"):
    """A 16x16 image: a fully opaque 8x8 blue square on a transparent field hiding orange."""
    a = np.zeros((16, 16, 4), np.uint8)
    a[:] = ORANGE_HIDDEN
    a[4:12, 4:12] = (0, 0, 255, 255)
    img = Image.fromarray(a, "RGBA")
    if mode == "P":                               # palette with per-entry transparency (the PIL warning's case)
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
        idx = np.asarray(img)
        alpha = bytes(0 if tuple(img.getpalette()[3 * i:3 * i + 3]) != (0, 0, 255) else 255 for i in range(4))
        img.save(path, transparency=alpha)
        assert len(set(idx.ravel().tolist())) == 2
        return path
    if mode == "LA":
        img = img.convert("LA")
    img.save(path)
    return path


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA"])
def test_flatten_alpha_uses_the_background_not_the_hidden_colour(tmp_path, mode):
    path = emoji_like(tmp_path / f"e-{mode}.png", mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # no "Palette images with Transparency" warning
        with Image.open(path) as im:
            white = np.asarray(flatten_alpha(im, (255, 255, 255)).convert("RGB"))
            red = np.asarray(flatten_alpha(im, (255, 0, 0)).convert("RGB"))
    assert (white[0, 0] == 255).all()                          # not orange
    if mode != "LA":
        assert tuple(red[0, 0]) == (255, 0, 0) and tuple(white[8, 8]) == (0, 0, 255)


def test_parse_colour():
    assert parse_colour("white") == (255, 255, 255) and parse_colour("#102030") == (16, 32, 48)
    assert parse_colour("1, 2,3") == (1, 2, 3) and parse_colour([4, 5, 6]) == (4, 5, 6)
    for bad in ("whiteish", "1,2", "1,2,300", "a,b,c"):
        with pytest.raises(DiffloError, match="is not a colour"):
            parse_colour(bad)


def test_folder_composites_over_data_background(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        emoji_like(tmp_path / "imgs" / c / "x.png")
        emoji_like(tmp_path / "imgs" / c / "y.png", "P")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        white = data.load("folder", "train", tmp_path / "imgs", cache_dir=tmp_path / "c")
        grey = data.load("folder", "train", tmp_path / "imgs", cache_dir=tmp_path / "c", background="128,128,128")
    assert white.channels == 3 and white.classes == ("a", "b")
    assert (white.images[:, 0, 0] == 255).all() and (grey.images[:, 0, 0] == 128).all()
    assert (white.images[:, 8, 8] == (0, 0, 255)).all()
    with pytest.raises(DiffloError, match="data.background='mauvish' is not a colour"):
        data.load("folder", "train", tmp_path / "imgs", cache_dir=tmp_path / "c", background="mauvish")
    with pytest.raises(DiffloError, match="data.background=.* is only for folder"):
        data.load("mnist10k", background="black")


def test_missing_folder_root_says_where_to_point_it(tmp_path):
    code, _, err = run_cli("data", "info", "folder", "--root", tmp_path / "nope")
    line = assert_clean_error(code, err, "does not exist", "data.root")
    assert "download" not in line


def test_edit_input_uses_the_models_background(tmp_path):
    path = emoji_like(tmp_path / "e.png")
    x = load_image(path, 3, 16, background=parse_colour("black"))
    assert x[0, :, 0, 0].tolist() == [-1.0, -1.0, -1.0] and x[0, :, 8, 8].tolist() == [-1.0, -1.0, 1.0]


def named_model(names=("cat", "dog", "plant-flower")) -> Model:
    cfg = tiny_config()
    cfg.model.num_classes, cfg.data.classes = len(names), tuple(names)
    return Model(UNet(cfg.model), cfg)


def test_classes_by_name_or_index():
    m = named_model()
    assert m.class_names == ("cat", "dog", "plant-flower")
    assert m.class_index("Dog") == 1 and m.class_index("2") == 2 and m.class_index(0) == 0
    assert m.parse_classes("plant-flower,0") == [2, 0] and m.parse_classes("all") == [0, 1, 2]
    assert m.class_label(2) == "plant-flower"
    with pytest.raises(DiffloError, match="no class 'plant-flowr' in --classes; did you mean plant-flower"):
        m.parse_classes("plant-flowr")
    with pytest.raises(DiffloError, match="class index 3 out of range in --a"):
        m.class_index("3", "--a")
    unnamed = named_model(())
    unnamed.cfg.model.num_classes = 2
    assert unnamed.class_names == ("0", "1") and unnamed.class_label(1) == "class 1"


def test_names_stored_in_checkpoint_and_used_by_sample(tmp_path):
    from difflo.train import train

    for c in ("red-thing", "blue-thing"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (200, 20 * i, 0) if c.startswith("red") else (0, 20 * i, 200)).save(
                tmp_path / "imgs" / c / f"{i}.png")
    cfg = tiny_config("data.name=folder", f"data.root={tmp_path / 'imgs'}", f"data.cache_dir={tmp_path / 'c'}",
                      "train.steps=2", "model.attn_resolutions=[]")
    ckpt = train(cfg, tmp_path / "run", log=lambda *a: None)
    saved = load_model(ckpt).cfg
    assert saved.data.classes == ("blue-thing", "red-thing")
    code, out, err = run_cli("sample", "--ckpt", tmp_path / "run", "--classes", "red-thing,0", "--grid", "1",
                             "--steps", "2", "--out", tmp_path / "g.png")
    assert code == 0, err
    code, _, err = run_cli("sample", "--ckpt", tmp_path / "run", "--classes", "green-thing", "--grid", "1",
                           "--steps", "2", "--out", tmp_path / "g.png")
    assert_clean_error(code, err, "no class 'green-thing' in --classes")
