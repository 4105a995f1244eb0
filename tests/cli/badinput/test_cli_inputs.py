"""Every subcommand with missing, conflicting and malformed arguments: exit 2, one line, no traceback.

Three layers: (1) the argument grammar of every command, fuzzed with the commands themselves
stubbed out (argparse and its validators only); (2) hand-written missing / conflicting / malformed
cases that run the real commands; (3) `sample` and `edit` fuzzed for real on a tiny checkpoint with
values that keep each run cheap.
"""
import argparse
import contextlib
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from difflo import cli
from conftest import TINY
from inputcheck import assert_clean_error, call, fuzz, tally

NASTY = ["", " ", "-", "--", "0", "1", "2", "-1", "1.5", "1e9", "1e999", "-1e999", "nan", "inf", "abc", "0x10",
         "1,2", ",", "all", "None", "null", "[1]", "{}", "é", "\x00x", "9" * 30, "/", "/proc/x", "../x.png", "a.png",
         "a.npz", "a.gif", "cpu", "cuda", "meta", "ddim", "euler"]


def commands(parser=None, path=()):
    """(command path, parser) for every leaf command of `difflo`."""
    parser = parser or cli.build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from commands(sub, path + (name,))


LEAVES = dict(commands())


def test_every_command_is_covered():
    assert {p[0] for p in LEAVES} >= {"train", "sample", "demo", "data", "edit", "eval", "study", "serve", "experiment",
                                      "export", "ema", "env"}
    assert len(LEAVES) == 3 + 3 + 8 + 7 + 1 + 1 + 1 + 1 + 1 + 1 + 1   # data: download/info/clean; edit: 8; eval: 7 (nll); study; serve; experiment; export; ema; env; distill


@pytest.mark.slow
@fuzz(150)
@given(data=st.data())
def test_argument_grammar_fuzz(data):
    """Random flags of a random command, random values, random junk; commands stubbed."""
    path = data.draw(st.sampled_from(sorted(LEAVES)))
    parser = LEAVES[path]
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    argv = list(path)
    for action in data.draw(st.lists(st.sampled_from(options), max_size=6)) if options else []:
        argv.append(data.draw(st.sampled_from(action.option_strings)))
        if action.nargs != 0:
            if data.draw(st.booleans()):
                argv.append(data.draw(st.sampled_from(NASTY)))
            elif action.choices:
                argv.append(data.draw(st.sampled_from(sorted(map(str, action.choices)))))
            else:
                argv.append(data.draw(st.text(max_size=8)))
    if data.draw(st.booleans()):
        argv.insert(data.draw(st.integers(0, len(argv))), data.draw(st.sampled_from(NASTY + ["--nope", "-x"])))
    tally("cli: argument grammar")
    ran = mock.MagicMock(return_value=0)
    with contextlib.ExitStack() as patched:                   # every subcommand's run(), from the one list
        for module in cli.SUBCOMMANDS:
            patched.enter_context(mock.patch.object(module, "run", ran))
        code, out, err = call(argv)
    if code == 0:
        assert ran.called or "usage:" in out, (argv, out)          # parsed (or --help)
    else:
        assert_clean_error(code, err)


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return str(tiny_run)


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    Image.new("L", (28, 28), 128).save(d / "digit.png")
    Image.new("L", (28, 28), 255).save(d / "mask.png")
    Image.new("L", (20, 20), 255).save(d / "small_mask.png")
    return d


