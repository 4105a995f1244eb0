"""difflo experiment: every experiment end to end on a tiny model, the model cache, the EMA copies,
the report's numbers against its JSON, and the helpers' formulas."""
import copy
import json
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import TINY, assert_clean_error, run_cli
from difflo import config as config_mod
from difflo.data import first_per_class, load
from difflo.errors import DiffloError
from difflo.eval import memorization
from difflo.experiments import common, failure, scarcity
from difflo.cli.experiment import EXPERIMENTS, combine


@pytest.fixture(scope="module")
def clf(clf_file):
    return clf_file


def tiny_args(clf, runs):
    sets = [a for o in TINY if not o.startswith("train.log_every") for a in ("--set", o)]
    return [*sets, "--set", f"eval.classifier={clf}", "--set", "eval.ref_n=40", "--set", "train.log_every=2",
            "--runs", runs, "--train-steps", "4", "--snapshots", "2", "--n", "20", "--eval-steps", "2",
            "--device", "cpu"]


LISTS = ["--ws", "0,3", "--ddim-steps", "2,3", "--dpmpp-steps", "2", "--ddpm-steps", "3", "--per-class", "1",
         "--few-steps", "1", "--high-ws", "3,30"]


@pytest.fixture(scope="module")
def all_out(tmp_path_factory, clf):
    from difflo.cli import main
    root = tmp_path_factory.mktemp("exp")
    code = main([str(a) for a in ["experiment", "all", "--out", root / "out", *tiny_args(clf, root / "runs"), *LISTS]])
    assert code == 0
    return root


@pytest.mark.slow
def test_every_experiment_writes_its_report_json_csv_and_figures(all_out):
    for name in EXPERIMENTS:
        d = all_out / "out" / name
        md = (d / "report.md").read_text()
        res = json.loads((d / "results.json").read_text())
        assert res["experiment"] == name and res["setup"]["n"] == 20 and res["wall_seconds"] > 0
        n = 40 if name == "scarcity" else 20             # scarcity: k = max(4, n / classes) per class
        assert res["noise_floor"]["n"] == n and res["noise_floor"]["sd"] > 0 and f"Noise at N = {n}." in md
        assert "What was run" in md and ("**Result.**" in md or "At 1 step" in md)
        for fig in re.findall(r"\]\(([^)]+\.png)\)", md):
            assert (d / fig).is_file(), fig
        for table in res["tables"]:
            assert (d / f"{table}.csv").is_file()
    report = (all_out / "out" / "report.md").read_text()
    assert report.count("\n## ") == len(EXPERIMENTS)           # every experiment, headings one level down
    for fig in re.findall(r"\]\(([^)]+\.png)\)", report):
        assert (all_out / "out" / fig).is_file(), fig


@pytest.mark.slow
def test_report_tables_are_the_json_numbers(all_out):
    d = all_out / "out" / "guidance"
    rows = json.loads((d / "results.json").read_text())["tables"]["guidance"]
    md = (d / "report.md").read_text()
    assert [r["w"] for r in rows] == [0.0, 3.0]
    for r in rows:
        assert f"| {r['w']:g} | {r['class_accuracy']:.3f} | {r['fd_classifier']:.2f} | {r['class_variance']:.4f} |" in md


@pytest.mark.slow
def test_steps_experiment_counts_network_evaluations(all_out):
    rows = json.loads((all_out / "out" / "steps" / "results.json").read_text())["tables"]["steps"]
    nfe = {(r["sampler"], r["steps"]): r["nfe"] for r in rows}
    assert nfe[("ddpm", 3)] == 3 and nfe[("ddim eta=0", 2)] == 2 and nfe[("ddim eta=1", 3)] == 3
    assert nfe[("dpmpp", 2)] == 2 and nfe[("euler", 5)] == 5
    assert nfe[("heun", 5)] == 2 * 5 - 1                        # Heun's last step (to sigma = 0) is Euler
    assert {r["model"] for r in rows} == {"diffusion", "flow"}


