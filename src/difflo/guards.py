"""What a training run does when something goes wrong: signals, non-finite numbers, a full disk.

The training loop calls three small hooks from here (tests/faults/ exercises each):

- ``stop_requested()``: True once SIGINT/SIGTERM arrived inside ``graceful_stop()`` (which the CLI
  wraps around ``train``). The loop then leaves after the current step and writes its checkpoint;
  the CLI prints how to resume and exits with 128 + the signal number (130 SIGINT, 143 SIGTERM).
  A second signal interrupts at once (KeyboardInterrupt: no checkpoint, nothing half-written).
  Outside ``graceful_stop()`` (tests, ``difflo study``) signals keep their default behaviour.
  Code that trains and then goes on (``difflo experiment``: evaluation after training) raises
  ``Stopped`` after the stopped run's checkpoint, so nothing scores a half-trained model; its CLI
  catches it, prints how to resume and exits the same way.
- ``NonFiniteGuard.check(step, loss, net)``: False when the loss or a gradient is NaN/inf; the loop
  then skips the optimizer and EMA update of that step. Each skipped step is logged with a count;
  ``train.max_nonfinite_steps`` in a row stop the run with a message naming the step, the last
  good checkpoint and the likely causes.
- ``check_free_space(run_dir, n_params, keep, snapshot_bytes)``: before training, refuse to start when the disk
  cannot hold the run's checkpoints (estimated from the parameter count).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import list_checkpoints
from .errors import DiffloError

SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


class TrainingDiverged(DiffloError):
    """Too many non-finite steps in a row."""


# ----------------------------------------------------------------------------- SIGINT / SIGTERM
@dataclass
class StopRequest:
    signum: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum else 0


class Stopped(Exception):
    """A signal stopped training inside graceful_stop(); the run's checkpoint (or None) is written."""

    def __init__(self, ckpt: Path | None):
        super().__init__(f"stopped; checkpoint {ckpt}")
        self.ckpt = ckpt


_active: StopRequest | None = None


def stop_requested() -> bool:
    """Whether the training loop should stop after this step (a signal arrived in graceful_stop)."""
    return _active is not None and _active.signum is not None


@contextlib.contextmanager
def graceful_stop():
    """While active, the first SIGINT/SIGTERM asks the loop to stop after the current step; a second
    one raises KeyboardInterrupt. Yields the StopRequest (its ``signum`` says which signal came)."""
    global _active
    request = StopRequest()

    def handler(signum, frame):
        if request.signum is not None:
            raise KeyboardInterrupt
        request.signum = signum
        # os.write, not print: a handler may run while the main thread is inside a print
        os.write(2, f"\ndifflo: {signal.Signals(signum).name} received: finishing this step and writing a "
                    f"checkpoint (send it again to quit at once, without one)\n".encode())

    previous = {}
    try:
        for s in SIGNALS:
            previous[s] = signal.signal(s, handler)
    except ValueError:                   # not the main thread: leave signals alone
        pass
    outer, _active = _active, request
    try:
        yield request
    finally:
        _active = outer
        for s, h in previous.items():
            signal.signal(s, h)


def stop_message(request: StopRequest, ckpt: Path | None, resume_command: str) -> str:
    where = f"checkpoint {ckpt}" if ckpt else "no checkpoint was written yet"
    return f"difflo: stopped by {request.name}; {where}\n  resume with: {resume_command}"


# ----------------------------------------------------------------------------- NaN / inf
class NonFiniteGuard:
    """Counts steps with a non-finite loss or gradient; raises TrainingDiverged after `limit` in a row."""

    def __init__(self, limit: int, run_dir: Path, lr: float, log=print):
        self.limit, self.run_dir, self.lr, self.log = limit, Path(run_dir), lr, log
        self.in_row = 0
        self.total = 0

    def check(self, step: int, loss: torch.Tensor, net: torch.nn.Module) -> bool:
        """True if the loss and every gradient are finite (the step may update the weights)."""
        what = None
        if not bool(torch.isfinite(loss.detach()).all()):
            what = f"loss ({loss.item()})"
        else:
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                what = "gradients"
        if what is None:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        self.log(f"step {step + 1}: non-finite {what}; skipped the update ({self.in_row} in a row, "
                 f"{self.total} in this run)")
        if self.in_row >= self.limit:
            ckpts = list_checkpoints(self.run_dir)
            last = f"last good checkpoint {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"training stopped at step {step + 1}: {self.in_row} steps in a row had a non-finite {what}; "
                f"{last}. Likely causes: a learning rate too high (train.lr={self.lr:g}; try a 3-10x smaller one "
                f"or more train.warmup_steps), fp16/mixed-precision overflow (train in float32), or bad input "
                f"data; fix the config and continue with --resume")
        return False


# ----------------------------------------------------------------------------- disk space
def checkpoint_bytes(n_params: int) -> int:
    """Estimated size of one checkpoint: model + EMA weights (float32) + AdamW's two moments."""
    return 16 * n_params + (1 << 20)


def check_free_space(run_dir: Path, n_params: int, keep: int, snapshot_bytes: int = 0) -> None:
    """Refuse to start when the disk cannot hold `keep` checkpoints plus the one being written, plus the
    next post-hoc EMA snapshot (``snapshot_bytes``: they are all kept, so later ones are the user's to plan)."""
    run_dir = Path(run_dir)
    size = checkpoint_bytes(n_params)
    on_disk = len(list_checkpoints(run_dir))
    need = size * max(1, keep + 1 - on_disk) + snapshot_bytes
    free = shutil.disk_usage(run_dir).free
    if free < need:
        mb = 1 << 20
        snap = f", plus {snapshot_bytes / mb:.1f} MB for a post-hoc EMA snapshot" if snapshot_bytes else ""
        raise DiffloError(f"not enough free disk space in {run_dir}: {free / mb:.1f} MB free, but a checkpoint "
                          f"takes about {size / mb:.1f} MB and the run keeps up to {keep + 1} at once "
                          f"(train.keep_checkpoints={keep}, plus the one being written){snap}; free "
                          f"{(need - free) / mb:.1f} MB or choose another --out")
