"""Settings that did nothing, or failed with the wrong words (issue 25, item 9): each is one clear line now,
and a small sample set keeps the metrics its size allows.

* ``data.cache_dir`` on a data set read as stored (not decoded into the cache);
* ``difflo eval nll --terms`` beyond the model's T - 1 KL terms, and a likelihood option the chosen
  method does not read;
* ``train.grad_accum=0`` (it must be >= 1, not "a divisor");
* ``--ref`` that is not an FID statistics file;
* ``difflo eval fid`` on 2 samples: the Frechet distance and KID, precision/recall skipped with a note.
"""
from __future__ import annotations

import numpy as np

from conftest import TINY
from difflo import data
from difflo.data import DATASETS
from difflo.eval import evaluate, fid, kid
from inputcheck import assert_clean_error, call, tally


def test_cache_dir_on_a_data_set_read_as_stored(tmp_path):
    tally("ignored inputs: data.cache_dir")
    cached = [s.name for s in DATASETS.values() if s.cached]
    assert "flowers102" in cached and "mnist10k" not in cached
    code, _, err = call(["train", *TINY, f"data.cache_dir={tmp_path / 'c'}", "--out", tmp_path / "run"])
    line = assert_clean_error(code, err, "data.cache_dir=", "has no effect on mnist10k", ", ".join(cached))
    assert "remove it" in line and not (tmp_path / "run").exists() and not (tmp_path / "c").exists()
    code, _, err = call(["data", "info", "cifar10", "--cache-dir", tmp_path / "c"])
    assert_clean_error(code, err, "has no effect on cifar10")
    assert len(data.load("mnist10k", "test", cache_dir=None)) == 2000       # unset: fine


def test_nll_terms_beyond_the_models_timesteps(tiny_run):
    tally("ignored inputs: nll --terms")
    code, _, err = call(["eval", "nll", "--ckpt", tiny_run, "--terms", "5000"])
    assert_clean_error(code, err, "--terms 5000", "999 KL terms", "diffusion.timesteps=1000", "1..999, or all")


def test_nll_options_of_the_other_method(tiny_run):
    tally("ignored inputs: nll method options", 3)
    for argv, needle in [(["--method", "ode", "--terms", "4"], "--terms has no effect with --method ode; it is "
                                                                "used by --method vlb"),
                         (["--method", "ode", "--variance", "fixed_large"], "--variance has no effect"),
                         (["--steps", "3"], "--steps has no effect with --method vlb; it is used by --method ode")]:
        code, _, err = call(["eval", "nll", "--ckpt", tiny_run, *argv])
        assert_clean_error(code, err, needle)


def test_grad_accum_zero_says_at_least_one(tmp_path):
    tally("ignored inputs: grad_accum")
    code, _, err = call(["train", *TINY, "train.grad_accum=0", "--out", tmp_path / "run"])
    line = assert_clean_error(code, err, "train.grad_accum=0 must be >= 1")
    assert "divisor" not in line


def test_ref_that_is_not_a_statistics_file(tiny_run, tmp_path):
    tally("ignored inputs: --ref", 3)
    notes, npy, samples = tmp_path / "notes.txt", tmp_path / "a.npy", tmp_path / "s.npz"
    notes.write_text("my notes\n")
    np.save(npy, np.zeros(3))
    np.savez(samples, images=np.zeros((4, 28, 28, 1), np.uint8))
    for ref, what in [(notes, "not an .npz archive"), (npy, "not an .npz archive"),
                      (samples, "an .npz without mu, sigma, n, extractor")]:
        code, _, err = call(["eval", "model", "--ckpt", tiny_run, "--no-accuracy", "--n", "4", "--ref", ref])
        line = assert_clean_error(code, err, f"{ref} is not an FID statistics file ({what})", "difflo eval fid-ref")
        assert "pickle" not in line
    code, _, err = call(["eval", "fid", "--samples", samples, "--ref", notes])
    assert_clean_error(code, err, "is not an FID statistics file")
    fid.save_stats(tmp_path / "r.npz", np.zeros(4), np.eye(4), 30, "x", np.zeros((30, 4)))
    code, _, err = call(["eval", "fid", "--samples", notes, "--ref", tmp_path / "r.npz"])     # and as --samples
    line = assert_clean_error(code, err, f"{notes} is not a sample set (not an .npz archive)", "difflo sample")
    assert "pickle" not in line


def test_fid_on_two_samples_keeps_fd_and_kid(tmp_path, clf_file):
    """N = 2 allows the Frechet distance and KID (a covariance, an unbiased MMD of 2), not precision/recall (k = 3
    neighbours need 4): the first two are reported, the third is skipped with a note naming the N it needs."""
    tally("ignored inputs: fid on 2 samples", 2)
    ext = fid.ClassifierFeatures(clf_file)
    digits = data.load("mnist10k", "test").images
    feats = ext(digits[:40])
    fid.save_stats(tmp_path / "ref.npz", *fid.feature_stats(feats), 40, ext.name, feats, classifier=str(clf_file))
    np.savez(tmp_path / "two.npz", images=digits[40:42])
    code, out, err = call(["eval", "fid", "--samples", tmp_path / "two.npz", "--ref", tmp_path / "ref.npz"])
    assert code == 0, err
    assert "FD (" in out and "KD (" in out and "subsets of m=2" in out and "  recall: " not in out
    assert "note: no precision/recall" in out and "at least 4 samples" in out and "N=2" in out
    ref = fid.load_stats(tmp_path / "ref.npz")
    res = evaluate.score(digits[40:42], None, ref=ref, extractor=ext)
    assert res["fd_classifier"] == fid.distance_to(ref, ext(digits[40:42]), ext.name)
    assert res["kd_classifier"] == kid.kid(ext(digits[40:42]), ref["features"])["kid"]
    assert "prc_precision" not in res and len(res["notes"]) == 1
    assert "prc_precision" in evaluate.score(digits[40:44], None, ref=ref, extractor=ext)     # N = 4 has it
    np.savez(tmp_path / "one.npz", images=digits[40:41])
    code, _, err = call(["eval", "fid", "--samples", tmp_path / "one.npz", "--ref", tmp_path / "ref.npz"])
    assert_clean_error(code, err, "at least 2 samples", "N=1")
