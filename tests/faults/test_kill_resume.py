"""kill -9 at random moments of a training run, 20 times in a row, with --resume after each.

Each cycle starts ``difflo train ... --resume`` as a real process (forked from tests/faults/
forkserver.py), waits for a random moment -- a few steps in, or inside a checkpoint write, which
DIFFLO_FAULT_SLEEP_IN_SAVE widens -- and sends SIGKILL. After every kill: each checkpoint on disk
passes its checksums and loads; the work lost since the last complete checkpoint is at most one
checkpoint interval; the next restart says it resumes from exactly that checkpoint. At the end
the run, resumed to completion, has the weights and the per-step losses of an uninterrupted run.
"""
import csv
import os
import random
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from difflo import checkpoint
from conftest import TINY
import forkserver
from forkserver import alive, done_steps, resumed_from, stat_or_none, wait_for

KILLS = 20
CKPT_EVERY = 2
STEPS = 40
SAVE_SLEEP = 0.04            # DIFFLO_FAULT_SLEEP_IN_SAVE: after each of the 4 files of a checkpoint
ARGS = TINY + ["model.attn_resolutions=[]", "train.batch_size=4", f"train.steps={STEPS}",
               f"train.ckpt_every={CKPT_EVERY}", "train.keep_checkpoints=2"]


@pytest.fixture
def server():
    return forkserver.shared()


def ckpt_step(ckpt) -> int:
    return int(ckpt.name.split("_")[1]) if ckpt else 0


def check_every_checkpoint(run) -> int:
    """Every checkpoint directory on disk is complete and loads; returns the newest one's step."""
    ckpts = checkpoint.list_checkpoints(run)
    for c in ckpts:
        checkpoint.verify(c)
        for name in ("model.safetensors", "ema.safetensors"):
            state, _, meta = checkpoint.load_weights(c / name)
            assert int(meta["step"]) == ckpt_step(c) and state
        assert int(checkpoint.load_train_state(c)["step"]) == ckpt_step(c)
    leftovers = [p.name for p in (run / "checkpoints").glob("step_*") if p not in ckpts] \
        if (run / "checkpoints").is_dir() else []
    assert not leftovers, f"incomplete checkpoint directories visible under a final name: {leftovers}"
    return ckpt_step(ckpts[-1]) if ckpts else 0


def writing_since(run, t0_ns) -> bool:
    """Whether a checkpoint write begun after t0 is in progress (its .tmp directory exists)."""
    root = run / "checkpoints"
    return root.is_dir() and any(p.name.startswith(".tmp-step_") and p.stat().st_mtime_ns >= t0_ns
                                 for p in root.iterdir())


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork") or not os.path.isdir("/proc"), reason="needs fork and /proc (Linux)")
def test_kill_9_twenty_times_then_resume_equals_uninterrupted(server, tmp_path):
    rng = random.Random(9)
    run, ref = tmp_path / "run", tmp_path / "reference"
    argv = ["train", *ARGS, "--out", run, "--resume"]
    ref_pid = server.run(["train", *ARGS, f"train.ckpt_every={STEPS}", "--out", ref], tmp_path / "reference.log")
    env = {"DIFFLO_FAULT_SLEEP_IN_SAVE": str(SAVE_SLEEP)}
    in_step, in_write, lost = 0, 0, []
    expect_resume = None
    for i in range(KILLS):
        log = tmp_path / f"cycle{i:02d}.log"
        log.touch()
        start = check_every_checkpoint(run) if run.exists() else 0
        near_end = start + 3 * CKPT_EVERY >= STEPS        # then only kill inside the first write: no progress
        mode = "save" if near_end else rng.choice(["step", "save"])
        target = start + (rng.randint(1, CKPT_EVERY + 1) if mode == "step" else
                          (1 if near_end else rng.randint(1, 2)) * CKPT_EVERY)
        tmp = run / "checkpoints" / f".tmp-step_{target:07d}"
        stale = stat_or_none(tmp)                    # a .tmp left by an earlier kill (the next save removes it)
        t0_ns = time.time_ns()
        pid = server.run(argv, log, env)
        # the loop starts once the run has resumed (and cut metrics.csv back to its checkpoint)
        wait_for(lambda: "training " in log.read_text() or not alive(pid), "the training loop")
        wait_for(lambda: done_steps(run) >= target or not alive(pid), f"step {target}")
        if mode == "step":                           # a random moment a few steps after the restart
            time.sleep(rng.uniform(0, 0.08))
        else:                                        # inside the 1st or 2nd checkpoint write after the restart
            wait_for(lambda: stat_or_none(tmp) not in (None, stale) or not alive(pid), f"checkpoint {target}")
            time.sleep(rng.uniform(0, 4 * SAVE_SLEEP))
        assert alive(pid), f"cycle {i}: the run ended before the kill:\n{log.read_text()}"
        os.kill(pid, signal.SIGKILL)
        assert server.wait(pid) == -signal.SIGKILL
        if writing_since(run, t0_ns):
            in_write += 1
        else:
            in_step += 1
        if expect_resume is not None:                # it resumed from the last complete checkpoint
            assert resumed_from(log) == expect_resume, log.read_text()
        latest = check_every_checkpoint(run)         # every checkpoint on disk is complete and loads
        lost.append(done_steps(run) - latest)
        assert lost[-1] <= CKPT_EVERY, f"cycle {i}: steps done {done_steps(run)}, last checkpoint {latest}"
        expect_resume = latest if latest else None

    log = tmp_path / "final.log"
    pid = server.run(argv, log)
    assert server.wait(pid) == 0, log.read_text()
    assert resumed_from(log) == expect_resume, log.read_text()
    assert check_every_checkpoint(run) == STEPS
    assert not list((run / "checkpoints").glob(".tmp-*"))        # the saves removed what the kills left
    assert in_step + in_write == KILLS >= 20 and in_write >= 3
    print(f"\nkill -9: {KILLS} kills survived ({in_step} during training steps, {in_write} inside a checkpoint "
          f"write); steps lost per kill {lost} (checkpoint interval {CKPT_EVERY})")

    assert server.wait(ref_pid) == 0, (tmp_path / "reference.log").read_text()
    final, expected = checkpoint.list_checkpoints(run)[-1], checkpoint.list_checkpoints(ref)[-1]
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(final / name)), load_file(str(expected / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    with open(run / "metrics.csv") as f, open(ref / "metrics.csv") as g:
        got = [(r["step"], r["loss"]) for r in csv.DictReader(f)]
        want = [(r["step"], r["loss"]) for r in csv.DictReader(g)]
    assert got == want                              # one row per step, each loss as uninterrupted
