"""Data-parallel training through torchrun: 2 CPU processes (gloo) compute what one process computes on
the combined batch, and a resumed 2-process run continues exactly."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflo import distributed
from difflo.errors import DiffloError
from difflo.train import train
from conftest import TINY, tiny_config

SRC = Path(__file__).resolve().parents[2] / "src"
ARGS = TINY + ["train.ckpt_every=2", "train.device=cpu", "train.label_dropout=0.5"]


def torchrun(out: Path, *overrides: str, resume: bool = False) -> subprocess.Popen:
    """`torchrun --nproc_per_node 2 -m difflo train ...` with the tiny config (gloo on CPU)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "difflo", "train", *ARGS, *overrides, "--out", str(out)] + (["--resume"] if resume else [])
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def weights(run: Path, step: int, name: str = "model") -> dict:
    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / f"{name}.safetensors"))


def losses(run: Path) -> list[tuple[int, float]]:
    with open(run / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_two_processes_equal_one_on_the_combined_batch_and_resume_exactly(tmp_path):
    single, straight, resumed = tmp_path / "single", tmp_path / "straight", tmp_path / "resumed"
    job = torchrun(straight, "train.steps=4")                     # 2 processes x 4 rows, checkpoints at 2 and 4
    train(tiny_config(*ARGS[len(TINY):], "train.steps=4"), single, log=lambda *a: None, progress=False)  # 1 x 8
    out = finish(job)
    assert "data-parallel over 2 processes (gloo), 4 of the 8 images per step each" in out
    assert out.count("done: checkpoint") == 1                                                    # rank 0 only

    # The same data, noise, timesteps and label dropout per row, DDP averaging the gradients: equal up to
    # float summation order. Adam divides each gradient by its own magnitude, so the rare near-cancelling
    # gradient sums (biases behind zero-initialised layers) differ more: measured worst 2.4e-4 after 4 steps
    # (one step moves a weight by up to lr = 2e-3), while > 99.9 % of the elements agree within 1e-5.
    for step in (2, 4):
        for name in ("model", "ema"):
            a, b = weights(single, step, name), weights(straight, step, name)
            assert a.keys() == b.keys()
            diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
            assert diff.max() < 5e-4 and (diff > 1e-5).float().mean() < 0.01, (step, name, diff.max())
    for (s1, l1), (s2, l2) in zip(losses(single), losses(straight), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5)
    first = weights(single, 2)                                    # the weights moved in between
    assert max((first[k] - weights(single, 4)[k]).abs().max() for k in first) > 1e-3

    # Resume the 2-process run from its step-2 checkpoint: it continues exactly, bit for bit.
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")
    finish(torchrun(resumed, "train.steps=4", resume=True))
    for name in ("model", "ema"):
        a, b = weights(straight, 4, name), weights(resumed, 4, name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(resumed) == losses(straight)


def test_single_process_without_torchrun_env(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    d = distributed.setup(torch.device("cpu"))
    assert (d.rank, d.world, d.main, d.active) == (0, 1, True, False)
    assert d.rows(8) == slice(0, 8)
    net = torch.nn.Linear(2, 2)
    assert d.wrap(net) is net
    x = torch.ones(3)
    assert d.mean(x) is x and d.any(True) and not d.any(False)


def test_rows_split_the_global_batch():
    parts = [distributed.Dist(rank=r, world=4).rows(8) for r in range(4)]
    assert [list(range(8))[p] for p in parts] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(DiffloError, match="not divisible by the 3 processes"):
        distributed.Dist(rank=0, world=3).rows(8)


def test_rows_loss_is_the_full_batch_loss_restricted():
    """training_loss over rows draws the noise for the whole batch: the mean of the row-halves' losses
    is the full batch's loss."""
    from difflo.diffusion import DiscreteSchedule, training_loss
    from difflo.nn import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig(channels=8, channel_mult=(1, 2), attn_resolutions=(), num_classes=3))
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x0, y = torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 0, 1, 3])
    sched = DiscreteSchedule.from_name("cosine", 100)

    def loss(rows):
        return training_loss(net, x0, y, sched, "v", "min_snr", generator=torch.Generator().manual_seed(3), rows=rows)

    full = loss(slice(None))
    halves = [loss(slice(0, 3)), loss(slice(3, 6))]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, full)
    assert not torch.allclose(halves[0], halves[1])
