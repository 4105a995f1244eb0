"""Shared fixtures. The suite is hermetic: it runs as on a fresh machine whatever this one holds.

* **Cache**: ``XDG_CACHE_HOME`` points at a new temporary folder for the whole session (set here, before
  any test runs, so subprocesses inherit it too), so no test reads or writes the user's
  ``~/.cache/difflo`` (classifiers, decoded data, FID statistics, ``precision.json``); a test that needs
  a classifier or statistics builds a small one (``clf_file``, ``cached_classifier``).
* **Precision**: tests that compare numbers pin ``fp32`` (``TINY``); ``auto`` follows the machine, or
  ``DIFFLO_AUTO_PRECISION`` where CI forces it (``.ci/run`` runs the numerical tests both ways).
* **Layout**: the folders mirror the code's layers: ``unit/`` (numerical core and library), ``cli/``
  (the command line; ``cli/badinput/`` its bad inputs), ``web/`` (the web page, HTTP and browser),
  ``faults/`` (kills, signals, full disks), ``peer/`` (against diffusers and torch-fidelity).
  Tests that take 0.5 s or more are marked ``slow``: ``pytest -m "not slow"`` is a developer's loop
  (under a minute on 2 cores), ``.ci/run`` runs everything.
"""
import atexit
import contextlib
import io
import os
import re
import shutil
import tempfile

import pytest
import torch

CACHE = tempfile.mkdtemp(prefix="difflo-test-cache-")
os.environ["XDG_CACHE_HOME"] = CACHE
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)

from difflo import config as config_mod  # noqa: E402  (after the cache is pointed away from the home)

torch.set_num_threads(1)   # tiny models: one thread is as fast, and robust to a loaded machine

TINY = ["model.channels=8", "model.channel_mult=[1,2]", "model.attn_resolutions=[14]", "train.batch_size=8",
        "train.log_every=1", "train.sample_every=0", "train.warmup_steps=2",
        "train.precision=fp32", "sample.precision=fp32"]   # the same numbers on machines with and without bf16


ERROR_LINE = re.compile(r"^difflo( [\w-]+)*: error: \S")


# The numerical tests (peers, exact-Gaussian checks, equivalences): `.ci/run` runs them a second time with
# `precision: auto` forced to the other choice than the machine's (`pytest -m numerical`).
NUMERICAL = ("peer", "test_samplers_exact.py", "test_samplers.py", "test_samplers_grids.py", "test_diffusion.py",
             "test_flow.py", "test_inversion.py", "test_nll.py", "test_editing.py", "test_schedules.py",
             "test_precision.py", "test_edm.py", "test_guidance.py", "test_posthoc_ema.py")  # a folder or a file name


def pytest_configure(config):
    config.addinivalue_line("markers", "numerical: compares numbers; CI runs it with auto precision forced each way")
    config.addinivalue_line("markers", "slow: 0.5 s or more on 2 CPU cores; `pytest -m 'not slow'` is the quick loop")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in NUMERICAL or any(part in NUMERICAL for part in item.path.parent.parts):
            item.add_marker(pytest.mark.numerical)


def run_cli(*argv, capture=None) -> tuple[int, str, str]:
    """Run `difflo ARGV` in-process: (exit code, stdout, stderr); argparse's SystemExit is a code.
    ``capture``: a capfd fixture, for output written to the file descriptors (signal handlers)."""
    from difflo.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as redirect:
        if capture is None:
            redirect.enter_context(contextlib.redirect_stdout(out))
            redirect.enter_context(contextlib.redirect_stderr(err))
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    if capture is not None:
        return (code, *capture.readouterr())
    return code, out.getvalue(), err.getvalue()


def assert_clean_error(code, err: str, *needles: str) -> str:
    """The contract of every bad input: exit code 2, exactly one line on stderr of the form
    `difflo[ COMMAND]: error: ...`, no traceback, containing every needle; returns the line."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and ERROR_LINE.match(lines[0]), (code, err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def tiny_config(*overrides: str) -> config_mod.Config:
    """A config whose model trains in milliseconds per step (for tests)."""
    return config_mod.load(None, TINY + list(overrides))


@pytest.fixture(scope="session")
def clf_file(tmp_path_factory):
    """A (randomly initialised) classifier file for mnist10k's 28x28x1 digits."""
    from difflo.eval.classifier import Classifier, save_classifier
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clf") / "clf.safetensors"
    save_classifier(Classifier(1, 10).eval(), path, {"kind": "difflo-classifier", "data": "mnist10k",
                                                     "in_channels": 1, "num_classes": 10, "image_size": 28})
    return path


@pytest.fixture
def cached_classifier(clf_file):
    """``clf_file`` placed where difflo looks for mnist10k's classifier by default (the session's temporary
    cache), for commands run without ``--classifier``; removed afterwards."""
    from difflo.eval.classifier import default_classifier_path
    path = default_classifier_path("mnist10k")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(clf_file, path)
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run directory with a 4-step tiny model (two checkpoints)."""
    from difflo.train import train

    run = tmp_path_factory.mktemp("tiny_run")
    train(tiny_config("train.steps=4", "train.ckpt_every=2"), run, log=lambda *a: None)
    return run
