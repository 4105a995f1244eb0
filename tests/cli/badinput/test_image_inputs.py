"""Images given to `difflo edit`: any size and mode (RGBA, palette, 16-bit, float, CMYK, ...), truncated
files, non-images. Either the image is converted (a (1, C, S, S) tensor in [-1, 1]) or one clear line."""
import io

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from PIL import Image

from difflo.images import load_image, load_mask
from difflo.errors import DiffloError
from inputcheck import assert_clean_error, call, fuzz, tally

MODES = ["1", "L", "LA", "P", "PT", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I;16", "I", "F"]
FORMATS = ["PNG", "TIFF", "JPEG", "BMP", "GIF", "WEBP"]


def make_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-5, 70000, (h, w)).astype(np.int32), "I")
    if mode == "F":
        return Image.fromarray(rng.random((h, w), dtype=np.float32) * rng.choice([1, 255, 1e6]), "F")
    base = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "PT":
        img = base.convert("P")
        img.info["transparency"] = 0
        return img
    if mode in ("LA", "RGBA"):
        img = base.convert(mode)
        img.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
        return img
    return base.convert(mode)


def encode(img: Image.Image, fmt: str) -> bytes | None:
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt, **({"transparency": 0} if "transparency" in img.info and fmt in ("PNG", "GIF")
                                     else {}))
    except (OSError, ValueError, KeyError, TypeError):
        return None                                 # this format cannot store this mode
    return buf.getvalue()


def check_loaded(path, channels: int):
    try:
        x = load_image(path, channels, 28)
    except DiffloError as e:
        return str(e)
    assert x.shape == (1, channels, 28, 28) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    return None


@pytest.mark.slow
@fuzz(100)
@given(mode=st.sampled_from(MODES), fmt=st.sampled_from(FORMATS), w=st.integers(1, 70), h=st.integers(1, 70),
       seed=st.integers(0, 2**16), channels=st.sampled_from([1, 3]))
def test_any_mode_size_and_format(tmp_path, mode, fmt, w, h, seed, channels):
    data = encode(make_image(mode, w, h, seed), fmt)
    assume(data is not None)
    tally("images: modes, sizes, formats")
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(data)
    assert check_loaded(path, channels) is None                 # every format PIL writes here is readable
    try:
        m = load_mask(path, path, 28)
    except DiffloError:
        return
    assert m.shape == (1, 1, 28, 28) and set(m.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("value", [0, 1000, 32768, 65535])
def test_16_bit_grey_is_scaled_not_clipped(tmp_path, value):
    tally("images: 16-bit values")
    Image.fromarray(np.full((28, 28), value, np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    x = load_image(tmp_path / "g16.png", 1, 28)
    assert torch.allclose(x, torch.full_like(x, value / 65535 * 2 - 1), atol=1 / 127)


@pytest.mark.filterwarnings("ignore:Truncated File Read")
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "TIFF"])
@fuzz(25)
@given(cut=st.floats(0, 0.999), seed=st.integers(0, 100))
def test_truncated_files(tmp_path, fmt, cut, seed):
    data = encode(make_image("RGB" if fmt != "GIF" else "P", 40, 30, seed), fmt)
    tally("images: truncated files")
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[:int(len(data) * cut)])
    check_loaded(path, 1)                          # an error (DiffloError) or, rarely, a readable image


@fuzz(60)
@given(content=st.one_of(st.binary(max_size=300), st.text(max_size=100).map(str.encode),
                         st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff\xe0",
                                          b"BM" + b"\0" * 60, b"II*\0" + b"\0" * 20, b"RIFF\0\0\0\0WEBP"])))
def test_non_images(tmp_path, content):
    tally("images: non-images")
    path = tmp_path / "not.png"
    path.write_bytes(content)
    message = check_loaded(path, 3)
    assert message is not None and str(path) in message


def test_missing_directory_and_bomb(tmp_path, monkeypatch):
    tally("images: non-images", 3)
    for path, needle in [(tmp_path / "none.png", "not found"), (tmp_path, "cannot read image")]:
        with pytest.raises(DiffloError, match=needle):
            load_image(path, 1, 28)
    Image.new("L", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)       # 64x64 > 2 x 100: PIL's bomb error
    with pytest.raises(DiffloError, match="cannot read image"):
        load_image(tmp_path / "big.png", 1, 28)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    images = {"rgba": make_image("RGBA", 28, 28, 1), "palette": make_image("PT", 28, 28, 2),
              "grey16": make_image("I;16", 56, 56, 3), "wrong_size": make_image("RGB", 100, 37, 4),
              "one_bit": make_image("1", 28, 28, 5)}
    for name, img in images.items():
        img.save(d / f"{name}.png", **({"transparency": 0} if name == "palette" else {}))
    data = (d / "rgba.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "text.png").write_text("not an image")
    return d


@pytest.mark.parametrize("name", ["rgba", "palette", "grey16", "wrong_size", "one_bit"])
def test_edit_converts_unusual_images(tiny_run, zoo, tmp_path, name):
    tally("images: through difflo edit")
    code, out, err = call(["edit", "sdedit", "--ckpt", tiny_run, "--image", zoo / f"{name}.png", "--class", "3",
                           "--stride", "250", "--levels", "1", "--out", tmp_path / "o"])
    assert code == 0, err
    assert "note:" in out and (tmp_path / "o" / "figure.png").is_file()


@pytest.mark.parametrize("image, mask, needle", [
    ("truncated.png", None, "cannot read image"), ("text.png", None, "cannot read image"),
    ("rgba.png", "truncated.png", "cannot read image"), ("rgba.png", "grey16.png", "give a mask of the image's size"),
])
def test_edit_rejects_broken_images(tiny_run, zoo, tmp_path, image, mask, needle):
    tally("images: through difflo edit")
    if mask is None:
        argv = ["edit", "sdedit", "--image", zoo / image, "--class", "3", "--stride", "250", "--levels", "1"]
    else:
        argv = ["edit", "inpaint", "--image", zoo / image, "--mask", zoo / mask, "--class", "3", "--steps", "2"]
    code, out, err = call([*argv, "--ckpt", tiny_run, "--out", tmp_path / "o"])
    assert str(zoo) in assert_clean_error(code, err, needle)
