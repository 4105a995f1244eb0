"""Mixed precision and torch.compile for training and sampling.

``precision`` (``train.precision``, ``sample.precision``, ``--precision``): ``auto`` (the default),
``fp32``, ``bf16`` (autocast to bfloat16) or ``fp16`` (autocast to float16 with a gradient scaler,
Micikevicius et al. 2018, "Mixed Precision Training", Sec. 3.2). Weights, optimizer state and EMA
stay float32 in every case: autocast only runs matrix products and convolutions in the lower type.

``auto`` is bf16 where it is faster and fp32 elsewhere: on CUDA GPUs that support bf16; on a CPU
when a one-off measurement says so. A CPU whose flags (``/proc/cpuinfo``) list neither
``avx512_bf16`` nor ``amx_bf16`` is fp32 without measuring (bf16 is emulated there); otherwise a
3x3 convolution and a matmul (the UNet's two kinds of work) are timed in both types, and bf16 is
chosen when both run at least 1.15x faster. The two types are timed alternately (fp32, bf16,
fp32, ...) and each keeps its best of five, so a load that comes and goes slows both alike and
cannot flip the answer. The answer is cached per machine (CPU model, flags, threads, torch
version) in ``$XDG_CACHE_HOME/difflo/precision.json``; ``difflo env`` prints it with the reasons,
``difflo env --remeasure`` measures again.

**Forcing auto**: the environment variable ``DIFFLO_AUTO_PRECISION=fp32`` or ``=bf16`` makes
``auto`` take that type without flags or measurement (CI runs the numerical tests both ways with
it); an explicit ``fp32``/``bf16`` setting is not affected. The flags alone do not
decide: the machines this project runs on differ (bf16 matmul ~1 GFLOP/s against ~175 fp32 on one,
962 against 218 on another, and 166 against 295 on a third whose flags list AVX512-BF16; README
"Speed"). An explicit ``bf16`` where it is slower runs, after one warning line that states the
measured slowdown; ``fp16`` is CUDA-only.

**The training batch's memory layout** (``training_layout``): oneDNN keeps its input's layout through
the network, so the layout of the batch decides every activation's. On the CPU, fp32 trains in
channels_last and bf16 contiguous: on a 2-core AVX512-BF16 EPYC an emoji32 training step ran 1.13x
faster in channels_last than contiguous in fp32, but 1.27x faster contiguous in bf16, where PyTorch's
GroupNorm kernel (forward and backward) runs ~8x slower on channels_last bf16 maps and took 30 % of
the step (``python benchmarks/profile_step.py --variants contiguous,channels_last`` measures both on
any machine). ``DIFFLO_LAYOUT=contiguous|channels_last`` takes one instead; the numbers a step
computes differ between layouts only by float summation order.

``train.compile`` / ``difflo sample --compile`` wrap the network in ``torch.compile``; the weights
and checkpoints are those of the plain module.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from dataclasses import dataclass

import torch

from .errors import DiffloError
from .io import cache_home, write_text_atomic

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
BF16_MIN_SPEEDUP = 1.15            # auto takes bf16 on a CPU only when it is at least this much faster
AUTO_ENV = "DIFFLO_AUTO_PRECISION"  # fp32 | bf16: what auto takes, without flags or measurement
AUTO_FORCED = ("fp32", "bf16")

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


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo (Linux; empty elsewhere), read once."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, or None where they cannot be read."""
    flags = _cpuinfo().get("flags")
    return frozenset(flags.split()) if flags is not None else None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    import platform
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def speed_flags() -> list[str]:
    """The flags among SPEED_FLAGS this CPU lists (what a speed figure should be reported with)."""
    return sorted(set(SPEED_FLAGS) & (cpu_flags() or set()))


