"""Run `difflo ...` commands as real child processes, cheaply: import torch once, then fork per command.

A fresh ``python -m difflo train`` spends seconds importing torch before its first step (about 5 s
on the loaded 2-core CI machine), so 20+ kill/resume cycles would take minutes. This server
imports difflo, torch and matplotlib once and forks one child per command; each child runs
``difflo.cli.main(argv)`` (the console script's code path, signal handling included) in its own
process, with stdout and stderr in a log file, and exits with main's code. Tests kill children with
real signals (``os.kill(pid, SIGKILL)``); ``tests/faults/test_signals.py`` also runs one genuine
``python -m difflo train`` subprocess.

Protocol, one JSON object per line: ``{"run": ARGV, "log": PATH, "env": {...}}`` -> ``{"pid": N}``;
``{"wait": N, "timeout": S}`` -> ``{"code": C}`` (exit code, or -signal; null on timeout).
"""
from __future__ import annotations

import atexit
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path


def _serve() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (loss.png is drawn at every checkpoint)
    import torch
    import torch._dynamo  # noqa: F401  (torch.optim imports it lazily: ~3 s)
    torch.set_num_threads(1)
    from difflo import cli, train  # noqa: F401
    _warm_matplotlib()

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if "run" in req:
            pid = os.fork()
            if pid == 0:
                _child(cli, req)
            print(json.dumps({"pid": pid}), flush=True)
        elif "wait" in req:
            deadline = time.monotonic() + req.get("timeout", 120)
            code = None
            while time.monotonic() < deadline:
                done, status = os.waitpid(req["wait"], os.WNOHANG)
                if done:
                    code = os.waitstatus_to_exitcode(status)
                    break
                time.sleep(0.005)
            print(json.dumps({"code": code}), flush=True)


def _warm_matplotlib() -> None:
    """Draw one loss plot, so that children inherit loaded fonts (no torch op runs before a fork)."""
    import tempfile

    from difflo.images import plot_loss

    with tempfile.TemporaryDirectory() as d:
        csv = Path(d) / "metrics.csv"
        csv.write_text("step,loss,lr,images_per_s,elapsed_s\n1,0.5,0.1,1,1\n2,0.4,0.1,1,1\n")
        plot_loss(csv, Path(d) / "loss.png")


def _child(cli, req) -> None:
    code = 1
    try:
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.update(req.get("env", {}))
        sys.stdout.reconfigure(line_buffering=True)      # the log says what happened up to the kill
        try:
            code = cli.main(req["run"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


class ForkServer:
    """The test side: start the server, run commands, kill and wait for them."""

    def __init__(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2] / "src"),
                                                                         os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        assert self._read().get("ready"), "fork server failed to start"

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died (exit code {self.proc.poll()})")
        return json.loads(line)

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self, argv: list[str], log: Path, env: dict | None = None) -> int:
        return self._ask({"run": [str(a) for a in argv], "log": str(log), "env": env or {}})["pid"]

    def wait(self, pid: int, timeout: float = 120) -> int | None:
        return self._ask({"wait": pid, "timeout": timeout})["code"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.kill()                   # its children have all been waited for; skip torch's teardown
        self.proc.wait(timeout=30)


_shared: ForkServer | None = None


def shared() -> ForkServer:
    """One server for the whole test session (starting one costs a torch import)."""
    global _shared
    if _shared is None:
        _shared = ForkServer()
        atexit.register(_shared.close)
    return _shared


# ----------------------------------------------------------------------------- watching a run
def done_steps(run) -> int:
    """The last step whose metrics row was written completely (log_every=1)."""
    try:
        with open(run / "metrics.csv") as f:
            rows = list(csv.reader(f))[1:]
    except FileNotFoundError:
        return 0
    from difflo.train import METRICS_FIELDS
    width = len(METRICS_FIELDS)
    steps = [int(r[0]) for r in rows if len(r) == width and r[0].isdigit() and r[1]]   # complete loss rows
    return max(steps, default=0)


def wait_for(cond, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.003)


def stat_or_none(path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:               # a zombie has exited already
        return f.read().split(")")[-1].split()[0] != "Z"


def resumed_from(log) -> int | None:
    m = re.search(r"resuming .* from step (\d+)", log.read_text())
    return int(m.group(1)) if m else None


if __name__ == "__main__":
    _serve()
