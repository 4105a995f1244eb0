"""KID and improved precision/recall at the feature level, against plain-numpy transcriptions of the
papers' formulas written here.

torch-fidelity 0.4.0 itself is the reference of tests/peer/test_kid_prc_vs_torch_fidelity.py; these
transcriptions follow the papers (Gretton et al. 2012, Lemma 6 / Binkowski et al. 2018 for KID;
Kynkaanniemi et al. 2019, Eq. 1-2), with loops and masks rather than difflo's matrix sums, and the same
subset draws as torch-fidelity (``np.random.RandomState(seed)``, generated subset first).
"""
import numpy as np
import pytest

from difflo.errors import DiffloError
from difflo.eval import kid, precision_recall as prc


def _features(n, d, seed, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) * scale + shift


# ------------------------------------------------------------------------------- reference formulas
def paper_mmd2_unbiased(x, y):
    """MMD^2_u = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(m(m-1)) sum_{i != j} k(y_i, y_j)
    - 2/m^2 sum_{i, j} k(x_i, y_j), with k(a, b) = (a.b / d + 1)^3."""
    m, d = x.shape
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (m * m)


def paper_kid(gen, real, m, subsets, seed):
    rng = np.random.RandomState(seed)
    vals = []
    for _ in range(subsets):
        x = gen[rng.choice(len(gen), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        vals.append(paper_mmd2_unbiased(x, y))
    return float(np.mean(vals)), float(np.std(vals))


def paper_precision_recall(gen, real, k=3):
    """f(phi, Phi) = 1 iff ||phi - phi'|| <= ||phi' - NN_k(phi', Phi)|| for some phi' in Phi (Eq. 1);
    precision = mean_g f(g, real), recall = mean_r f(r, gen) (Eq. 2)."""
    def radius(i, pts):
        d = sorted(np.linalg.norm(pts[i] - pts[j]) for j in range(len(pts)) if j != i)
        return d[k - 1]

    def f(phi, pts, radii):
        return any(np.linalg.norm(phi - pts[j]) <= radii[j] for j in range(len(pts)))

    r_real = [radius(i, real) for i in range(len(real))]
    r_gen = [radius(i, gen) for i in range(len(gen))]
    precision = np.mean([f(g, real, r_real) for g in gen])
    recall = np.mean([f(r, gen, r_gen) for r in real])
    return precision, recall


# ------------------------------------------------------------------------------------------ KID
def test_mmd2_matches_the_paper_formula():
    x, y = _features(30, 8, 0), _features(30, 8, 1, shift=0.3, scale=1.2)
    assert kid.mmd2_unbiased(x, y) == pytest.approx(paper_mmd2_unbiased(x, y), rel=1e-10, abs=1e-12)


def test_kid_mean_and_spread_over_subsets_match_the_reference():
    gen, real = _features(70, 6, 2, shift=0.2), _features(90, 6, 3)
    res = kid.kid(gen, real, subset_size=25, subsets=7, seed=11)
    mean, std = paper_kid(gen, real, 25, 7, 11)
    assert res["kid"] == pytest.approx(mean, rel=1e-10)
    assert res["kid_std"] == pytest.approx(std, rel=1e-8)
    assert (res["kid_subset_size"], res["kid_subsets"]) == (25, 7)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_grows_with_a_shift():
    """Same distribution: the unbiased estimate is centred on 0 (the biased V-statistic would be
    > 0 by about 2 E[k(x, x)] / m); a mean shift of 0.5 per feature gives a clearly positive value."""
    same = kid.kid(_features(400, 16, 4), _features(400, 16, 5), subset_size=100, subsets=50)
    shifted = kid.kid(_features(400, 16, 4), _features(400, 16, 5, shift=0.5), subset_size=100, subsets=50)
    assert abs(same["kid"]) < 3 * same["kid_std"] / np.sqrt(4)       # 4 disjoint subsets' worth of data
    assert shifted["kid"] > 10 * same["kid_std"]


def test_kid_subset_size_defaults_to_the_smaller_set_and_refuses_too_large_ones():
    gen, real = _features(20, 4, 6), _features(60, 4, 7)
    assert kid.kid(gen, real, subsets=2)["kid_subset_size"] == 20              # min(1000, 20, 60)
    assert kid.subset_size_for(5000, 3000) == kid.SUBSET_SIZE
    with pytest.raises(DiffloError, match=r"KID subset size 50 is larger than the N=20 samples"):
        kid.kid(gen, real, subset_size=50)
    with pytest.raises(DiffloError, match=r"larger than the 60 reference images"):
        kid.subset_size_for(100, 60, 80)
    with pytest.raises(DiffloError, match="at least 2"):
        kid.kid(gen[:1], real)
    with pytest.raises(DiffloError, match="one d"):
        kid.kid(gen, real[:, :3])


# --------------------------------------------------------------------------- precision and recall
def test_precision_recall_match_the_paper_formula():
    gen = _features(60, 5, 8, scale=0.7)
    real = np.concatenate([_features(40, 5, 9), _features(30, 5, 10, shift=3.0)])   # a mode gen lacks
    res = prc.precision_recall(gen, real)
    p, r = paper_precision_recall(gen, real)
    assert (res["prc_precision"], res["prc_recall"]) == (pytest.approx(p), pytest.approx(r))
    assert res["prc_k"] == 3 and (res["prc_n_gen"], res["prc_n_real"]) == (60, 70)
    for k in (1, 5):
        res = prc.precision_recall(gen, real, k=k)
        p, r = paper_precision_recall(gen, real, k)
        assert (res["prc_precision"], res["prc_recall"]) == (pytest.approx(p), pytest.approx(r))


def test_precision_and_recall_separate_fidelity_from_diversity():
    real = _features(300, 4, 11)
    assert prc.precision_recall(real, real)["prc_precision"] == 1.0 == prc.precision_recall(real, real)["prc_recall"]
    collapsed = real[np.linalg.norm(real, axis=1) < 1.0]             # only the core of the data: faithful, not diverse
    res = prc.precision_recall(collapsed, real)
    assert res["prc_precision"] > 0.95 and res["prc_recall"] < 0.6
    off = prc.precision_recall(_features(300, 4, 12, shift=6.0), real)     # nowhere near the data
    assert off["prc_precision"] == 0.0 and off["prc_recall"] == 0.0


def test_precision_recall_need_k_plus_one_vectors():
    with pytest.raises(DiffloError, match="at least 4 samples"):
        prc.precision_recall(_features(3, 2, 0), _features(10, 2, 1))