def best_times(fns, repeats: int = 5) -> list[float]:
    """The best of ``repeats`` timings of each function, the functions timed in turn (a, b, a, b, ...)
    so that a load that comes and goes during the measurement slows each of them alike."""
    for fn in fns:
        fn()                                                     # warm-up (oneDNN primitive creation)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def measure_bf16() -> dict:
    """bf16 time / fp32 time of a 3x3 conv (64 -> 64 channels, 32x32, batch 8) and a 512^3 matmul
    (a few seconds in all, also where bf16 is slow)."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 64, 32, 32, generator=g), torch.randn(64, 64, 3, 3, generator=g)
    a = torch.randn(512, 512, generator=g)
    xb, wb, ab = x.bfloat16(), w.bfloat16(), a.bfloat16()
    out = {}
    with torch.no_grad():
        for name, fn in (("conv", lambda x, w, a: F.conv2d(x, w, padding=1)), ("matmul", lambda x, w, a: a @ a)):
            t32, t16 = best_times([lambda: fn(x, w, a), lambda: fn(xb, wb, ab)])
            out[name] = t16 / t32
    return out


def machine_key() -> str:
    return f"{cpu_model()}|{','.join(speed_flags())}|{torch.get_num_threads()} threads|torch {torch.__version__}"


def bf16_ratios(remeasure: bool = False) -> dict:
    """measure_bf16() for this machine, from the cache file or measured once and stored there
    (``remeasure``: measure again and replace the stored answer)."""
    if "ratios" in _cache and not remeasure:
        return _cache["ratios"]
    path, key = precision_file(), machine_key()
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    if not isinstance(stored, dict):
        stored = {}
    mine = stored.get(key)
    valid = isinstance(mine, dict) and all(isinstance(mine.get(k), (int, float)) for k in ("conv", "matmul"))
    if remeasure or not valid:                                    # missing, or not two numbers: measure
        stored[key] = measure_bf16()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(stored, indent=1))
        except OSError:
            pass                                                  # a read-only home: measure again next time
    _cache["ratios"] = {k: stored[key][k] for k in ("conv", "matmul")}
    return _cache["ratios"]


LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
LAYOUT_ENV = "DIFFLO_LAYOUT"       # contiguous | channels_last: the training batch's layout, whatever the type


def training_layout(p: "Precision | str", device: torch.device) -> tuple[str, str]:
    """(layout name, why): the memory layout the training batch is put in (LAYOUTS) for precision ``p`` on
    ``device``: on a CPU channels_last in fp32 and contiguous in bf16 (module docstring), contiguous
    elsewhere; ``DIFFLO_LAYOUT`` forces one."""
    forced = os.environ.get(LAYOUT_ENV, "").strip()
    if forced:
        if forced not in LAYOUTS:
            raise DiffloError(f"{LAYOUT_ENV}={forced!r} is not one of {', '.join(LAYOUTS)}; unset it to let the "
                              f"precision decide")
        return forced, f"forced by {LAYOUT_ENV}={forced}"
    if device.type != "cpu":
        return "contiguous", f"{device.type}: the default layout"
    if (p.used if isinstance(p, Precision) else p) == "fp32":
        return "channels_last", "fp32 on the CPU: oneDNN's convolutions run faster in it"
    return "contiguous", "bf16 on the CPU: GroupNorm's bf16 kernel runs ~8x slower on channels_last maps"


def precision_file():
    """Where the measurement is cached: $XDG_CACHE_HOME/difflo/precision.json."""
    return cache_home() / "precision.json"


def _speed(ratio: float) -> str:
    return f"{ratio:.3g}x slower" if ratio > 1 else f"{1 / ratio:.3g}x faster"


def measured_bf16() -> tuple[bool, str]:
    """(bf16 is at least BF16_MIN_SPEEDUP faster here, the measurement in words)."""
    r = bf16_ratios()
    return (all(v <= 1 / BF16_MIN_SPEEDUP for v in r.values()),
            f"bf16 measured {_speed(r['conv'])} than fp32 in a 3x3 conv and {_speed(r['matmul'])} in a matmul")


def forced_auto() -> str | None:
    """What ``DIFFLO_AUTO_PRECISION`` makes ``auto`` take (None: not set); one line if it is not fp32/bf16."""
    value = os.environ.get(AUTO_ENV, "").strip()
    if not value:
        return None
    if value not in AUTO_FORCED:
        raise DiffloError(f"{AUTO_ENV}={value!r} is not one of {', '.join(AUTO_FORCED)}; unset it to let auto "
                          f"decide by the CPU")
    return value


def cpu_bf16() -> tuple[bool, str]:
    """(auto should take bf16 on this CPU, why): forced by DIFFLO_AUTO_PRECISION; no bf16 flags -> no
    (not measured); else measured."""
    forced = forced_auto()
    if forced is not None:
        return forced == "bf16", f"forced by {AUTO_ENV}={forced}"
    flags = cpu_flags()
    if flags is not None and not any(f in flags for f in CPU_BF16_FLAGS):
        return False, "the CPU lists no AVX512-BF16/AMX-BF16"
    return measured_bf16()


def resolve(asked: str, device: torch.device, log=print, what: str = "precision") -> Precision:
    """The precision that runs for ``asked`` on ``device``; a one-line error or warning where needed."""
    if asked not in PRECISIONS:
        raise DiffloError(f"{what}={asked!r} is not one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if asked == "auto" and (forced := forced_auto()) is not None:
            if forced == "bf16" and not bf16_ok:
                raise DiffloError(f"{AUTO_ENV}=bf16: this GPU has no bfloat16 support; unset it or use fp32")
            return Precision(asked, forced, f"forced by {AUTO_ENV}={forced}")
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
    if asked == "auto":
        fast, why = cpu_bf16()
        return Precision(asked, "bf16" if fast else "fp32", why)
    if asked == "bf16":
        fast, why = measured_bf16()
        if not fast:
            log(f"warning: {what}=bf16 does not pay on this CPU ({why}); it runs as asked")
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
