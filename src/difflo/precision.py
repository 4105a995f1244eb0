"""Mixed precision and torch.compile for the training loop and sampling.

``train.precision``: ``fp32`` (default), ``bf16`` (autocast to bfloat16) or ``fp16`` (autocast to
float16 with a gradient scaler, Micikevicius et al. 2018, "Mixed Precision Training", Sec. 3.2).
Reduced precision is for CUDA GPUs; on a CPU it is refused, because it is slower there: the
project's CPU (no bf16/fp16 matrix units) measured ~1 GFLOP/s bf16 matmul against ~175 GFLOP/s
fp32, and bf16 autocast training 10-30x slower than fp32.

``train.compile`` / ``difflo sample --compile`` wrap the network in ``torch.compile``; the weights
and checkpoints are those of the plain module.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import DiffloError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check(precision: str, device: torch.device) -> None:
    """Refuse reduced precision where it makes training slower (every device but CUDA)."""
    if precision not in PRECISIONS:
        raise DiffloError(f"train.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and device.type != "cuda":
        raise DiffloError(f"train.precision={precision} is for CUDA GPUs; on {device.type} it would be slower "
                          f"than fp32 (no {precision} matrix units: ~1 GFLOP/s bf16 matmul vs ~175 fp32 "
                          f"measured on a CPU), so use train.precision=fp32")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise DiffloError("train.precision=bf16: this GPU has no bfloat16 support; use fp16 or fp32")


def autocast(precision: str, device: torch.device):
    """The autocast context of the training forward pass (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 only (disabled it passes loss and step through unchanged)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def compile_net(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch.compile(net) (compiled lazily, at the first call), with a one-line error where the
    toolchain it needs is clearly missing: a C++ compiler on CPU, Triton on CUDA."""
    import importlib.util
    import shutil

    if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise DiffloError("compile: torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH; "
                          "install one (e.g. apt-get install g++) or drop the compile option")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise DiffloError("compile: torch.compile on CUDA needs the triton package; pip install triton or "
                          "drop the compile option")
    return torch.compile(net)
