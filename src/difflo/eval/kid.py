"""Kernel Inception Distance: a kernel two-sample statistic between generated and real features.

KID (Binkowski et al. 2018, "Demystifying MMD GANs", Sec. 4) is the squared maximum mean discrepancy
between the two feature distributions under the cubic polynomial kernel

    k(x, y) = (x . y / d + 1)^3                    (d: the feature dimension),

estimated without bias (Gretton et al. 2012, "A Kernel Two-Sample Test", Lemma 6, Eq. 3) from m
vectors x_i of one set and m vectors y_j of the other:

    MMD^2_u = sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2.

As in the original code (MMD-GAN's ``compute_scores.py``), torch-fidelity's ``kid_features_to_metric``
and the StyleGAN/EDM metrics, the estimate is averaged over S random subsets of m vectors drawn without
replacement from each set; the spread reported with it (``kid_std``) is the standard deviation of the
S subset estimates (numpy's ``std``, ddof = 0: torch-fidelity's ``kernel_inception_distance_std``). It
is the spread of one size-m estimate, not the standard error of the mean: the subsets overlap, so
std / sqrt(S) would overstate the precision.

Unlike FID, the estimate is unbiased at any N, so small-N values are comparable in expectation with
large-N ones (only noisier). The subset draws follow torch-fidelity's exactly (a
``np.random.RandomState(seed)``, generated subset first), so with the same seed the two agree number
for number (tests/unit/test_kid_prc.py checks this formula against a plain-numpy transcription).
"""
from __future__ import annotations

import numpy as np

from ..errors import DiffloError

SUBSET_SIZE = 1000        # m: torch-fidelity's and MMD-GAN's default; capped at the sizes of both sets
SUBSETS = 100             # S: torch-fidelity's and StyleGAN's default


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Binkowski et al. 2018, Sec. 4: k(x, y) = (x . y / d + 1)^3 for every row pair of x (n, d) and
    y (m, d): (n, m), float64."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Gretton et al. 2012, Lemma 6 (Eq. 3): the unbiased MMD^2 estimate between two equal-sized feature
    sets under the cubic kernel (the diagonals of k(x, x) and k(y, y) left out)."""
    m = len(x)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    off_diagonal = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
    return float(off_diagonal / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def subset_size_for(n_gen: int, n_real: int, subset_size: int | None = None) -> int:
    """m: ``subset_size`` if given (it must fit both sets), else ``SUBSET_SIZE`` capped at both sizes
    (the StyleGAN/EDM convention ``min(n_gen, n_real, max_subset_size)``)."""
    if subset_size is None:
        m = min(SUBSET_SIZE, n_gen, n_real)
    else:
        if subset_size > min(n_gen, n_real):
            which = f"N={n_gen} samples" if n_gen < n_real else f"{n_real} reference images"
            raise DiffloError(f"KID subset size {subset_size} is larger than the {which}: give --kid-subset-size "
                              f"<= {min(n_gen, n_real)} (or more samples)")
        m = subset_size
    if m < 2:
        raise DiffloError(f"KID needs at least 2 feature vectors in each set (the unbiased estimate leaves the "
                          f"diagonal out), got {n_gen} samples and {n_real} reference images")
    return m


def kid(gen: np.ndarray, real: np.ndarray, subset_size: int | None = None, subsets: int = SUBSETS,
        seed: int = 0) -> dict:
    """Binkowski et al. 2018, Sec. 4 (KID): {kid, kid_std, kid_subset_size, kid_subsets}, the mean and
    standard deviation of the unbiased MMD^2 over ``subsets`` random subsets of m rows of each (N, d)
    feature array (m: :func:`subset_size_for`)."""
    gen, real = np.asarray(gen, np.float64), np.asarray(real, np.float64)
    if gen.ndim != 2 or real.ndim != 2 or gen.shape[1] != real.shape[1]:
        raise DiffloError(f"KID needs two (N, d) feature arrays of one d, got {gen.shape} and {real.shape}")
    if subsets < 1:
        raise DiffloError(f"--kid-subsets must be at least 1, got {subsets}")
    m = subset_size_for(len(gen), len(real), subset_size)
    rng = np.random.RandomState(seed)            # torch-fidelity's generator and order of draws
    mmds = np.empty(subsets)
    for i in range(subsets):
        x = gen[rng.choice(len(gen), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        mmds[i] = mmd2_unbiased(x, y)
    return {"kid": float(mmds.mean()), "kid_std": float(mmds.std()), "kid_subset_size": m, "kid_subsets": subsets}