def cases(ckpt, png, tmp):
    """(argv, needle) of missing, conflicting and malformed arguments, command by command."""
    out, img = str(tmp / "o.png"), str(png / "digit.png")
    e = ["--ckpt", ckpt, "--out", str(tmp / "edit")]
    return [
        # train
        (["train", "--config"], "expected one argument"), (["train", "--out"], "expected one argument"),
        (["train", "--resume", "--resume", "train.lr"], "not of the form section.key=value"),
        (["train", "=1"], "unknown config key"), (["train", "train.lr=1e-3", "--bogus"], "unrecognized arguments"),
        (["train", *TINY, "--out", str(tmp / "r"), "--config", str(tmp)], "not found"),
        # sample
        (["sample"], "--ckpt"), (["sample", "--ckpt", ckpt], "--out"), (["sample", "--out", out], "--ckpt"),
        (["sample", "--ckpt", ckpt, "--out", out, "--grid", "2", "--n", "2"], "not allowed with"),
        (["sample", "--ckpt", ckpt, "--out", out, "--sampler", "heun"], "does not fit this diffusion model"),
        (["sample", "--ckpt", ckpt, "--out", out, "--steps", "x"], "expected a whole number"),
        (["sample", "--ckpt", ckpt, "--out", out, "--w", "nan"], "must be >= 0"),
        (["sample", "--ckpt", ckpt, "--out", out, "--w", "inf"], "finite"),
        (["sample", "--ckpt", ckpt, "--out", out, "--seed", str(2**64)], "< 2^62"),
        (["sample", "--ckpt", ckpt, "--out", out, "--seed", "-1"], "must be >= 0"),
        (["sample", "--ckpt", ckpt, "--out", out, "--classes", ","], "comma-separated class indices or names"),
        (["sample", "--ckpt", ckpt, "--out", out, "--device", "meta"], "cannot run difflo"),
        (["sample", "--ckpt", ckpt, "--out", out, "--device", "cuda:7"], "cuda:7"),
        (["sample", "--ckpt", ckpt, "--out", str(tmp / "dir.png"), "--grid", "1", "--steps", "1"], "directory"),
        (["sample", "--ckpt", ckpt, "--out", out, "--gif", str(tmp / "t.png")], "must end in .gif"),
        (["sample", "--ckpt", ckpt, "--out", out, "--batch-size", "0"], "must be >= 1"),
        # demo
        (["demo", "--minutes", "0"], "must be > 0"), (["demo", "--minutes", "nan"], "must be > 0"),
        (["demo", "--minutes"], "expected one argument"), (["demo", "extra"], "unrecognized arguments"),
        # data
        (["data"], "required"), (["data", "info"], "NAME"), (["data", "info", "mnist11k"], "unknown data set"),
        (["data", "info", "mnist10k", "--split", "validation"], "split"),
        (["data", "info", "mnist10k", "--image-size", "0"], "must be >= 1"),
        (["data", "info", "celeba", "--root", str(tmp / "none")], "celeba"),
        (["data", "info", "mnist10k", "--attribute", "Smiling"], "only for celeba"),
        (["data", "download", "mnist11k"], "unknown data set"),
        (["data", "download", "mnist", "--timeout", "0"], "must be > 0"),
        # edit
        (["edit"], "required"), (["edit", "forward"], "required"), (["edit", "forward", "--ckpt", ckpt], "--out"),
        (["edit", "sdedit", *e, "--class", "1"], "--image"), (["edit", "inpaint", *e, "--image", img, "--class", "1"],
                                                              "--mask"),
        (["edit", "anagram", *e, "--a", "1", "--b", "2", "--steps", "3", "--stride", "100"], "not allowed with"),
        (["edit", "hybrid", *e, "--low", "1", "--high", "x"], "no class 'x' in --high"),
        (["edit", "forward", *e, "--t", "abc"], "--t must be comma-separated timesteps"),
        (["edit", "forward", *e, "--t", ","], "at least one timestep"),
        (["edit", "forward", *e, "--t", "1000"], "out of range"),
        (["edit", "forward", *e, "--class", "10"], "class index 10 out of range"),
        (["edit", "denoise", *e, "--i-start", "99"], "--i-start 99 out of range"),
        (["edit", "denoise", *e, "--w", "2"], "give --class"),
        (["edit", "sdedit", *e, "--image", img, "--class", "1", "--levels", "a"], "--levels must be"),
        (["edit", "sdedit", *e, "--image", img, "--class", "1", "--levels", "99"], "--levels must lie in"),
        (["edit", "inpaint", *e, "--image", img, "--mask", str(png / "small_mask.png"), "--class", "1"],
         "give a mask of the image's size"),
        (["edit", "anagram", *e, "--a", "1", "--b", "2", "--view", "upside"], "invalid choice"),
        (["edit", "anagram", *e, "--a", "1", "--b", "2", "--steps", "1001"], "exceeds the model's 1000"),
        (["edit", "hybrid", *e, "--low", "1", "--high", "2", "--sigma", "-1"], "must be >= 0"),
        (["edit", "forward", *e, "--seed", "1e3"], "expected a whole number"),
        (["edit", "forward", "--ckpt", ckpt, "--out", str(png / "digit.png")], "cannot create --out"),
        # study
        (["study"], "required"), (["study", "denoiser"], "--out"),
        (["study", "denoiser", "--out", str(tmp / "s"), "--hidden", "0"], "--hidden must be >= 1"),
        (["study", "denoiser", "--out", str(tmp / "s"), "--lr", "nan"], "--lr must be > 0"),
        (["study", "denoiser", "--out", str(tmp / "s"), "--seed", str(2**70)], "--seed must be >= 0"),
        (["study", "denoiser", "--out", str(tmp / "s"), "--parts", "x"], "unknown part"),
        (["study", "denoiser", "--out", str(tmp / "s"), "--parts", "lr", "--flow-override", "train.lrr=1"],
         "did you mean train.lr"),
        (["study", "denoiser", "--out", str(png / "digit.png")], "is a file"),
        # eval
        (["eval"], "required"), (["eval", "model"], "required"), (["eval", "fid", "--samples", "x.npz"], "required"),
        (["eval", "model", "--ckpt", str(tmp / "none")], "not found"),
        (["eval", "model", "--ckpt", ckpt, "--n", "0"], "must be"),
        (["eval", "model", "--ckpt", ckpt, "--classifier", img], "not a readable safetensors"),
        (["eval", "fid", "--samples", img, "--ref", str(tmp / "none.npz")], "not found"),
        (["eval", "fid-ref", "--data", "mnist10k", "--features", "fid", "--out", "r.npz"], "invalid choice"),
        (["eval", "fid-ref", "--data", "mnist10k", "--out", str(tmp / "r.png")], ".npz"),
        (["eval", "accuracy", "--samples", img, "--classifier", str(tmp / "none.safetensors")], "not found"),
        (["eval", "train-classifier", "--data", "mnist11k", "--out", str(tmp / "c.safetensors")], "unknown data set"),
        # serve
        (["serve"], "required"), (["serve", "--ckpt", str(tmp / "none")], "not found"),
        # experiment
        (["experiment"], "required"), (["experiment", "ema"], "--out"),
        (["experiment", "noise", "--out", str(tmp / "x")], "invalid choice"),
        (["experiment", "guidance", "--out", str(tmp / "x"), "--ws", "a"], "comma-separated numbers"),
        (["experiment", "guidance", "--out", str(tmp / "x"), "--ws=-1,nan"], "comma-separated numbers"),
        (["experiment", "steps", "--out", str(tmp / "x"), "--ddim-steps", "0"], "positive integers"),
        (["experiment", "ema", "--out", str(tmp / "x"), "--train-steps", "0"], "must be >= 1"),
        (["experiment", "ema", "--out", str(tmp / "x"), "--n", "1"], "--n must be >= 2"),
        (["experiment", "ema", "--out", str(tmp / "x"), "--seed", "-1"], "must be >= 0"),
        (["experiment", "schedules", "--out", str(tmp / "x"), "--set", "train.lrr=1"], "did you mean train.lr"),
        (["experiment", "schedules", "--out", str(tmp / "x"), "--schedules", "square"], "choose from"),
        (["experiment", "guidance", "--out", str(png / "digit.png"), "--set", "train.steps=1"], "is a file"),
        (["experiment", "report", "--out", str(tmp / "r.md")], "name the experiment folders"),
        (["experiment", "report", str(tmp / "none"), "--out", str(tmp / "r.md")], "not found"),
        (["experiment", "guidance", str(tmp / "none"), "--out", str(tmp / "x")], "only for `experiment report`"),
        (["export", str(tmp / "none"), str(tmp / "out")], "not found"),
        (["export", ckpt], "the following arguments are required: OUT"),
        (["ema", ckpt, "--sigma-rel", "0.08", "--out", str(tmp / "ema")], "no post-hoc EMA snapshots"),
        (["distill", "--ckpt", ckpt, "--out", str(tmp / "d")], "--method"),
        (["distill", "--ckpt", ckpt, "--method", "reflow", "--out", str(tmp / "d")], "use --method progressive"),
        (["env", "--remeasure=1"], "ignored explicit argument"),
    ]


