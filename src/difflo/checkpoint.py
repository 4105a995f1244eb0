"""Checkpoints: safetensors weights with the resolved config in their metadata, written atomically.

A run directory looks like::

    RUN/config.yaml                        the resolved config
    RUN/checkpoints/step_0000500/          one complete checkpoint (kept: the last few)
        model.safetensors                  raw weights   } metadata: format, version, step, config
        ema.safetensors                    EMA weights   }
        state.pt                           optimizer, step, RNG states (tensors and numbers only;
                                           loaded with torch.load(weights_only=True))
        manifest.json                      sha256 of each file above, written last

A checkpoint is written into ``checkpoints/.tmp-step_N`` and renamed into place (``io.atomic_dir``), so a directory
named ``step_N`` is always complete; a kill during the write leaves only a ``.tmp-*`` directory,
which the next save removes. Replacing or deleting a checkpoint first renames it to ``.tmp-*`` too.
A failed write (disk full) removes the partial ``.tmp-*`` directory and raises CheckpointError.
No code is pickled: weights + config rebuild the model.

``--ckpt`` has one grammar everywhere (:func:`resolve_weights`): a run directory (its newest
checkpoint), its ``checkpoints/`` folder (the newest there), a step folder, a ``.safetensors`` file,
a diffusers model folder (read by :mod:`difflo.pretrained`), or ``demo``: the checkpoint packaged in
``difflo/assets/demo/`` (a folder named demo in the working directory is ``./demo``).

Test hook: with ``DIFFLO_FAULT_SLEEP_IN_SAVE=SECONDS`` in the environment, every save sleeps that
long after each file it writes (before the rename), to widen the window in which
tests/faults/ kill a run in the middle of a checkpoint write. Never set it otherwise.
"""
from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, safe_open

from . import __version__
from .errors import CheckpointError
from .io import atomic_dir, discard_dir, file_digest, fsync_dir

FORMAT = "difflo"
FORMAT_VERSION = 1
WEIGHTS = ("model.safetensors", "ema.safetensors")
DEMO = "demo"                             # --ckpt demo: the checkpoint packaged in difflo/assets/demo/
# Names that only a diffusers model folder has (a pipeline save, or a bare UNet2DModel folder).
DIFFUSERS_MARKERS = ("model_index.json", "config.json", "scheduler_config.json", "unet", "scheduler", "vae",
                     "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def sha256_file(path: str | Path) -> str:
    """The sha256 (hex) of a file, read in 1 MiB chunks."""
    return file_digest(path, "sha256").hexdigest()


def weights_metadata(config: dict, step: int, kind: str) -> dict[str, str]:
    return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "difflo_version": __version__,
            "step": str(step), "weights": kind, "config": json.dumps(config)}


def _fault_sleep() -> None:
    """The test-only DIFFLO_FAULT_SLEEP_IN_SAVE hook (see the module docstring)."""
    seconds = os.environ.get("DIFFLO_FAULT_SLEEP_IN_SAVE")
    if seconds:
        time.sleep(float(seconds))


def save_checkpoint(run_dir: Path, step: int, config: dict, model_state: dict, ema_state: dict,
                    train_state: dict, keep: int = 2) -> Path:
    """Write RUN/checkpoints/step_N atomically; keep the newest `keep` checkpoints."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = ckpt_root / f"step_{step:07d}"
    try:
        with atomic_dir(final) as tmp:           # .tmp-step_N; replaces a re-saved step (after falling back)
            for name, state in (("model.safetensors", model_state), ("ema.safetensors", ema_state)):
                tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
                save_file(tensors, str(tmp / name), metadata=weights_metadata(config, step, name.split(".")[0]))
                _fault_sleep()
            torch.save(train_state, tmp / "state.pt")
            _fault_sleep()
            files = ("model.safetensors", "ema.safetensors", "state.pt")
            for name in files:
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
            manifest = {"step": step, "sha256": {name: sha256_file(tmp / name) for name in files}}
            with open(tmp / "manifest.json", "w") as f:
                json.dump(manifest, f)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            _fault_sleep()
    except (OSError, SafetensorError, RuntimeError) as e:     # disk full, quota, I/O error (torch.save: RuntimeError)
        previous = list_checkpoints(run_dir)                  # atomic_dir removed the partial directory
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        why = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise CheckpointError(f"could not write checkpoint {final} ({why}); the partial write was removed and "
                              f"{kept}: free disk space, then continue with --resume") from None
    for old in list_checkpoints(run_dir)[:-keep]:
        discard_dir(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    return checkpoints_in(Path(run_dir) / "checkpoints")


def checkpoints_in(root: Path) -> list[Path]:
    """Complete checkpoint directories (``step_*`` with a manifest) directly in ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / "manifest.json").exists())


