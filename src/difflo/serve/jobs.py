"""Jobs for ``difflo serve``: one worker thread runs them one at a time, in the order they came.

Each request gets a :class:`Job` with a random id; its progress, trajectory frames and result files
live on that object only, so two browsers never see each other's results. The model is used by the
worker thread alone (no lock needed). ``Job.cancel()`` sets a flag that the running work checks at
every sampler step (:meth:`Job.check`), which raises :class:`Cancelled` out of the sampling loop.
"""
from __future__ import annotations

import queue
import secrets
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import DiffloError


class Cancelled(Exception):
    """Raised inside the sampling loop when the job's cancel flag is set."""


class Busy(DiffloError):
    """Too many jobs waiting."""


@dataclass
class Job:
    kind: str                                   # "sample" or "edit"
    work: Callable[["Job"], dict]               # runs in the worker thread; returns the result dict
    dir: Path                                   # the job's own files (result PNG, npz, inputs)
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    status: str = "queued"                      # queued | running | done | error | cancelled
    done: int = 0                               # progress: network evaluations / sampler steps so far
    total: int = 1
    frames: list = field(default_factory=list)  # sample jobs: recorded trajectory steps
    result: dict | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    _cancel: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancel.set()

    def check(self) -> None:
        """Called from the sampling loop: stop here if the user cancelled."""
        if self._cancel.is_set():
            raise Cancelled()

    def step(self, n: int = 1) -> None:
        self.check()
        self.done = min(self.done + n, self.total)

    def to_json(self) -> dict:
        out = {"id": self.id, "kind": self.kind, "status": self.status, "done": self.done, "total": self.total,
               "frames": [{"i": f["i"], "t": f["t"]} for f in self.frames]}
        if self.error is not None:
            out["error"] = self.error
        if self.result is not None:
            out["result"] = {k: v for k, v in self.result.items() if not k.startswith("_")}
        return out


class JobQueue:
    """A FIFO of jobs with one worker thread; keeps the last ``keep`` jobs (and their files)."""

    def __init__(self, root: Path | None = None, max_waiting: int = 16, keep: int = 64):
        self.root = Path(root or tempfile.mkdtemp(prefix="difflo-serve-"))
        self.max_waiting, self.keep = max_waiting, keep
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.lock = threading.Lock()                   # guards self.jobs (HTTP threads + worker)
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.worker = threading.Thread(target=self._run, name="difflo-serve-worker", daemon=True)
        self.worker.start()

    def submit(self, kind: str, work: Callable[[Job], dict]) -> Job:
        with self.lock:
            waiting = sum(j.status == "queued" for j in self.jobs.values())
            if waiting >= self.max_waiting:
                raise Busy(f"{waiting} jobs are already waiting; try again when one has finished")
            job = Job(kind, work, self.root / "pending")
            job.dir = self.root / job.id
            job.dir.mkdir(parents=True)
            self.jobs[job.id] = job
            self._evict()
        self.queue.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def position(self, job: Job) -> int:
        """How many queued or running jobs are ahead of this one."""
        with self.lock:
            ahead = 0
            for j in self.jobs.values():
                if j is job:
                    return ahead
                ahead += j.status in ("queued", "running")
        return 0

    def _evict(self) -> None:
        finished = [j for j in self.jobs.values() if j.status in ("done", "error", "cancelled")]
        for j in finished[:max(0, len(self.jobs) - self.keep)]:
            del self.jobs[j.id]
            shutil.rmtree(j.dir, ignore_errors=True)

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if job._cancel.is_set():
                job.status = "cancelled"
                continue
            job.status = "running"
            try:
                job.result = job.work(job)
                job.done = job.total
                job.status = "done"
            except Cancelled:
                job.status = "cancelled"
            except DiffloError as e:
                job.error, job.status = str(e), "error"
            except Exception as e:                   # a bug: keep serving, show it, log the traceback
                traceback.print_exc(file=sys.stderr)
                job.error, job.status = f"internal error: {type(e).__name__}: {e}", "error"

    def close(self) -> None:
        for j in list(self.jobs.values()):
            j.cancel()
        self.queue.put(None)
        self.worker.join(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
