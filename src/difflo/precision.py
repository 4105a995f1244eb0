"""Mixed precision and torch.compile for training and sampling.

``precision`` (``train.precision``, ``sample.precision``, ``--precision``): ``auto`` (the default),
``fp32``, ``bf16`` (autocast to bfloat16) or ``fp16`` (autocast to float16 with a gradient scaler,
Micikevicius et al. 2018, "Mixed Precision Training", Sec. 3.2). Weights, optimizer state and EMA
stay float32 in every case: autocast only runs matrix products and convolutions in the lower type.

``auto`` is bf16 where the hardware has native bf16 matrix units and fp32 elsewhere:
CUDA GPUs that support bf16; CPUs whose flags (``/proc/cpuinfo``) list ``avx512_bf16`` or
``amx_bf16``, or, where the flags cannot be read, whose bf16 matmul times at least as fast as fp32
in a one-off measurement (cached for the process). The machines this project runs on differ: one
CPU measured bf16 matmul at ~1 GFLOP/s against ~175 fp32, another at 962 against 218
(shared notes; README "Speed"). An explicit ``bf16`` on a CPU without the units runs, after one
warning line that states the slowdown measured right then; ``fp16`` is CUDA-only.

``train.compile`` / ``difflo sample --compile`` wrap the network in ``torch.compile``; the weights
and checkpoints are those of the plain module.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from .errors import DiffloError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

_cache: dict = {}


@dataclass(frozen=True)
class Precision:
    """What was asked, what runs, and why (printed and stored with a run)."""
    asked: str
    used: str
    why: str

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES[self.used]

    def __str__(self) -> str:
        return self.used if self.asked == self.used else f"{self.used} ({self.asked}: {self.why})"


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_ratio(n: int = 256, repeats: int = 5) -> float:
    """Time of a bf16 n x n matmul over an fp32 one on this CPU (best of ``repeats``; cached)."""
    if "ratio" not in _cache:
        def best(dtype):
            a = torch.randn(n, n).to(dtype)
            torch.mm(a, a)                                     # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                torch.mm(a, a)
                times.append(time.perf_counter() - t0)
            return min(times)
        _cache["ratio"] = best(torch.bfloat16) / best(torch.float32)
    return _cache["ratio"]


def cpu_bf16() -> tuple[bool, str]:
    """(native bf16 on this CPU, how that was decided)."""
    flags = cpu_flags()
    if flags is not None:
        have = [f for f in CPU_BF16_FLAGS if f in flags]
        return (True, f"the CPU has {'/'.join(f.upper() for f in have)}") if have else \
            (False, "the CPU lists no AVX512-BF16/AMX-BF16")
    ratio = matmul_ratio()
    return ratio <= 1.0, f"bf16 matmul measured {ratio:.2f}x the fp32 time"


def resolve(asked: str, device: torch.device, log=print, what: str = "precision") -> Precision:
    """The precision that runs for ``asked`` on ``device``; a one-line error or warning where needed."""
    if asked not in PRECISIONS:
        raise DiffloError(f"{what}={asked!r} is not one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if asked == "auto":
            return Precision(asked, "bf16" if bf16_ok else "fp32",
                             "the GPU supports bf16" if bf16_ok else "the GPU has no bf16")
        if asked == "bf16" and not bf16_ok:
            raise DiffloError(f"{what}=bf16: this GPU has no bfloat16 support; use fp16 or fp32")
        return Precision(asked, asked, "asked")
    if asked == "fp16":
        raise DiffloError(f"{what}=fp16 is for CUDA GPUs (it needs a gradient scaler and fp16 units); on "
                          f"{device.type} use auto, bf16 or fp32")
    if device.type != "cpu":                                  # mps: no bf16 autocast decision made here
        return Precision(asked, "fp32" if asked == "auto" else asked, f"{device.type}: fp32 by default")
    native, why = cpu_bf16()
    if asked == "auto":
        return Precision(asked, "bf16" if native else "fp32", why)
    if asked == "bf16" and not native:
        log(f"warning: {what}=bf16 on a CPU without bf16 matrix units ({why}): bf16 matmul measured "
            f"{matmul_ratio():.0f}x the fp32 time here, so this will be slower than fp32")
    return Precision(asked, asked, "asked")


def autocast(p: Precision | str, device: torch.device):
    """The autocast context of the network's forward pass (a no-op for fp32)."""
    used = p.used if isinstance(p, Precision) else p
    if DTYPES[used] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[used])


def grad_scaler(p: Precision | str, device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 only (disabled it passes loss and step through unchanged)."""
    used = p.used if isinstance(p, Precision) else p
    return torch.amp.GradScaler(device.type, enabled=used == "fp16")


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