def verify(ckpt_dir: Path) -> None:
    """Raise CheckpointError if a file of the checkpoint is missing or its checksum differs."""
    try:
        manifest = json.loads((ckpt_dir / "manifest.json").read_text())
        digests = dict(manifest["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no readable manifest.json ({e})") from None
    for name, digest in digests.items():
        path = ckpt_dir / name
        if not path.is_file() or sha256_file(path) != digest:
            raise CheckpointError(f"checkpoint file {path} is missing or corrupt (sha256 mismatch)")


def verify_file(path: Path) -> None:
    """Check one file against the manifest.json beside it, if it has one (a bare .safetensors has none)."""
    path = Path(path)
    manifest = path.parent / "manifest.json"
    if not manifest.is_file():
        return
    try:
        digest = json.loads(manifest.read_text())["sha256"][path.name]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path.parent} has an unreadable manifest.json ({e})") from None
    if sha256_file(path) != digest:
        raise CheckpointError(f"checkpoint file {path} is corrupt (its sha256 differs from {manifest}); "
                              f"use an earlier checkpoint directory of the run")


def latest_intact(ckpts: list[Path], log=print) -> Path:
    """The newest checkpoint that passes verify(); says so for each corrupt one it skips."""
    problems = []
    for ckpt in reversed(ckpts):
        try:
            verify(ckpt)
        except CheckpointError as e:
            problems.append(str(e))
            log(f"warning: {e}; falling back to the previous checkpoint")
            continue
        if problems:
            log(f"warning: resuming from {ckpt.name}, the newest intact checkpoint")
        return ckpt
    raise CheckpointError(f"no intact checkpoint to resume from ({'; '.join(problems)}); "
                          f"start a new run with another --out")


def load_train_state(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / "state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                   # torch raises RuntimeError / UnpicklingError / EOFError ...
        raise CheckpointError(f"{path} is not a readable difflo training state ({type(e).__name__})") from None


def is_diffusers_folder(path: Path) -> bool:
    """Whether ``path`` is a folder laid out by diffusers (difflo.pretrained reads it)."""
    path = Path(path)
    return path.is_dir() and any((path / m).exists() for m in DIFFUSERS_MARKERS)


def demo_checkpoint() -> Path:
    """The checkpoint directory packaged with difflo (``difflo/assets/demo/``), if this install has it."""
    path = Path(str(importlib.resources.files("difflo").joinpath("assets", "demo")))
    if not (path.is_dir() and any(path.iterdir())):
        here = "; a folder named demo in this directory is --ckpt ./demo" if Path(DEMO).exists() else ""
        raise CheckpointError(f"the demo checkpoint is not in this install (no {path}): train one with "
                              f"`difflo demo` and use --ckpt runs/demo/run{here}")
    return path


def resolve_weights(path: str | Path, ema: bool = True) -> Path:
    """``--ckpt`` -> what to load: the weights file of a run directory (its newest checkpoint), of its
    ``checkpoints/`` folder (the newest there), of a checkpoint directory or ``demo``; a .safetensors
    file itself; a diffusers model folder itself (its weights file too gives the folder)."""
    if str(path) == DEMO:
        path = demo_checkpoint()
    path = Path(path)
    name = WEIGHTS[1] if ema else WEIGHTS[0]
    if path.is_dir() and (path / "difflo").is_dir() and not (path / "unet").exists() \
            and not (path / "config.json").exists():
        path = path / "difflo"                    # `difflo export`'s own layout (a net UNet2DModel cannot express)
    if path.is_file():
        if path.name.startswith("diffusion_pytorch_model.") and is_diffusers_folder(path.parent):
            return path.parent
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found: give a run directory (e.g. runs/demo/run), its "
                              f"checkpoints/ folder, a checkpoint directory, a .safetensors file, a diffusers "
                              f"model folder or demo")
    if (path / name).is_file():
        return path / name
    other = WEIGHTS[0] if ema else WEIGHTS[1]
    if (path / other).is_file():
        use = "the raw weights: add --no-ema" if ema else "the EMA weights: drop --no-ema"
        raise CheckpointError(f"{path} has {other} but no {name}; use {use}")
    ckpts = checkpoints_in(path) or list_checkpoints(path)
    if ckpts:
        return ckpts[-1] / name
    if is_diffusers_folder(path):
        return path
    run = path.parent if path.name == "checkpoints" else path
    raise CheckpointError(f"{path} holds no checkpoint (no checkpoints/step_*/{name}); "
                          f"train first with `difflo train --out {run}`")


def read_safetensors(path: str | Path, what: str = "weights file") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors file; a one-line CheckpointError naming it if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors {what} ({e})") from None


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(state_dict, config dict, metadata) of a difflo weights file, with clear errors."""
    path = Path(path)
    state, meta = read_safetensors(path)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a difflo checkpoint (no difflo config in "
                              f"its metadata)")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise CheckpointError(f"{path} has no valid checkpoint format_version in its metadata "
                              f"(got {meta.get('format_version')!r}); it was not written by difflo") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer difflo (checkpoint format {version}, this difflo "
                              f"reads up to {FORMAT_VERSION}): upgrade difflo")
    if version < 1:
        raise CheckpointError(f"{path} has checkpoint format {version}, which no difflo writes (this difflo "
                              f"reads 1..{FORMAT_VERSION})")
    try:
        config = json.loads(meta["config"])
    except ValueError:
        raise CheckpointError(f"{path}: the config in its metadata is not valid JSON") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the config in its metadata is not a mapping")
    return state, config, meta
