"""difflo experiment recipe (the recipe harness) and difflo.cpuload: the budget turns a probed speed into
steps, candidates that cost the same share a probe, a disturbed probe is refused, post-hoc EMA lengths
are swept without retraining, the report's table matches its JSON; bad candidates are one line."""
import json
from pathlib import Path

import pytest

from conftest import assert_clean_error, run_cli
from difflo import cpuload
from difflo.errors import DiffloError
from difflo.experiments import common, recipe
from test_experiments import tiny_args


# --------------------------------------------------------------------------- cpuload
def fake_stat(tmp_path, busy_ticks: int):
    p = tmp_path / "stat"
    p.write_text(f"cpu  {busy_ticks} 0 0 5000 0 0 0 0 0 0\ncpu0 1 0 0 1 0 0 0 0\n")
    return p


def test_other_share_is_busy_time_minus_own_over_wall_and_cores(tmp_path, monkeypatch):
    tick = cpuload.os.sysconf("SC_CLK_TCK")
    stat = fake_stat(tmp_path, 0)
    clock, own = iter([0.0, 10.0]), iter([0.0, 4.0])
    load = cpuload.OtherLoad(stat=stat, clock=lambda: next(clock), own=lambda: next(own), cores=2)
    stat.write_text(f"cpu  {int(14 * tick)} 0 0 0 0 0 0 0\n")     # 14 core-seconds busy, 4 of them ours
    assert load.share() == pytest.approx(10 / 20)
    stat2 = fake_stat(tmp_path, 0)
    clock2, own2 = iter([0.0, 10.0]), iter([0.0, 4.0])
    idle = cpuload.OtherLoad(stat=stat2, clock=lambda: next(clock2), own=lambda: next(own2), cores=2)
    stat2.write_text(f"cpu  {int(4 * tick)} 0 0 0 0 0 0 0\n")
    assert idle.share() == pytest.approx(0.0)


def test_other_share_unknown_without_proc_stat(tmp_path):
    load = cpuload.OtherLoad(stat=tmp_path / "missing")
    assert load.share() is None and "unknown" in cpuload.describe(None)


def test_a_real_busy_process_is_seen(tmp_path):
    import subprocess
    import sys
    import time
    if cpuload.busy_seconds() is None:
        pytest.skip("no /proc/stat on this system")
    load = cpuload.OtherLoad()
    p = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<1.5: pass"])
    p.wait()
    time.sleep(0.05)
    assert load.share() > 0.15                       # one busy core of at most 4 cores, for most of the window


# --------------------------------------------------------------------------- candidates
@pytest.mark.parametrize("text, needle", [("no colon here", "NAME: section.key=value"),
                                          ("bad name!: train.lr=1", "NAME: section.key=value"),
                                          ("x: train.lr", "is not section.key=value")])
def test_bad_candidate_text_is_one_line(text, needle):
    with pytest.raises(DiffloError, match=needle):
        recipe.parse_candidate(text)


def test_candidate_overrides_apply_to_the_base(tmp_path):
    opts = common.Options(out=tmp_path, extra={"candidates": [recipe.parse_candidate("hi: train.lr=3e-3 "
                                                                                     "sample.w=1")]})
    cfgs = recipe.candidate_configs(opts)
    assert list(cfgs) == ["base", "hi"] and cfgs["hi"].train.lr == 3e-3 and cfgs["hi"].sample.w == 1
    assert cfgs["base"].train.lr != 3e-3
    with pytest.raises(DiffloError, match="used twice"):
        recipe.candidate_configs(common.Options(out=tmp_path, extra={"candidates": [("base", ("train.lr=1",))]}))


def test_probe_key_ignores_what_does_not_change_the_work(tmp_path):
    cfgs = recipe.candidate_configs(common.Options(out=tmp_path, extra={"candidates": [
        ("lr", ("train.lr=3e-3", "train.ema_decay=0.99", "sample.w=5")), ("wide", ("model.channels=64",)),
        ("batch", ("train.batch_size=32",))]}))
    keys = {k: recipe.probe_key(c) for k, c in cfgs.items()}
    assert keys["lr"] == keys["base"] and len({keys["base"], keys["wide"], keys["batch"]}) == 3


