"""``difflo data download NAME``: fetch a data set's files from their official source and verify
their published MD5 checksums. Only this command downloads; training never does.

Checksums are those torchvision lists for the same files (``torchvision/datasets/mnist.py``,
``cifar.py``, ``flowers102.py``, ``celeba.py``); the Fashion-MNIST ones are also in Zalando's
README and the CIFAR-10 one on the CIFAR page. Without a network the command fails within
``timeout`` seconds and says where to put the files by hand.
"""
from __future__ import annotations

import hashlib
import socket
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..io import atomic_path
from .base import default_root


@dataclass(frozen=True)
class Remote:
    filename: str
    md5: str
    urls: tuple[str, ...]                # tried in order
    extract_to: str | None = None        # a tar archive: extract it; this path exists afterwards


def _mirrored(prefixes: tuple[str, ...], files: list[tuple[str, str]]) -> list[Remote]:
    return [Remote(f, md5, tuple(p + f for p in prefixes)) for f, md5 in files]


MNIST_MIRRORS = ("http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/")
FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
FLOWERS_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"

SOURCES: dict[str, list[Remote]] = {
    "mnist": _mirrored(MNIST_MIRRORS, [
        ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
        ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
        ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")]),
    "fashion-mnist": _mirrored(FASHION_MIRRORS, [
        ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
        ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
        ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310")]),
    "cifar10": [Remote("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                       ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                       extract_to="cifar-10-batches-py")],
    "flowers102": [Remote("102flowers.tgz", "52808999861908f626f3c1f4e79d11fa", (FLOWERS_URL + "102flowers.tgz",),
                          extract_to="jpg"),
                   Remote("imagelabels.mat", "e0620be6f572b9609742df49c70aed4d", (FLOWERS_URL + "imagelabels.mat",)),
                   Remote("setid.mat", "a5357ecc9cb78c4bef273ce3793fc85c", (FLOWERS_URL + "setid.mat",))],
}

# CelebA is only distributed through Google Drive / Baidu (which need a browser or gdown).
CELEBA_PAGE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
CELEBA_FILES = {"img_align_celeba.zip": "00d2c5bc6d35e252742224ab0c1e8fcb",
                "list_eval_partition.txt": "d32c9cbf5e040fd4025c592c306e6668",
                "list_attr_celeba.txt": "75e246fa4810816ffd6ee81facbd244c"}


def md5sum(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Failed(Exception):
    """One URL did not deliver a verified file."""


def _fetch(url: str, dest: Path, md5: str, timeout: float, log) -> None:
    from tqdm import tqdm

    h = hashlib.md5(usedforsecurity=False)
    with atomic_path(dest) as part:                # removed on any failure below
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
                total = int(r.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None, leave=False) as bar:
                    for chunk in iter(lambda: r.read(1 << 20), b""):
                        f.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise _Failed(f"{url}: {reason}") from None
        except OSError as e:
            if e.filename is not None and Path(e.filename) == part:
                raise DataError(f"cannot write {part}: {e.strerror}; choose another --root") from None
            raise _Failed(f"{url}: {e}") from None
        got = h.hexdigest()
        if got != md5:
            raise _Failed(f"{url}: the file's md5 is {got}, but the published checksum is {md5} (corrupt or changed "
                          f"download; deleted)")
    log(f"  downloaded {url} -> {dest} (md5 {md5} verified)")


def _extract(archive: Path, root: Path, marker: str, log) -> None:
    if (root / marker).exists():
        return
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(root, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot extract {archive} into {root}: {e}; delete it and download again") from None
    if not (root / marker).exists():
        raise DataError(f"{archive} did not contain {marker}; is it the right archive?")
    log(f"  extracted {archive.name} -> {root / marker}")


def manual_instructions(name: str, root: Path) -> str:
    if name == "celeba":
        sums = ", ".join(f"{f} (md5 {m})" for f, m in CELEBA_FILES.items())
        return (f"CelebA is distributed only through Google Drive (linked from {CELEBA_PAGE}: 'Align&Cropped Images' "
                f"and 'Anno'/'Eval'), which difflo does not download from. By hand: download {sums}; put them in "
                f"{root} and run `unzip -q {root / 'img_align_celeba.zip'} -d {root}` so that "
                f"{root / 'img_align_celeba' / '000001.jpg'} exists (Kaggle's 'celeba-dataset' copy with .csv lists "
                f"works too); then check with `difflo data info celeba --root {root}`")
    groups: dict[tuple[str, ...], list[Remote]] = {}
    for r in SOURCES[name]:
        groups.setdefault(tuple(u[:len(u) - len(r.filename)] if u.endswith(r.filename) else u for u in r.urls),
                          []).append(r)
    parts = []
    for prefixes, remotes in groups.items():
        mirrors = f" (or the mirror {', '.join(prefixes[1:])})" if len(prefixes) > 1 else ""
        parts.append(", ".join(f"{r.filename} (md5 {r.md5})" for r in remotes) + f" from {prefixes[0]}{mirrors}")
    extract = [f"extract {r.filename} there (tar xzf)" for r in SOURCES[name] if r.extract_to]
    debian = (" (or, on Debian/Ubuntu, `apt-get install dataset-fashion-mnist`: difflo reads "
              "/usr/share/datasets/fashion-mnist when data.root is not set)") if name == "fashion-mnist" else ""
    return (f"download {'; '.join(parts)} by hand into {root}" + (f", {', '.join(extract)}" if extract else "") +
            f"; then check with `difflo data info {name} --root {root}`{debian}")


def download(name: str, root=None, timeout: float = 10.0, log=print) -> Path:
    """Download (or verify, when present) the files of ``name`` into ``root``; returns root."""
    from . import DATASETS

    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    root = Path(root).expanduser() if root else default_root(name)
    if name == "mnist10k":
        log("mnist10k ships inside difflo (src/difflo/data/mnist10k.npz): nothing to download")
        return root
    if name == "folder":
        raise DataError("the folder data set reads your own images (data.root=DIR): there is nothing to download")
    if name == "celeba":
        present = {f: root / f for f in CELEBA_FILES if (root / f).is_file()}
        for f, path in present.items():
            got = md5sum(path)
            if got != CELEBA_FILES[f]:
                raise DataError(f"{path}: md5 {got} differs from the published {CELEBA_FILES[f]}; download it again")
            log(f"  {path}: md5 verified")
        if (root / "img_align_celeba").is_dir() and "list_eval_partition.txt" in present:
            log(f"celeba is in {root}")
            return root
        raise DataError(manual_instructions(name, root))
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create --root {root}: {e.strerror}; choose another directory") from None
    log(f"{name}: downloading into {root}")
    try:
        _download_all(name, root, timeout, log)
    except DataError:
        if created and not any(root.iterdir()):
            root.rmdir()                                 # leave nothing behind
        raise
    log(f"{name} is ready in {root}" + ("" if root == default_root(name) else f" (train with data.root={root})"))
    return root


def _download_all(name: str, root: Path, timeout: float, log) -> None:
    for r in SOURCES[name]:
        dest = root / r.filename
        if dest.is_file() and md5sum(dest) == r.md5:
            log(f"  {dest}: already there, md5 verified")
        else:
            errors = []
            for url in r.urls:
                try:
                    _fetch(url, dest, r.md5, timeout, log)
                    break
                except _Failed as e:
                    errors.append(str(e))
            else:
                raise DataError(f"could not download {r.filename} ({'; '.join(errors)}). Without network access, "
                                f"{manual_instructions(name, root)}")
        if r.extract_to:
            _extract(dest, root, r.extract_to, log)