@pytest.mark.slow
def test_missing_conflicting_and_malformed_arguments(ckpt, png, tmp_path):
    (tmp_path / "dir.png").mkdir()
    all_cases = cases(ckpt, png, tmp_path)
    assert {a[0] for a, _ in all_cases} == {p[0] for p in LEAVES}
    for argv, needle in all_cases:
        tally("cli: hand-written cases")
        code, out, err = call(argv)
        assert_clean_error(code, err, needle)


# (good values, bad values) per flag; an example takes good values except for 0-2 of its flags
SAMPLE_VALUES = {
    "--steps": (["1", "2", "3"], ["0", "-1", "abc", "", "1.5", "5000", "1001"]),
    "--n": (["1", "3"], ["0", "-2", "x"]), "--grid": (["1", "2"], ["0", "x"]),
    "--batch-size": (["1", "2", "250"], ["0", "x"]),
    "--classes": (["all", "0,1", "9", " 3 ", "1,,2"], ["10", "-1", ",", "a", "", "0x1"]),
    "--seed": (["0", "7", str(2**62 - 5)], ["-1", str(2**62), "x", "1e3"]),
    "--w": (["0", "1", "3", "1e300"], ["-1", "nan", "inf"]), "--eta": (["0", "1", "100"], ["-0.5", "nan"]),
    "--sampler": (["ddpm", "ddim"], ["euler", "heun", "x"]), "--spacing": (["leading", "trailing", "linspace"],
                                                                           ["log"]),
    "--variance": (["fixed_small", "fixed_large"], ["x"]), "--device": (["cpu", "auto", "cpu:0"],
                                                                        ["cuda", "tpu", "meta", "cuda:x"]),
}


