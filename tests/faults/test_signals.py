"""SIGINT / SIGTERM during training: a checkpoint, a message with the exact resume command, exit 130 / 143."""
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difflo.diffusion import DiscreteSchedule
from difflo import checkpoint, guards
from difflo.cli import demo as demo_cli
from conftest import TINY, run_cli
import forkserver
from forkserver import alive, done_steps, wait_for

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")



def signal_at_step(monkeypatch, k: int, signum: int) -> None:
    """The process sends itself `signum` while computing step k (0-based)."""
    real = DiscreteSchedule.training_loss              # the tiny config's path (difflo.noise_paths)
    calls = []

    def loss(self, *a, **kw):
        calls.append(1)
        if len(calls) == k + 1:
            os.kill(os.getpid(), signum)
        return real(self, *a, **kw)

    monkeypatch.setattr(DiscreteSchedule, "training_loss", loss)


@pytest.mark.slow
def test_sigint_writes_a_checkpoint_and_prints_the_resume_command(tmp_path, capfd, monkeypatch):
    run = tmp_path / "run"
    args = [*TINY, "train.steps=8", "train.ckpt_every=4"]
    signal_at_step(monkeypatch, 2, signal.SIGINT)
    before = signal.getsignal(signal.SIGINT)
    code, out, err = run_cli("train", *args, "--out", run, capture=capfd)
    assert code == 130
    assert signal.getsignal(signal.SIGINT) is before                  # the handler is only there while training
    assert [c.name for c in checkpoint.list_checkpoints(run)] == ["step_0000003"]    # the step in flight finished
    checkpoint.verify(checkpoint.list_checkpoints(run)[0])
    assert "SIGINT received" in err and "stopped by SIGINT; checkpoint " in err and "Traceback" not in err
    command = err.split("resume with: ")[1].strip()
    assert command == shlex.join(["difflo", "train", *args, "--out", str(run), "--resume"])
    monkeypatch.undo()
    code, out, err = run_cli(*shlex.split(command)[1:])         # the printed command works as given
    assert code == 0, err
    assert "resuming" in out and "from step 3" in out
    assert [c.name for c in checkpoint.list_checkpoints(run)] == ["step_0000004", "step_0000008"]


def test_demo_prints_its_own_resume_command(tmp_path, capfd, monkeypatch):
    def fake_train(cfg, run_dir, resume=False, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        assert guards.stop_requested()
        return None

    monkeypatch.setattr(demo_cli, "train", fake_train)
    code, out, err = run_cli("demo", "--out", tmp_path / "demo", "--minutes", "0.5")
    assert code == 143
    assert f"resume with: difflo demo --out {tmp_path / 'demo'} --minutes 0.5 --resume" in err
    assert "no checkpoint was written yet" in err


def test_signal_outside_training_is_untouched():
    assert not guards.stop_requested()
    with guards.graceful_stop() as stop:
        assert not guards.stop_requested()
    assert stop.signum is None and stop.exit_code == 0


@pytest.fixture
def server():
    return forkserver.shared()


@pytest.mark.slow
def test_second_sigint_interrupts_a_checkpoint_write_and_leaves_nothing_half_written(server, tmp_path):
    """First SIGINT: finish the step, start the checkpoint; second SIGINT inside that write: quit at
    once (exit 130) and remove the partial .tmp directory; earlier checkpoints stay intact."""
    run = tmp_path / "run"
    log = tmp_path / "log"
    log.touch()
    pid = server.run(["train", *TINY, "train.steps=500", "train.ckpt_every=2", "--out", run], log,
                     env={"DIFFLO_FAULT_SLEEP_IN_SAVE": "0.3"})
    wait_for(lambda: done_steps(run) >= 3 or not alive(pid), "step 3")
    os.kill(pid, signal.SIGINT)
    ckpts = run / "checkpoints"
    wait_for(lambda: any(p.name.startswith(".tmp-step_") for p in ckpts.iterdir()) or not alive(pid),
             "the checkpoint write after SIGINT")
    os.kill(pid, signal.SIGINT)
    assert server.wait(pid) == 130
    text = log.read_text()
    assert "SIGINT received" in text and "difflo: interrupted" in text and "Traceback" not in text
    assert not list(ckpts.glob(".tmp-*"))
    assert [c.name for c in checkpoint.list_checkpoints(run)] == ["step_0000002"]
    checkpoint.verify(checkpoint.list_checkpoints(run)[0])


@pytest.mark.slow
def test_sigterm_to_a_real_difflo_process(tmp_path):
    """`python -m difflo train` as a user starts it: SIGTERM -> checkpoint, resume hint, exit 143."""
    run = tmp_path / "run"
    src = str(Path(__file__).parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    args = [*TINY, "train.steps=500", "train.ckpt_every=100"]
    proc = subprocess.Popen([sys.executable, "-m", "difflo", "train", *args, "--out", str(run)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: done_steps(run) >= 2 or proc.poll() is not None, "step 2", timeout=120)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    ckpts = checkpoint.list_checkpoints(run)
    assert len(ckpts) == 1 and int(ckpts[0].name.split("_")[1]) >= 2
    checkpoint.verify(ckpts[0])
    assert f"stopped by SIGTERM; checkpoint {ckpts[0]}" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].strip() == "resume with: " + shlex.join(
        ["difflo", "train", *args, "--out", str(run), "--resume"])


@pytest.mark.slow
def test_experiment_stopped_in_training_resumes_its_model_exactly(tmp_path, capfd, monkeypatch, clf_file):
    """`difflo experiment`: a signal during a model's training writes its checkpoint and EMA copies and exits
    143 without scoring the half-trained model; the same command continues it to the weights an
    uninterrupted run reaches."""
    from safetensors.torch import load_file
    sets = [a for o in TINY for a in ("--set", o)]

    def args(runs, out):
        return ["experiment", "guidance", "--out", out, *sets, "--set", f"eval.classifier={clf_file}",
                "--set", "eval.ref_n=20", "--set", "train.ckpt_every=4", "--runs", runs, "--train-steps", "6",
                "--snapshots", "1", "--n", "10", "--eval-steps", "2", "--ws", "0,3", "--device", "cpu"]

    signal_at_step(monkeypatch, 2, signal.SIGTERM)
    code, out, err = run_cli(*args(tmp_path / "runs", tmp_path / "out"), capture=capfd)
    assert code == 143, err
    assert "stopped by SIGTERM; checkpoint " in err and "Traceback" not in err
    assert not (tmp_path / "out" / "report.md").exists()                    # nothing scored half-trained
    run = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert [c.name for c in checkpoint.list_checkpoints(run)] == ["step_0000003"]
    assert (run / "ema_tracks" / "step_0000003.safetensors").is_file()      # the copies continue from here
    monkeypatch.undo()
    code, out, err = run_cli(*args(tmp_path / "runs", tmp_path / "out"), capture=capfd)
    assert code == 0, err
    assert (tmp_path / "out" / "report.md").is_file()
    code, out, err = run_cli(*args(tmp_path / "once", tmp_path / "out-once"), capture=capfd)
    assert code == 0, err
    once = next(p for p in (tmp_path / "once").iterdir() if p.is_dir())
    last = checkpoint.list_checkpoints(run)[-1]
    assert last.name == checkpoint.list_checkpoints(once)[-1].name == "step_0000006"
    files = [f"ema_tracks/{last.name}.safetensors"] + sorted(str(p.relative_to(run)) for p in last.iterdir()
                                                             if p.suffix == ".safetensors")
    for rel in files:                                   # the EMA copies and every weight file of the checkpoint
        x, y = load_file(run / rel), load_file(once / rel)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), rel