@pytest.mark.slow
def test_models_are_trained_once_and_reused(all_out, clf, capsys):
    runs = sorted(p.name.rsplit("-", 1)[0] for p in (all_out / "runs").iterdir() if p.is_dir())
    # the schedules experiment trained the cosine model first; the others found it by its config's hash
    assert runs == ["flow", "per-class-1", "schedule-cosine", "schedule-linear", "schedule-sigmoid"]
    base = next((all_out / "runs").glob("schedule-cosine-*"))
    before = (base / "metrics.csv").stat().st_mtime_ns
    code, out, err = run_cli("experiment", "guidance", "--out", all_out / "again", *tiny_args(clf, all_out / "runs"),
                             "--ws", "0,3")
    assert code == 0 and (base / "metrics.csv").stat().st_mtime_ns == before
    again = json.loads((all_out / "again" / "results.json").read_text())["tables"]["guidance"]
    first = json.loads((all_out / "out" / "guidance" / "results.json").read_text())["tables"]["guidance"]
    assert [r["class_accuracy"] for r in again] == [r["class_accuracy"] for r in first]   # seeded: same samples


@pytest.mark.slow
def test_a_cached_run_trained_on_is_read_at_the_experiments_step(all_out, clf, tmp_path):
    """`difflo train --resume` with more steps in the cache directory: the experiment still reads its own step
    (same numbers as before), and where that checkpoint is gone it says so in one line instead of reading another."""
    src = next((all_out / "runs").glob("schedule-cosine-*"))
    run = tmp_path / "runs" / src.name
    shutil.copytree(src, run)
    code, _, err = run_cli("train", "--config", run / "config.yaml", "--out", run, "--resume", "train.steps=6")
    assert code == 0, err
    assert common.checkpoint_steps(run)[-1] == 6
    code, out, err = run_cli("experiment", "guidance", "--out", tmp_path / "again", *tiny_args(clf, tmp_path / "runs"),
                             "--ws", "0,3")
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "results.json").read_text())["tables"]["guidance"]
    first = json.loads((all_out / "out" / "guidance" / "results.json").read_text())["tables"]["guidance"]
    assert [(r["class_accuracy"], r["fd_classifier"]) for r in again] == [(r["class_accuracy"], r["fd_classifier"])
                                                                          for r in first]
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    code, out, err = run_cli("experiment", "guidance", "--out", tmp_path / "third", *tiny_args(clf, tmp_path / "runs"),
                             "--ws", "0,3")
    assert_clean_error(code, err, "trained on past 4 steps (to 6)", "delete that run directory")


def test_ema_copies_follow_the_formula_and_resume_exactly(tmp_path):
    net = torch.nn.Linear(2, 1)
    track = common.EmaTracker(tmp_path, every=2, last=4, decays=(0.5,))
    ws = []
    for step in range(1, 5):
        with torch.no_grad():
            net.weight.fill_(float(step))
        ws.append(float(step))
        track(step, net)
    expect = ws[0]
    for w in ws[1:]:
        expect = 0.5 * expect + 0.5 * w
    assert track.emas[0.5].weight[0, 0].item() == pytest.approx(expect)
    resumed = common.EmaTracker(tmp_path, every=2, last=4, decays=(0.5,))
    with torch.no_grad():
        net.weight.fill_(3.0)
    resumed(3, net)                                            # resumes from the step-2 snapshot
    with torch.no_grad():
        net.weight.fill_(4.0)
    resumed(4, net)
    assert torch.equal(resumed.emas[0.5].weight, track.emas[0.5].weight)
    gone = common.EmaTracker(tmp_path / "other", every=2, last=4)
    with pytest.raises(DiffloError, match="delete that run directory"):
        gone(3, net)


def test_combine_rewrites_links_and_demotes_headings(tmp_path):
    d = tmp_path / "exp" / "one"
    d.mkdir(parents=True)
    (d / "report.md").write_text("# One\n\n## Part\n\n![a](fig.png)\n")
    out = combine([d], tmp_path / "docs" / "report.md")
    text = out.read_text()
    assert "## One" in text and "### Part" in text and "](../exp/one/fig.png)" in text
    assert "- [One](#one)" in text
    with pytest.raises(DiffloError, match="not found"):
        combine([tmp_path / "missing"], tmp_path / "r.md")


def test_helpers_formulas():
    a = np.zeros((2, 2, 2, 1), np.uint8)
    a[0] = 255
    a[1, 0, 0] = 10
    assert failure.saturation(a) == pytest.approx(7 / 8)
    train = np.stack([np.full((2, 2, 1), 0, np.uint8), np.full((2, 2, 1), 255, np.uint8)])
    d, idx = memorization.nearest(np.stack([np.full((2, 2, 1), 51, np.uint8)]), train)
    assert idx.tolist() == [0] and d[0] == pytest.approx(0.2)
    imgs = np.stack([np.zeros((1, 1, 1)), np.full((1, 1, 1), 255), np.zeros((1, 1, 1))]).astype(np.uint8)
    assert common.class_variance(imgs, np.array([0, 0, 1])) == pytest.approx(0.25)     # class 1: one sample
    assert common.class_variance(imgs, np.array([0, 0, 0])) == pytest.approx(2 / 9)
    assert np.isnan(common.class_variance(imgs, np.array([0, 1, 2])))


