"""`difflo study denoiser`: the small UNet, a tiny end-to-end run of every part, and bad inputs."""
import argparse
import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

from difflo.errors import DiffloError
from difflo.nn import SmallUNet
from difflo.cli import study as cli
from difflo.experiments.denoiser import PARTS, SIGMAS, load_digits, parse_parts
from difflo.experiments.denoiser_report import fmt
from conftest import TINY

FILES = ["noising_strip.png", "train_loss.png", "denoised_epoch1.png", "denoised_last.png", "ood.png", "ood_mse.csv",
         "pure_noise.png", "lr_comparison.png", "summary.md", "results.json"]
TINY_FLAGS = ["--hidden", "8", "--epochs", "1", "--batch-size", "32", "--limit", "64", "--test-images", "32",
              "--noise-epochs", "1", "--flow-steps", "4"] + [a for o in TINY for a in ("--flow-override", o)]


def parse(*argv):
    p = argparse.ArgumentParser()
    cli.add_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["study", "denoiser", *argv])


def run(*argv):
    return cli.run(parse(*argv))


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert run("--out", str(out), *TINY_FLAGS) == 0
    return out


def test_unet_keeps_the_shape_and_learns_a_fixed_batch():
    torch.manual_seed(0)
    net = SmallUNet(hidden=8)
    x, _ = load_digits("train", limit=16)                                       # (16, 1, 28, 28) in [0, 1]
    assert x.shape == (16, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    z = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert net(z).shape == x.shape
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = F.mse_loss(net(z), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_tiny_study_writes_every_file_and_the_summary_has_its_numbers(tiny_study):
    for name in FILES:
        assert (tiny_study / name).is_file(), name
    with open(tiny_study / "ood_mse.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["sigma"]) for r in rows] == list(SIGMAS)
    assert float(rows[0]["mse_noisy"]) == 0.0                                     # sigma 0: z = x
    r = json.loads((tiny_study / "results.json").read_text())
    summary = (tiny_study / "summary.md").read_text()
    assert math.isfinite(r["noise"]["mse_to_train_mean"]) and r["noise"]["mse_to_train_mean"] >= 0
    numbers = [r["noise"]["mse_to_train_mean"], r["train"]["test_mse_epoch1"]]
    numbers += [row[k] for row in r["ood"] for k in ("mse_noisy", "mse_denoised")]
    numbers += [run_["final_loss"] for run_ in r["lr"]["runs"].values()]
    for v in numbers:
        assert fmt(v) in summary, v
    assert f"{r['timing_s']['total']:.0f} s" in summary and "--seed 0" in summary
    for schedule in ("constant", "exponential"):                  # both flow runs trained; checkpoints removed
        run_dir = tiny_study / f"lr_{schedule}"
        assert (run_dir / "metrics.csv").is_file() and not (run_dir / "checkpoints").exists()
        assert r["lr"]["runs"][schedule]["steps"] == 4
    lr = r["lr"]["runs"]
    assert lr["exponential"]["lr_last"] < lr["constant"]["lr_last"]


def test_parts_select_what_runs(tmp_path):
    assert run("--out", str(tmp_path), "--parts", "strip", "--test-images", "16") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noising_strip.png", "results.json", "summary.md"]
    assert parse_parts("all") == PARTS and parse_parts("lr,strip") == ("strip", "lr")


@pytest.mark.parametrize("flags, message", [
    (["--hidden", "0"], "--hidden must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--train-sigma", "-0.5"], "--train-sigma must be a noise level >= 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--parts", "strip,denoise"], "unknown part 'denoise'"),
    (["--parts", "ood"], "add train"),
    (["--flow-config", "no/such.yaml"], "not found"),
])
def test_bad_input_is_a_one_line_error(tmp_path, flags, message):
    with pytest.raises(DiffloError, match=message) as e:
        run("--out", str(tmp_path / "out"), *flags)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "summary.md").exists()


def test_unwritable_out_is_an_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DiffloError, match="cannot write"):
        run("--out", str(tmp_path / "file" / "sub"), "--parts", "strip")
    with pytest.raises(DiffloError, match="is a file"):
        run("--out", str(tmp_path / "file"), "--parts", "strip")
