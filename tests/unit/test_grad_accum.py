"""Gradient accumulation (train.grad_accum = K): every image gets the same noise, timestep and label
dropout whatever K, the update is the whole batch's (up to float summation order) in fp32 and bf16,
a resumed run continues exactly, DDP syncs once per step, and a K that does not divide the batch is
one error line."""
import csv
import shutil

import pytest
import torch
from safetensors.torch import load_file

from difflo import checkpoint, distributed, train as train_mod
from difflo.errors import ConfigError, DiffloError
from difflo.train import train
from conftest import assert_clean_error, run_cli, tiny_config

quiet = dict(log=lambda *a: None, progress=False)
ARGS = ["train.device=cpu", "train.label_dropout=0.5", "train.ckpt_every=2"]      # batch 8 (TINY)
FLOW = ["diffusion.objective=flow", "diffusion.prediction=u", "diffusion.t_sampling=logit_normal",
        "sample.sampler=euler"]


def losses(run):
    with open(run / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def weights(run, name="model"):
    return load_file(str(checkpoint.list_checkpoints(run)[-1] / f"{name}.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("objective", [[], FLOW], ids=["diffusion", "flow"])
def test_every_image_gets_the_same_draws_whatever_k(tmp_path, monkeypatch, objective):
    """The network's inputs (x_t = alpha x0 + sigma eps, the model time, the label after dropout) of
    K = 4 micro-batches of 2, put together, are those of K = 1 on the batch of 8, bit for bit."""
    seen = []
    build = train_mod.build_net

    def recording_net(cfg):
        net = build(cfg)
        net.register_forward_pre_hook(lambda mod, args: seen.append([a.detach().clone() for a in args]))
        return net

    monkeypatch.setattr(train_mod, "build_net", recording_net)
    inputs = {}
    for k in (1, 4):
        seen.clear()
        train(tiny_config(*ARGS, *objective, "train.steps=2", f"train.grad_accum={k}"), tmp_path / f"k{k}", **quiet)
        assert len(seen) == 2 * k and all(len(args[0]) == 8 // k for args in seen)
        inputs[k] = [torch.cat([args[i] for args in seen[s * k:(s + 1) * k]]) for s in range(2) for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(inputs[1], inputs[4], strict=True))
    assert (inputs[1][2] == 10).any() and (inputs[1][2] < 10).any()      # label dropout did drop some labels


def run(tmp_path, k: int, precision: str = "fp32"):
    out = tmp_path / f"{precision}_k{k}"
    train(tiny_config(*ARGS, "train.steps=4", f"train.precision={precision}", f"train.grad_accum={k}"), out, **quiet)
    return out


def weight_diff(a, b, name="model"):
    a, b = weights(a, name), weights(b, name)
    return torch.cat([(a[k] - b[k]).abs().flatten() for k in a])


@pytest.mark.slow
def test_accumulated_update_equals_the_whole_batch(tmp_path):
    """fp32: K = 1 and K = 4 train the same model up to float summation order, compared as tests/unit/test_ddp.py
    compares 2 processes with 1 (Adam divides by each gradient's magnitude, so the rare near-cancelling
    gradient sums differ more than the rest)."""
    one, four = run(tmp_path, 1), run(tmp_path, 4)
    for (s1, l1), (s4, l4) in zip(losses(one), losses(four), strict=True):
        assert s1 == s4 and l1 == pytest.approx(l4, abs=1e-5)
    for name in ("model", "ema"):
        diff = weight_diff(one, four, name)
        assert diff.max() < 5e-4 and (diff > 1e-5).float().mean() < 0.01, (name, diff.max())
    first = load_file(str(four / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert max((first[k] - weights(four)[k]).abs().max() for k in first) > 1e-3      # the weights moved


@pytest.mark.slow
def test_accumulating_in_bf16_differs_no_more_than_bf16_itself(tmp_path):
    """bf16 autocast rounds each micro-batch's weight gradient to bf16 before the fp32 sum, so K = 4 is
    not K = 1 up to fp32 rounding; it stays as close to K = 1 as bf16 is to fp32 (measured after 4
    steps: 1.6 % of the weights differ by > 1e-3 against 1.3 %, the largest difference 5.2e-3 against
    4.1e-3; the losses within 1e-5)."""
    ref, one, four = run(tmp_path, 1, "fp32"), run(tmp_path, 1, "bf16"), run(tmp_path, 4, "bf16")
    for (s1, l1), (s4, l4) in zip(losses(one), losses(four), strict=True):
        assert s1 == s4 and l1 == pytest.approx(l4, abs=1e-4)
    bf16, accum = weight_diff(ref, one), weight_diff(one, four)
    assert accum.max() < 2 * bf16.max() and accum.max() < 1e-2, (accum.max(), bf16.max())
    assert (accum > 1e-3).float().mean() < 2 * (bf16 > 1e-3).float().mean() + 1e-3


@pytest.mark.slow
def test_resume_with_accumulation_is_exact(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_config(*ARGS, "train.steps=4", "train.grad_accum=2"), straight, **quiet)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")
    train(tiny_config(*ARGS, "train.steps=4", "train.grad_accum=2"), resumed, resume=True, **quiet)
    assert losses(resumed) == losses(straight)
    for name in ("model", "ema"):
        a, b = weights(straight, name), weights(resumed, name)
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_accumulating_equal_one_process_on_the_whole_batch(tmp_path):
    """torchrun, 2 processes x 2 micro-batches of 2 rows against 1 process x 1 batch of 8."""
    from test_ddp import finish, torchrun

    job = torchrun(tmp_path / "ddp", "train.steps=4", "train.grad_accum=2")
    train(tiny_config(*ARGS, "train.steps=4"), tmp_path / "single", **quiet)
    finish(job)
    for name in ("model", "ema"):
        a, b = weights(tmp_path / "single", name), weights(tmp_path / "ddp", name)
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        assert diff.max() < 5e-4 and (diff > 1e-5).float().mean() < 0.01, (name, diff.max())
    for (s1, l1), (s2, l2) in zip(losses(tmp_path / "single"), losses(tmp_path / "ddp"), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5)


def test_micro_batches_split_each_ranks_rows():
    assert distributed.Dist().micro_batches(8, 4) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert distributed.Dist(rank=1, world=2).micro_batches(8, 2) == [slice(4, 6), slice(6, 8)]
    with pytest.raises(DiffloError, match=r"train.grad_accum=4 must be a divisor of the 2 images per process "
                                          r"\(train.batch_size=8 over 4 processes\)"):
        distributed.Dist(rank=0, world=4).micro_batches(8, 4)


def test_ddp_syncs_gradients_at_the_last_micro_batch_only():
    class Net:                                   # stands in for DistributedDataParallel
        def no_sync(self):
            return "no_sync"

    d = distributed.Dist(rank=0, world=2)
    assert d.grad_sync(Net(), sync=False) == "no_sync"
    assert d.grad_sync(Net(), sync=True) != "no_sync"
    assert distributed.Dist().grad_sync(Net(), sync=False) != "no_sync"      # one process: nothing to sync


def test_k_that_does_not_divide_the_batch_is_one_error_line(tmp_path):
    with pytest.raises(ConfigError, match=r"train.grad_accum=3 must be a divisor of train.batch_size=8"):
        tiny_config("train.grad_accum=3").validate()
    with pytest.raises(ConfigError, match=r"train.grad_accum=0 must be > 0"):
        tiny_config("train.grad_accum=0").validate()
    code, out, err = run_cli("train", "train.batch_size=8", "train.grad_accum=3", "--out", tmp_path / "run")
    assert_clean_error(code, err, "train.grad_accum=3 must be a divisor of train.batch_size=8")
    assert not (tmp_path / "run").exists()                 # refused before anything was written