def test_shown_classes_spread_over_many_classes():
    assert common.shown_classes(10) == list(range(10)) and common.shown_classes(3) == [0, 1, 2]
    many = common.shown_classes(98)
    assert len(many) == 10 and many[0] == 0 and many[-1] == 97 and many == sorted(set(many))
    res = {"images": np.arange(6).reshape(6, 1, 1, 1).astype(np.uint8), "labels": np.array([0, 1, 2, 0, 1, 2])}
    assert common.firsts(res, [2, 0])[:, 0, 0, 0].tolist() == [2, 0]


def test_scarcity_groups_copies_and_collapse():
    """A model that copies its only training image of a scarce class scores distance 0 and 100% copies;
    one that draws the same image k times has diversity 0 (mode collapse)."""
    from types import SimpleNamespace
    rng = np.random.default_rng(0)
    train_imgs = rng.integers(0, 256, (15, 4, 4, 3), dtype=np.uint8)
    train = SimpleNamespace(images=train_imgs, labels=np.array([0, 0] + [1] * 13))
    held = SimpleNamespace(images=rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8), labels=np.array([0, 1]))
    samples = np.concatenate([np.repeat(train_imgs[:1], 3, 0),                     # class 0: one image, copied
                              rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)])   # class 1: fresh noise
    labels = np.array([0, 0, 0, 1, 1, 1])
    rows = scarcity.per_class_rows(samples, labels, {0: 1.0, 1: 0.5}, train, held)
    assert [r["group"] for r in rows] == ["1-10", "11-30"] and [r["train_images"] for r in rows] == [2, 13]
    assert rows[0]["nn_samples"] < 1e-6 and rows[0]["copies"] == 1.0 and rows[0]["diversity"] < 1e-6
    assert rows[1]["copies"] == 0.0 and rows[1]["diversity"] > 0.2
    groups = scarcity.summarize(rows)
    assert [g["group"] for g in groups] == ["1-10", "11-30"] and groups[0]["diversity_ratio"] < 1e-6
    assert scarcity.pairwise_rms(np.stack([np.zeros((1, 1, 1)), np.full((1, 1, 1), 255)]).astype(np.uint8)) == 1.0
    assert scarcity.bin_of(101) == "101+" and scarcity.bin_of(10) == "1-10"


def test_first_per_class_keeps_k_of_each_class_in_order():
    ds = load("mnist10k", "test")
    sub = first_per_class(copy.deepcopy(ds), 3)
    assert len(sub) == 30 and np.bincount(sub.labels).tolist() == [3] * 10
    first0 = np.flatnonzero(ds.labels == 0)[:3]
    assert np.array_equal(sub.images[sub.labels == 0], ds.images[first0])
    with pytest.raises(DiffloError, match="fewer images"):
        first_per_class(copy.deepcopy(ds), 10_000)
    with pytest.raises(DiffloError, match="data.per_class"):
        config_mod.load(None, ["data.per_class=0"]).validate()


@pytest.mark.parametrize("argv, match", [
    (["experiment", "guidance", "--out", "{tmp}", "--ws", "a,b"], "comma-separated numbers"),
    (["experiment", "steps", "--out", "{tmp}", "--ddim-steps", "0"], "positive integers"),
    (["experiment", "report", "--out", "{tmp}/r.md"], "name the experiment folders"),
    (["experiment", "ema", "--out", "{tmp}", "--n", "1"], "--n must be >= 2"),
    (["experiment", "schedules", "--out", "{tmp}", "--schedules", "square"], "choose from"),
    (["experiment", "steps", "--out", "{tmp}", "--samplers", "ddim,magic"], "--samplers 'ddim,magic': choose from"),
    (["experiment", "guidance", "extra", "--out", "{tmp}"], "only for `experiment report`"),
    (["experiment", "guidance", "--out", "{tmp}", "--set", "train.lr=-1", "--runs", "{tmp}/runs"], "train.lr"),
])
def test_bad_experiment_input_is_one_line(argv, match, tmp_path, capsys):
    code, _, err = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    assert match in err and "Traceback" not in err
    if "--ws" not in argv and "--ddim-steps" not in argv:
        assert_clean_error(code, err)