def pick(data, table, flags):
    """Values for `flags`: good ones, except for 0-2 flags that get a bad one."""
    bad = set(data.draw(st.lists(st.sampled_from(flags), max_size=2, unique=True))) if flags else set()
    return [(f, data.draw(st.sampled_from(table[f][f in bad] or table[f][0]))) for f in flags]


@pytest.mark.slow
@fuzz(30)
@given(data=st.data())
def test_sample_fuzz(ckpt, tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("sample")
    (tmp / "isdir.png").mkdir()
    good_out = [str(tmp / "g.png"), str(tmp / "s.npz"), str(tmp / "new" / "g.png")]
    bad_out = [str(tmp / "x.jpg"), "", str(tmp / "isdir.png"), "/proc/x/g.png"]
    argv = ["sample", "--ckpt", data.draw(st.sampled_from([ckpt] * 6 + [str(tmp / "missing"), str(tmp)])),
            "--out", data.draw(st.sampled_from(good_out * 3 + bad_out))]
    flags = data.draw(st.lists(st.sampled_from(sorted(SAMPLE_VALUES)), max_size=5, unique=True))
    if "--steps" not in flags:
        argv += ["--steps", "2"]
    if "--grid" not in flags and "--n" not in flags:
        argv += ["--grid", "1"]
    for flag, value in pick(data, SAMPLE_VALUES, flags):
        argv += [flag, value]
    if data.draw(st.booleans()):
        argv += ["--gif", data.draw(st.sampled_from([str(tmp / "t.gif"), str(tmp / "t.png"), str(tmp / "isdir.png")]))]
    if data.draw(st.booleans()):
        argv += ["--no-clip", "--no-ema"][: data.draw(st.integers(1, 2))]
    tally("cli: sample fuzz")
    code, out, err = call(argv)
    if code != 0:
        assert_clean_error(code, err)


EDIT_VALUES = {
    "--n": (["1", "2"], ["0", "x"]), "--seed": (["0", "7"], ["-1", "x"]), "--w": (["0", "3"], ["-1", "nan"]),
    "--sampler": (["ddpm", "ddim"], ["euler", "heun"]), "--steps": (["1", "2", "3"], ["0", "1001", "x"]),
    "--stride": (["100", "500", "999", "1000", "5000"], ["0", "x"]),
    "--t": (["250", "999", "0,500", "1.0"], ["abc", "-1", "1000", "1.5", ",", ""]),
    "--levels": (["1", "0,2", "10", "0"], ["99", "a", "", "-1"]), "--i-start": (["0", "1"], ["-1", "99"]),
    "--class": (["0", "9"], ["10", "-1", "x"]), "--a": (["0", "5"], ["10", "-3"]), "--b": (["1"], ["99"]),
    "--low": (["2"], ["10"]), "--high": (["3"], ["-1"]), "--view": (["rot180", "flip"], ["x"]),
    "--kernel-size": (["1", "2", "13", "999"], ["0"]), "--sigma": (["0", "2", "1e9"], ["-1", "nan"]),
    "--jump-length": (["1", "2", "9999"], ["0"]), "--jump-n-sample": (["1", "2"], ["0"]),
    "--figure": (["f.png", "new/f.png"], ["f.xyz", "isdir", ""]),
    "--image": (["digit.png", "mask.png"], ["missing.png", "isdir", "."]),
    "--mask": (["mask.png"], ["small_mask.png", "missing.png", "isdir"]),
}
FILES = {"--figure", "--image", "--mask"}


@pytest.mark.slow
@fuzz(40)
@given(data=st.data())
def test_edit_fuzz(ckpt, png, tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("edit")
    (tmp / "isdir").mkdir()
    technique = data.draw(st.sampled_from(["forward", "denoise", "sdedit", "inpaint", "anagram", "hybrid"]))
    parser = LEAVES[("edit", technique)]
    own = {s for a in parser._actions for s in a.option_strings}
    required = [a.option_strings[0] for a in parser._actions if a.required and a.option_strings[0] in EDIT_VALUES]
    flags = data.draw(st.lists(st.sampled_from([f for f in sorted(EDIT_VALUES) if f in own]), max_size=4,
                               unique=True))
    flags += [f for f in required if f not in flags and data.draw(st.integers(0, 9)) > 0]   # sometimes missing
    argv = ["edit", technique, "--ckpt", ckpt, "--out", str(tmp / "out")]
    if "--stride" in own and "--stride" not in flags and "--steps" not in flags:
        argv += ["--stride", "100"]                               # keep runs short
    elif "--steps" in own and "--steps" not in flags and "--stride" not in flags:
        argv += ["--steps", "2"]
    if "--levels" in own and "--levels" not in flags:
        argv += ["--levels", "1,3"]
    for flag, value in pick(data, EDIT_VALUES, flags):
        if flag in FILES and value:
            value = str((png if value.endswith("png") and flag != "--figure" and "missing" not in value else tmp)
                        / value)
        argv += [flag, value]
    tally("cli: edit fuzz")
    code, out, err = call(argv)
    if code != 0:
        assert_clean_error(code, err)
