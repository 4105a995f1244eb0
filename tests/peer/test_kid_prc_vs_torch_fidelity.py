"""KID and improved precision/recall at the feature level against torch-fidelity 0.4.0's own functions:
``kid_features_to_metric`` (and its ``mmd2`` / ``kernel_poly`` helpers) and ``prc_features_to_metric``.
They take feature tensors, so no network and no weights are involved. The checks against plain-numpy
transcriptions of the papers are in tests/test_kid_prc.py.

torch-fidelity is a test-only reference: ``.ci/run`` installs it with ``--no-deps`` (best effort), since
its dependency torchvision is a multi-GB CUDA build that difflo never installs; without it this module
is skipped. ``import torch_fidelity.metric_kid`` cannot be used: it runs the package ``__init__`` and
``torch_fidelity.utils``, which import torchvision. So the two metric files are loaded by path (see
:func:`_load_torch_fidelity_metrics`), and nothing named ``torchvision`` is ever faked.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from difflo.eval import kid, precision_recall as prc

VERSION = "0.4.0"       # the version .ci/run installs; the stub below lists exactly its imports

_SPEC = importlib.util.find_spec("torch_fidelity")      # a top-level name: finds, imports nothing
if _SPEC is None or not _SPEC.submodule_search_locations:
    pytest.skip(f"torch-fidelity is not installed (`.venv/bin/pip install --no-deps torch-fidelity=={VERSION}`; "
                "torchvision is not needed)", allow_module_level=True)
try:
    _INSTALLED = importlib.metadata.version("torch_fidelity")
except importlib.metadata.PackageNotFoundError:          # importable, but not an installed distribution
    _INSTALLED = "of unknown version"
if _INSTALLED != VERSION:
    pytest.skip(f"torch-fidelity {_INSTALLED} is installed; this test loads "
                f"{VERSION}'s metric files with a stub of exactly that version's imports", allow_module_level=True)
PACKAGE_DIR = Path(_SPEC.submodule_search_locations[0])

# What metric_kid.py and metric_prc.py import from torch_fidelity.utils: the image-level entry points
# (calculate_kid / calculate_prc: build an Inception, extract features). Only those use them, and this
# test never calls them, so the stub's versions raise.
UTILS_NAMES = ("create_feature_extractor", "extract_featuresdict_from_input_id_cached",
               "resolve_feature_extractor", "resolve_feature_layer_for_metric")


def _not_loaded(*args, **kwargs):
    raise RuntimeError("torch_fidelity.utils is stubbed in this test (it imports torchvision): "
                       "only the feature-level functions are available")


def _is_torch_fidelity(name: str) -> bool:
    return name == "torch_fidelity" or name.startswith("torch_fidelity.")


def _load_torch_fidelity_metrics() -> dict[str, types.ModuleType]:
    """torch-fidelity's metric_kid.py and metric_prc.py, loaded by path without torchvision.

    Their imports: numpy, torch, tqdm; ``get_kwarg``/``vassert``/``vprint`` from ``torch_fidelity.helpers``
    (which needs only torch and the plain dicts of ``torch_fidelity.defaults``/``deprecations``, so the
    real files are loaded: the defaults, e.g. the kernel's degree 3 and coef0 1, are torch-fidelity's own);
    and the four names above from ``torch_fidelity.utils``, the one module that imports torchvision,
    stubbed. The parent package ``torch_fidelity`` is an empty stub module whose ``__path__`` is the
    installed package directory, so ``helpers`` and its two dependencies resolve to the real files
    without the package ``__init__`` (which imports the feature extractors, i.e. torchvision) running.

    The stubs are in ``sys.modules`` only while the two files execute: every ``torch_fidelity*`` entry is
    then restored to what it was before (usually: absent). The loaded functions keep working because
    their module globals were bound at import time.
    """
    before = {name: mod for name, mod in sys.modules.items() if _is_torch_fidelity(name)}
    parent = types.ModuleType("torch_fidelity")
    parent.__path__ = [str(PACKAGE_DIR)]
    utils = types.ModuleType("torch_fidelity.utils")
    for name in UTILS_NAMES:
        setattr(utils, name, _not_loaded)
    loaded = {}
    try:
        for name in before:
            del sys.modules[name]
        sys.modules["torch_fidelity"] = parent
        sys.modules["torch_fidelity.utils"] = utils
        for stem in ("metric_kid", "metric_prc"):
            spec = importlib.util.spec_from_file_location(f"torch_fidelity.{stem}", PACKAGE_DIR / f"{stem}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            loaded[stem] = module
    finally:
        for name in [name for name in sys.modules if _is_torch_fidelity(name)]:
            del sys.modules[name]
        sys.modules.update(before)
    return loaded


@pytest.fixture(scope="module")
def tf():
    before = {name: mod for name, mod in sys.modules.items() if _is_torch_fidelity(name)}
    torchvision_before = sys.modules.get("torchvision")
    modules = _load_torch_fidelity_metrics()
    yield types.SimpleNamespace(kid=modules["metric_kid"], prc=modules["metric_prc"], modules_before=before,
                                torchvision_before=torchvision_before)
    # Already restored by the loader; the teardown re-asserts it so that a leak cannot pass silently.
    assert {n: m for n, m in sys.modules.items() if _is_torch_fidelity(n)} == before
    assert sys.modules.get("torchvision") is torchvision_before


def _features(n, d, seed, shift=0.0, scale=1.0):
    return np.random.default_rng(seed).normal(size=(n, d)) * scale + shift


def test_loading_leaves_sys_modules_as_it_was(tf):
    after = {name: mod for name, mod in sys.modules.items() if _is_torch_fidelity(name)}
    assert after == tf.modules_before
    assert sys.modules.get("torchvision") is tf.torchvision_before       # nothing faked, nothing imported
    assert tf.kid.__name__ == "torch_fidelity.metric_kid" and tf.kid.__file__ == str(PACKAGE_DIR / "metric_kid.py")
    with pytest.raises(RuntimeError, match="stubbed"):                    # the image-level path is not there
        tf.kid.calculate_kid(input1="x", input2="y")


# ------------------------------------------------------------------------------------------ KID
# torch-fidelity's subset draws are difflo's: one np.random.RandomState(seed), per subset the generated
# set's choice(N_gen, m, replace=False) first, then the real set's, so the same seed gives the same
# subsets and the full metric can be compared, not only the per-subset formula. Its features are passed
# as float64 tensors: it computes the kernel in the tensors' dtype (float32 features would give a float32
# kernel), difflo always in float64.
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2020])
@pytest.mark.parametrize("subset_size, subsets", [(50, 20), (100, 50), (None, 100)])
@pytest.mark.parametrize("shift", [0.0, 0.1])
def test_kid_matches_kid_features_to_metric(tf, seed, subset_size, subsets, shift):
    gen = _features(300, 64, seed)
    real = _features(250, 64, seed + 1000, shift=shift, scale=1.0 + shift)
    res = kid.kid(gen, real, subset_size=subset_size, subsets=subsets, seed=seed)
    m = res["kid_subset_size"]
    assert m == (subset_size or 250)                                       # difflo's default: min(1000, 300, 250)
    ref = tf.kid.kid_features_to_metric(torch.from_numpy(gen), torch.from_numpy(real), kid_subsets=subsets,
                                        kid_subset_size=m, rng_seed=seed, verbose=False)
    # The sums are ordered differently (row sums minus diagonals vs whole sums minus traces): ~1e-15 apart.
    assert res["kid"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-9, abs=1e-13)
    assert res["kid_std"] == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-9, abs=1e-13)
    if shift:
        assert res["kid"] > 5 * res["kid_std"] / np.sqrt(subsets)          # a clearly nonzero value is compared


def test_kid_on_float32_features_matches_torch_fidelity_in_float64(tf):
    """difflo's reference files store float32 features; difflo upcasts them, as torch-fidelity does on the
    same values given as float64."""
    gen = _features(300, 64, 5).astype(np.float32)
    real = _features(250, 64, 6, shift=0.1).astype(np.float32)
    res = kid.kid(gen, real, subset_size=100, subsets=30, seed=9)
    ref = tf.kid.kid_features_to_metric(torch.from_numpy(gen).double(), torch.from_numpy(real).double(),
                                        kid_subsets=30, kid_subset_size=100, rng_seed=9, verbose=False)
    assert res["kid"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-9, abs=1e-13)
    assert res["kid_std"] == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-9, abs=1e-13)


@pytest.mark.parametrize("m", [2, 3, 37, 250])
def test_kernel_and_unbiased_mmd2_match_on_identical_subsets(tf, m):
    """The per-subset pieces both expose: difflo's polynomial_kernel / mmd2_unbiased against
    torch-fidelity's kernel_poly (its defaults: degree 3, gamma 1/d, coef0 1) / mmd2 (unbiased), and
    kernel_mmd (the two composed), on the same rows."""
    x, y = _features(m, 64, 10 + m), _features(m, 64, 20 + m, shift=0.2, scale=0.9)
    for a, b in ((x, x), (y, y), (x, y)):
        np.testing.assert_allclose(kid.polynomial_kernel(a, b), tf.kid.kernel_poly(a, b), rtol=1e-13, atol=0)
    k_xx, k_xy, k_yy = tf.kid.kernel_poly(x, x), tf.kid.kernel_poly(x, y), tf.kid.kernel_poly(y, y)
    mine = kid.mmd2_unbiased(x, y)
    assert mine == pytest.approx(tf.kid.mmd2(k_xx, k_xy, k_yy, mmd_est="unbiased"), rel=1e-9, abs=1e-13)
    assert mine == pytest.approx(tf.kid.kernel_mmd(x, y), rel=1e-9, abs=1e-13)


# --------------------------------------------------------------------------- precision and recall
# Equal set sizes, as difflo's evaluate.score gives them (it cuts the larger set to the smaller's size);
# generated first, real second in both. torch-fidelity returns float32 means (of a float32 0/1 tensor),
# difflo float64 ones: the counts must agree exactly, i.e. the values up to float32 rounding.
N, D = 250, 64


def _prc_case(name):
    if name == "same distribution":
        return _features(N, D, 30), _features(N, D, 31)
    if name == "shifted, narrower":
        return _features(N, D, 32), _features(N, D, 33, shift=0.2, scale=0.8)
    if name == "dropped mode":                                       # gen covers one of real's two modes
        real = np.concatenate([_features(N // 2, D, 34), _features(N - N // 2, D, 35, shift=1.0)])
        return _features(N, D, 36), real
    if name == "ties":     # small integers: exact distances, duplicate rows, many ties at the radii (<= in both)
        rng = np.random.default_rng(37)
        return rng.integers(-1, 2, size=(N, 6)).astype(np.float64), rng.integers(-1, 2, size=(N, 6)).astype(np.float64)
    if name == "identical sets":
        f = _features(N, D, 38)
        return f, f.copy()
    raise KeyError(name)


@pytest.mark.parametrize("case", ["same distribution", "shifted, narrower", "dropped mode", "ties", "identical sets"])
@pytest.mark.parametrize("save_cpu_ram", [False, True])              # torch-fidelity's two code paths
@pytest.mark.parametrize("blocks", [False, True])                     # one block each, or many
def test_precision_recall_match_prc_features_to_metric(tf, monkeypatch, case, save_cpu_ram, blocks):
    gen, real = _prc_case(case)
    assert len(gen) == len(real) == N
    if blocks:
        monkeypatch.setattr(prc, "BLOCK", 64)
    res = prc.precision_recall(gen, real, k=3)
    ref = tf.prc.prc_features_to_metric(torch.from_numpy(gen), torch.from_numpy(real), prc_neighborhood=3,
                                        prc_batch_size=64 if blocks else 10000, save_cpu_ram=save_cpu_ram,
                                        verbose=False)
    for mine, theirs in ((res["prc_precision"], ref["precision"]), (res["prc_recall"], ref["recall"])):
        assert round(mine * N) == round(theirs * N)
        assert np.float32(mine) == np.float32(theirs)
    if case in ("same distribution", "dropped mode"):                 # not only the trivial 0 and 1 compared
        assert 0 < res["prc_precision"] < 1 and 0 < res["prc_recall"] < 1
    if case == "identical sets":
        assert res["prc_precision"] == res["prc_recall"] == 1.0


@pytest.mark.parametrize("k", [1, 5])
def test_precision_recall_match_at_other_k(tf, k):
    gen, real = _prc_case("same distribution")
    res = prc.precision_recall(gen, real, k=k)
    ref = tf.prc.prc_features_to_metric(torch.from_numpy(gen), torch.from_numpy(real), prc_neighborhood=k,
                                        verbose=False)
    assert round(res["prc_precision"] * N) == round(ref["precision"] * N)
    assert round(res["prc_recall"] * N) == round(ref["recall"] * N)