def test_minutes_become_steps_from_the_probe_and_probes_are_cached(tmp_path, monkeypatch):
    calls = []

    def fake_train(cfg, run_dir, on_step=None, **kw):
        calls.append(cfg.train.steps)
        for s in range(1, cfg.train.steps + 1):
            fake_time[0] += 0.5                              # 0.5 s per step
            on_step(s, None)

    fake_time = [0.0]
    monkeypatch.setattr(recipe, "train", fake_train)
    monkeypatch.setattr(recipe.time, "perf_counter", lambda: fake_time[0])
    opts = common.Options(out=tmp_path / "o", runs=tmp_path / "runs",
                          extra={"minutes": 1.0, "evals": 4, "candidates": [("lr", ("train.lr=3e-3",))]})
    (tmp_path / "runs").mkdir()
    budget = recipe.budgeted(opts, recipe.candidate_configs(opts), log=lambda *a: None)
    assert budget["base"]["steps"] == budget["lr"]["steps"] == 120          # 60 s / 0.5 s
    assert budget["base"]["seconds_per_step"] == pytest.approx(0.5)
    assert len(calls) == 1                                                   # the lr candidate reused the probe
    cfgs = recipe.candidate_configs(opts)
    recipe.budgeted(opts, cfgs, log=lambda *a: None)
    assert len(calls) == 1 and cfgs["base"].train.steps == 120 and cfgs["base"].train.ckpt_every == 30
    cached = json.loads((tmp_path / "runs" / "recipe-probes.json").read_text())
    assert len(cached) == 1


def test_a_disturbed_probe_is_retried_then_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "train", lambda cfg, run_dir, on_step=None, **kw:
                        [on_step(s, None) for s in range(1, cfg.train.steps + 1)])
    monkeypatch.setattr(recipe.cpuload.OtherLoad, "share", lambda self: 0.5)
    monkeypatch.setattr(recipe.time, "sleep", lambda s: None)
    opts = common.Options(out=tmp_path / "o", runs=tmp_path, extra={"minutes": 1.0})
    with pytest.raises(DiffloError, match="other processes used 50 %.*--train-steps"):
        recipe.budgeted(opts, recipe.candidate_configs(opts), log=lambda *a: None)
    assert not (tmp_path / "recipe-probes.json").exists()


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_recipe_end_to_end_table_matches_json_and_sweeps_posthoc_ema(tmp_path, clf_file, monkeypatch):
    args = [a for a in tiny_args(clf_file, tmp_path / "runs") if True]
    progress = []                                   # what progress.json held after each scored candidate
    real_write = recipe.write_text_atomic

    def spy(path, text):
        if Path(path).name == recipe.PROGRESS:
            progress.append(json.loads(text))
        real_write(path, text)
    monkeypatch.setattr(recipe, "write_text_atomic", spy)
    code, out, err = run_cli("experiment", "recipe", "--out", str(tmp_path / "out"), *map(str, args),
                             "--candidate", "hot: train.lr=5e-3", "--candidate", "ph: train.posthoc_ema=[0.05,0.1]",
                             "--evals", "2", "--sigma-rels", "0.05,0.1")
    assert code == 0, err
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [f["candidate"] for f in res["final"]] == ["base", "hot", "ph"]
    assert [[f["candidate"] for f in p["final"]] for p in progress] == [["base"], ["base", "hot"],
                                                                        ["base", "hot", "ph"]]
    assert [f["distance"] for f in progress[-1]["final"]] == [f["distance"] for f in res["final"]]
    assert not (tmp_path / "out" / recipe.PROGRESS).exists()
    assert all(f["train_steps"] == 4 for f in res["final"])                 # --train-steps: equal steps
    assert all(len(res["curves"][k]) == 2 for k in ("base", "hot", "ph"))   # 2 evaluated checkpoints each
    assert [p["step"] for p in res["curves"]["base"]] == [2, 4]
    assert {s["sigma_rel"] for s in res["posthoc"]} == {0.05, 0.1} and all(s["candidate"] == "ph"
                                                                            for s in res["posthoc"])
    md = (tmp_path / "out" / "report.md").read_text()
    best = min(res["final"], key=lambda f: f["distance"])
    assert f"Lowest fd_classifier: {best['candidate']} ({best['distance']:.2f}" in md
    for f in res["final"]:
        assert f"| {f['candidate']} | 4 |" in md


def test_recipe_options_are_refused_by_other_experiments(tmp_path):
    code, out, err = run_cli("experiment", "ema", "--out", str(tmp_path), "--minutes", "3")
    assert_clean_error(code, err, "--minutes is an option of `difflo experiment recipe`")


def test_bad_candidate_on_the_command_line_is_one_line(tmp_path):
    code, out, err = run_cli("experiment", "recipe", "--out", str(tmp_path), "--candidate", "oops")
    assert_clean_error(code, err, "--candidate", "write NAME: section.key=value")
    code, out, err = run_cli("experiment", "recipe", "--out", str(tmp_path), "--candidate", "x: train.nope=1")
    assert_clean_error(code, err, "nope")
