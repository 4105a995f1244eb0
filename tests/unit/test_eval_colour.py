"""Evaluation in colour: classifier files per data options, category accuracy, memorisation (nearest
neighbours). On the small fake emoji tarballs of test_emoji.py (no real data)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, run_cli, tiny_config
from difflo.config import DataConfig
from difflo.data import ArrayDataset, emoji
from difflo.eval import evaluate, memorization
from difflo.eval.classifier import (Classifier, category_accuracy, classifier_path_for, default_classifier_path,
                                    load_classifier_file, save_classifier, train_command)
from test_emoji import make_emoji


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Classifiers and data caches go to a fresh $XDG_CACHE_HOME, never ~/.cache/difflo."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("DIFFLO_DATA", str(tmp_path / "data-home"))


@pytest.fixture(scope="module")
def emoji_run(tmp_path_factory):
    """A 2-step tiny model on the fake emoji data (google style, subcategories, 16x16):
    face-affection (1 train / 1 test), face-smiling (11 / 1), hand-fingers-open (2 / 1)."""
    from difflo.train import train
    tmp = tmp_path_factory.mktemp("emoji_run")
    root = make_emoji(tmp / "emoji")
    cfg = tiny_config("train.steps=2", "train.batch_size=4", "data.name=emoji", f"data.root={root}",
                      f"data.cache_dir={tmp / 'cache'}", "data.image_size=16", "model.attn_resolutions=[8]",
                      "data.styles=[google]")
    train(cfg, tmp / "run", log=lambda *a: None, progress=False)
    return tmp / "run", root


def _save_random_classifier(path, channels, classes, size, **meta):
    torch.manual_seed(0)
    save_classifier(Classifier(channels, len(classes)).eval(), path,
                    {"kind": "difflo-classifier", "data": "emoji", "in_channels": channels,
                     "num_classes": len(classes), "image_size": size, "classes": json.dumps(list(classes)), **meta})


# ---------------------------------------------------------------- classifier files

def test_classifier_file_name_follows_the_data_options(tmp_path):
    home = tmp_path / "xdg-cache" / "difflo" / "classifiers"
    assert default_classifier_path("mnist10k") == home / "mnist10k.safetensors"          # unchanged
    assert default_classifier_path("mnist10k", background="white").name == "mnist10k.safetensors"
    assert default_classifier_path("mnist10k", 32).name == "mnist10k-32.safetensors"
    assert default_classifier_path("emoji", 32).name == "emoji-subcategory-32.safetensors"
    assert default_classifier_path("emoji", 32, label="subcategory", styles="google,twitter").name == \
        "emoji-subcategory-32.safetensors"                                             # the defaults, spelt out
    assert default_classifier_path("emoji").name == "emoji-subcategory-64.safetensors"
    assert default_classifier_path("emoji", 32, label="category", styles=["google"], background="black").name == \
        "emoji-category-google-bg000000-32.safetensors"
    cfg = DataConfig(name="emoji", image_size=32, label="category")
    assert classifier_path_for(cfg) == home / "emoji-category-32.safetensors"
    assert classifier_path_for(DataConfig()) == home / "mnist10k.safetensors"
    assert train_command(cfg) == "difflo eval train-classifier --data emoji --label category --image-size 32"
    assert train_command(DataConfig(name="emoji", styles=("twitter",), background="black", root="/a b")) == \
        "difflo eval train-classifier --data emoji --label subcategory --styles twitter --background 0,0,0 " \
        "--image-size 64 --root '/a b'"


def test_train_classifier_cli_on_emoji_options(tmp_path):
    root = make_emoji(tmp_path / "emoji")
    code, out, err = run_cli("eval", "train-classifier", "--data", "emoji", "--root", root, "--label", "subcategory",
                             "--styles", "google", "--image-size", "8", "--epochs", "1")
    assert code == 0, err
    path = tmp_path / "xdg-cache" / "difflo" / "classifiers" / "emoji-subcategory-google-8.safetensors"
    assert f"wrote {path}" in out and "held out" in out and "category accuracy" in out
    clf, meta = load_classifier_file(path)
    assert meta["label"] == "subcategory" and meta["styles"] == "google" and meta["image_size"] == "8"
    assert json.loads(meta["classes"]) == ["face-affection", "face-smiling", "hand-fingers-open"]
    assert meta["in_channels"] == "3" and int(meta["width"]) == clf.head.in_features // 2
    assert 0 <= float(meta["test_accuracy"]) <= float(meta["test_category_accuracy"]) <= 1
    # The category label: 2 classes, its own file, no category accuracy (the classes are the categories).
    code, out, err = run_cli("eval", "train-classifier", "--data", "emoji", "--root", root, "--label", "category",
                             "--styles", "google", "--image-size", "8", "--epochs", "1")
    assert code == 0, err
    _, meta = load_classifier_file(path.with_name("emoji-category-google-8.safetensors"))
    assert meta["num_classes"] == "2" and "test_category_accuracy" not in meta


def test_category_of_reads_emoji_json(tmp_path):
    root = make_emoji(tmp_path / "emoji")
    assert emoji.category_of(root) == {"face-smiling": "Smileys & Emotion", "face-affection": "Smileys & Emotion",
                                       "hand-fingers-open": "People & Body"}         # Component left out
    assert emoji.category_of(root, styles="twitter") == emoji.category_of(root, ["google"])


# ---------------------------------------------------------------- category accuracy

def test_category_accuracy_counts_a_wrong_subcategory_of_the_right_category(tmp_path, monkeypatch):
    cats = ("Smileys", "Smileys", "People")
    labels = np.array([0, 0, 1, 2, 2, 1])
    pred = np.array([0, 1, 0, 2, 0, 2])        # right, same category, same category, right, wrong, wrong
    assert category_accuracy(pred, labels, cats) == pytest.approx(4 / 6)
    clf = tmp_path / "clf.safetensors"
    _save_random_classifier(clf, 3, ["a", "b", "c"], 4, test_category_accuracy="0.9000")
    monkeypatch.setattr(evaluate, "predict", lambda _clf, _x: torch.as_tensor(pred))
    res = evaluate.score(np.zeros((6, 4, 4, 3), np.uint8), labels, classifier=clf, categories=cats)
    assert res["class_accuracy"] == pytest.approx(2 / 6) and res["category_accuracy"] == pytest.approx(4 / 6)
    assert res["num_categories"] == 2
    assert "category accuracy: 0.6667" in evaluate.format_result(res)
    assert "category_accuracy" not in evaluate.score(np.zeros((6, 4, 4, 3), np.uint8), labels, classifier=clf)


def test_eval_model_finds_the_models_classifier_or_names_the_command(emoji_run, tmp_path):
    run, root = emoji_run
    from difflo.model import load_model
    cfg = load_model(run).cfg.data
    code, _, err = run_cli("eval", "model", "--ckpt", run, "--n", "6", "--steps", "2")
    line = assert_clean_error(code, err, "emoji-subcategory-google-16.safetensors",
                              f"`difflo eval train-classifier --data emoji --label subcategory --styles google "
                              f"--image-size 16 --root {root}`")
    assert line.count("difflo eval train-classifier") == 1
    # A classifier of the wrong classes is refused, with the same command.
    path = classifier_path_for(cfg)
    path.parent.mkdir(parents=True)
    _save_random_classifier(path, 3, ["x", "y"], 16)
    code, _, err = run_cli("eval", "model", "--ckpt", run, "--n", "6", "--steps", "2")
    assert_clean_error(code, err, "knows 2 classes", "difflo eval train-classifier --data emoji")
    _save_random_classifier(path, 3, ["a", "b", "c"], 16)
    code, _, err = run_cli("eval", "model", "--ckpt", run, "--n", "6", "--steps", "2")
    assert_clean_error(code, err, "other classes")
    # The matching one is found without --classifier; subcategories also give a category accuracy.
    _save_random_classifier(path, 3, cfg.classes, 16, test_accuracy="0.5000", test_category_accuracy="0.7000")
    res_json = tmp_path / "res.json"
    code, out, err = run_cli("eval", "model", "--ckpt", run, "--n", "6", "--steps", "2", "--json", res_json)
    assert code == 0, err
    assert "class accuracy" in out and "category accuracy" in out and "2 categories" in out
    res = json.loads(res_json.read_text())
    assert res["classifier"] == path.name and res["n"] == 6
    assert 0 <= res["class_accuracy"] <= res["category_accuracy"] <= 1
    assert res["classifier_test_category_accuracy"] == "0.7000"
    assert res["guidance_input"] is False                     # a trained model guides with two branches


# ---------------------------------------------------------------- memorisation

def test_nearest_neighbour_of_a_copy_is_at_distance_zero():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(20, 6, 6, 3), dtype=np.uint8)
    queries = np.concatenate([train[[3, 17]], rng.integers(0, 256, size=(1, 6, 6, 3), dtype=np.uint8)])
    dist, idx = memorization.nearest(queries, train)
    assert dist[0] == 0.0 and dist[1] == 0.0 and idx[:2].tolist() == [3, 17] and dist[2] > 0.1
    black, white = np.zeros((1, 2, 2, 1), np.uint8), np.full((1, 2, 2, 1), 255, np.uint8)
    assert memorization.rms_distance(black, white).tolist() == [1.0]
    d_self, i_self = memorization.nearest(train, train, exclude=np.arange(20))
    assert (i_self != np.arange(20)).all() and (d_self > 0).all()            # never itself
    assert memorization.copy_threshold(train) == pytest.approx(np.percentile(d_self, 5))


def test_copy_fraction_is_one_for_exact_copies_and_held_out_reals_are_the_baseline():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(12, 4, 4, 3), dtype=np.uint8)
    labels = np.array([0] * 3 + [1] * 9)
    train = ArrayDataset(images[:10], labels[:10], 2, "fake", classes=("rare", "common"))
    held_out = ArrayDataset(images[10:], labels[10:], 2, "fake", classes=("rare", "common"))
    threshold = memorization.copy_threshold(train.images)
    samples = np.concatenate([images[[0, 2, 1]], rng.integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)])
    sample_labels = np.array([0, 0, 0, 1, 1, 1])
    rows, neighbours = memorization.class_rows(samples, sample_labels, train, held_out, [0, 1], threshold)
    rare, common = rows
    assert rare["name"] == "rare" and rare["train"] == 3 and rare["held_out"] == 0 and rare["n"] == 3
    assert rare["sample_nn_same"] == 0.0 and rare["sample_nn_all"] == 0.0 and rare["copies"] == 1.0
    assert rare["held_out_nn_same"] is None and rare["nearest_train_index"] == [0, 2, 1]
    np.testing.assert_array_equal(neighbours[0], samples[:3])
    assert common["copies"] == 0.0 and common["held_out"] == 2 and common["held_out_nn_same"] > 0
    assert memorization.scarce_classes(train, 3) == [0]
    assert memorization.held_out_baseline(train, held_out) == pytest.approx(common["held_out_nn_same"])


def test_eval_nearest_cli_on_a_tiny_emoji_model(emoji_run, tmp_path):
    run, _ = emoji_run
    grid, res_json = tmp_path / "nn.png", tmp_path / "nn.json"
    code, out, err = run_cli("eval", "nearest", "--ckpt", run, "--n-per-class", "2", "--steps", "2",
                             "--out", grid, "--json", res_json)
    assert code == 0, err
    assert "face-affection" in out and "hand-fingers-open" in out and "face-smiling" not in out   # <= 10 train
    assert "copies" in out and f"wrote {grid}" in out
    res = json.loads(res_json.read_text())
    assert [r["name"] for r in res["classes"]] == ["face-affection", "hand-fingers-open"]
    assert [r["train"] for r in res["classes"]] == [1, 2] and all(r["n"] == 2 for r in res["classes"])
    assert all(0 <= r["sample_nn_same"] <= 1 and 0 <= r["copies"] <= 1 for r in res["classes"])
    assert res["steps"] == 2 and res["threshold"] > 0 and res["held_out_nn_same_all_classes"] > 0
    from PIL import Image
    with Image.open(grid) as im:
        assert im.size[1] > 2 * 16                                           # two rows of cells
    code, out, err = run_cli("eval", "nearest", "--ckpt", run, "--classes", "face-smiling", "--n-per-class", "1",
                             "--steps", "2")
    assert code == 0 and "face-smiling" in out, err


def test_eval_nearest_cli_with_chosen_classes_and_errors(tiny_run, tmp_path):
    code, out, err = run_cli("eval", "nearest", "--ckpt", tiny_run, "--classes", "0,7", "--n-per-class", "2",
                             "--steps", "2", "--max-train-images", "200")
    assert code == 0, err
    assert "of 8000 searched" in out
    code, _, err = run_cli("eval", "nearest", "--ckpt", tiny_run, "--n-per-class", "1", "--steps", "2",
                           "--max-train-images", "50")
    assert_clean_error(code, err, "no class of mnist10k has 10 or fewer training images", "--classes")
    code, _, err = run_cli("eval", "nearest", "--ckpt", tiny_run, "--classes", "0", "--out", tmp_path / "x.jpg")
    assert_clean_error(code, err, ".png")
