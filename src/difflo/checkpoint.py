"""Checkpoints: safetensors weights with the resolved config in their metadata, written atomically.

A run directory looks like::

    RUN/config.yaml                        the resolved config
    RUN/checkpoints/step_0000500/          one complete checkpoint (kept: the last few)
        model.safetensors                  raw weights   } metadata: format, version, step, config
        ema.safetensors                    EMA weights   }
        state.pt                           optimizer, step, RNG states (tensors and numbers only;
                                           loaded with torch.load(weights_only=True))
        manifest.json                      sha256 of each file above, written last

A checkpoint is written into ``checkpoints/.tmp-step_N`` and renamed into place, so a directory
named ``step_N`` is always complete; a kill during the write leaves only a ``.tmp-*`` directory,
which the next save removes. No code is pickled: weights + config rebuild the model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, safe_open

from . import __version__
from .errors import CheckpointError

FORMAT = "difflo"
FORMAT_VERSION = 1
WEIGHTS = ("model.safetensors", "ema.safetensors")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def weights_metadata(config: dict, step: int, kind: str) -> dict[str, str]:
    return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "difflo_version": __version__,
            "step": str(step), "weights": kind, "config": json.dumps(config)}


def save_checkpoint(run_dir: Path, step: int, config: dict, model_state: dict, ema_state: dict,
                    train_state: dict, keep: int = 2) -> Path:
    """Write RUN/checkpoints/step_N atomically; keep the newest `keep` checkpoints."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".tmp-step_{step:07d}"
    tmp.mkdir()
    for name, state in (("model.safetensors", model_state), ("ema.safetensors", ema_state)):
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / name), metadata=weights_metadata(config, step, name.split(".")[0]))
    torch.save(train_state, tmp / "state.pt")
    files = ("model.safetensors", "ema.safetensors", "state.pt")
    for name in files:
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    manifest = {"step": step, "sha256": {name: _sha256(tmp / name) for name in files}}
    with open(tmp / "manifest.json", "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():                       # re-saving the same step (e.g. after a resume)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / "manifest.json").exists())


def verify(ckpt_dir: Path) -> None:
    """Raise CheckpointError if a file of the checkpoint is missing or its checksum differs."""
    try:
        manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no readable manifest.json ({e})") from None
    for name, digest in manifest["sha256"].items():
        path = ckpt_dir / name
        if not path.is_file() or _sha256(path) != digest:
            raise CheckpointError(f"checkpoint file {path} is missing or corrupt (sha256 mismatch)")


def load_train_state(ckpt_dir: Path) -> dict:
    return torch.load(Path(ckpt_dir) / "state.pt", map_location="cpu", weights_only=True)


def resolve_weights(path: str | Path, ema: bool = True) -> Path:
    """A run directory, a checkpoint directory or a .safetensors file -> the weights file."""
    path = Path(path)
    name = WEIGHTS[1] if ema else WEIGHTS[0]
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found: give a run directory (e.g. runs/demo), "
                              f"a checkpoint directory or a .safetensors file")
    if (path / name).is_file():
        return path / name
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise CheckpointError(f"{path} holds no checkpoint (no checkpoints/step_*/{name}); "
                              f"train first with `difflo train --out {path}`")
    return ckpts[-1] / name


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(state_dict, config dict, metadata) of a difflo weights file, with clear errors."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors weights file ({e})") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a difflo checkpoint (no difflo config in "
                              f"its metadata)")
    version = int(meta.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer difflo (checkpoint format {version}, this difflo "
                              f"reads up to {FORMAT_VERSION}): upgrade difflo")
    return state, json.loads(meta["config"]), meta
