"""The edit techniques' table (difflo.edit.registry.TECHNIQUES): `difflo edit`'s parser is the table, every
technique's options survive options -> command line -> `difflo edit`'s parser, the web page's options do too,
and each technique costs the network evaluations it states."""
import argparse

import pytest
import torch
from PIL import Image, ImageDraw

from difflo import cli
from difflo.edit.registry import TECHNIQUES, OneOf, flag_text
from difflo.model import load_model

FRONT_END = {"technique", "func", "command", "ckpt", "null_class", "out", "figure"}


def parse(name: str, argv: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(["edit", name, "--ckpt", "c", "--out", "o", *argv])


def own(t, parsed) -> dict:
    return {k: getattr(parsed, k) for k in t.defaults()}


def sample(flag):
    """A value of the flag's type other than its default."""
    if flag.action:
        return flag.action == "store_true"
    if flag.choices:
        return next(c for c in reversed(flag.choices) if c != flag.default)
    if flag.type in ("seed", "positive_int", int):
        return (flag.default or 0) + 3
    if flag.type == "nonneg_float":
        return (flag.default or 0.0) + 0.25
    return "a b,1"                                   # text: a class name, a file, a list


def cases(t):
    """The required flags alone; then every flag off its default (each member of a group in turn)."""
    items = t.all_flags()
    required = {}
    for item in items:
        first = item.flags[0] if isinstance(item, OneOf) else item
        if item.required:
            required[first.key] = sample(first)
    yield required
    for j in range(max([len(i.flags) for i in items if isinstance(i, OneOf)] or [1])):
        values = {}
        for item in items:
            flag = item.flags[min(j, len(item.flags) - 1)] if isinstance(item, OneOf) else item
            values[flag.key] = sample(flag)
        yield values


def subcommands(parser) -> dict:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_the_parser_is_the_table():
    """`difflo edit`'s techniques are the table's, each with the table's options (and the front end's)."""
    assert list(subcommands(subcommands(cli.build_parser())["edit"])) == list(TECHNIQUES)
    for name, t in TECHNIQUES.items():
        parsed = parse(name, t.argv(t.options(**next(cases(t)))))
        assert set(vars(parsed)) - FRONT_END == set(t.defaults()), name


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_options_round_trip_through_the_command_line(name):
    """options -> argv -> `difflo edit NAME`'s parser -> the same options (defaults left out of the command)."""
    t = TECHNIQUES[name]
    for values in cases(t):
        opts = t.options(**values)
        argv = t.argv(opts)
        assert own(t, parse(name, argv)) == vars(opts), (name, argv)
    defaults = t.options(**next(cases(t)))
    assert len(t.argv(defaults)) == 2 * len(next(cases(t)))        # only the required flags


def test_flag_text_is_the_shortest_exact_number():
    assert [flag_text(v) for v in (3.0, 0.1, 1e-7, 2.5e300, 7, "x")] == ["3", "0.1", "1e-07", "2.5e+300", "7", "x"]
    assert float(flag_text(1 / 3)) == 1 / 3


@pytest.fixture(scope="module")
def model(tiny_run):
    return load_model(tiny_run)


@pytest.mark.parametrize("name", [n for n, t in TECHNIQUES.items() if t.page is not None])
def test_page_options_round_trip(model, name):
    """The web page's values (its field defaults, a class, the uploads' file names) give options whose command
    line `difflo edit` parses back to them."""
    t = TECHNIQUES[name]
    values = {"steps": 4, "w": 2.0, "seed": 3, "sampler": "ddpm", "n": 2, "device": "cuda", "ema": False}
    values.update({f.name: f.file or (5 if f.kind == "class" else f.default) for f in t.page})
    notes = []
    opts = t.options(**t.from_page(model, values, notes))
    argv = t.argv(opts)
    assert own(t, parse(name, argv)) == vars(opts), argv
    assert {"--seed", "--n", "--w", "--sampler", "--no-ema", "--device"} <= set(argv)
    assert all(getattr(opts, f.key) == f.file for f in t.page if f.file)
    if name == "sdedit":
        assert argv[-4:] == ["--stride", "250", "--levels", "2"] and notes[0].startswith("strength 0.5: start 2 of 4")


def eval_cases(img, mask) -> dict[str, list[list[str]]]:
    """Small runs of every technique (a new technique needs a case here)."""
    return {"forward": [["--image", img, "--t", "20,60"], ["--class", "3", "--t", "20"]],
            "denoise": [["--image", img, "--class", "1", "--w", "2", "--stride", "200", "--i-start", "2"]],
            "sdedit": [["--image", img, "--class", "4", "--stride", "200", "--levels", "1,3", "--n", "2"]],
            "inpaint": [["--image", img, "--mask", mask, "--class", "9", "--steps", "3", "--jump-length", "2",
                         "--jump-n-sample", "2"]],
            "anagram": [["--a", "1", "--b", "2", "--steps", "3", "--sampler", "ddim"]],
            "hybrid": [["--low", "1", "--high", "2", "--stride", "300", "--kernel-size", "3"]],
            "invert": [["--image", img, "--class", "3", "--steps", "2,3", "--w", "2"],
                       ["--image", img, "--class", "3", "--steps", "2"]],
            "interpolate": [["--image-a", img, "--seed-b", "4", "--class-a", "1", "--frames", "3", "--steps", "3"],
                            ["--seed-a", "1", "--seed-b", "2", "--frames", "2", "--steps", "2"]]}


@pytest.mark.slow
def test_evals_are_the_network_calls(model, tmp_path):
    """Technique.evals (the web page's limit and progress bar) is the number of network calls `run` makes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                   # small convolutions on a loaded 2-core machine: much faster
    calls = []
    hook = model.net.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        run_every_case(model, tmp_path, calls)
    finally:
        hook.remove()
        torch.set_num_threads(threads)


def run_every_case(model, tmp_path, calls):
    img, mask = tmp_path / "in.png", tmp_path / "mask.png"
    im = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(im).line([(8, 6), (20, 6), (12, 22)], fill=255, width=3)
    im.save(img)
    m = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(m).rectangle([0, 14, 27, 27], fill=255)                 # regenerate the bottom half
    m.save(mask)
    cases_ = eval_cases(str(img), str(mask))
    assert sorted(cases_) == sorted(TECHNIQUES)
    for name, argvs in cases_.items():
        t = TECHNIQUES[name]
        for argv in argvs:
            opts = parse(name, argv)
            calls.clear()
            result = t.run(model, opts)
            assert result.results.shape[0] > 0
            assert len(calls) == t.evals(model, opts), (name, argv, len(calls), t.evals(model, opts))
            assert opts == parse(name, argv)                           # run leaves the options as they were
