"""argparse ``type=`` validators shared by every difflo command: a bad number is a one-line usage error."""
from __future__ import annotations

import argparse
import math


def _number(s: str, kind, what: str):
    try:
        return kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None


def positive_int(s: str) -> int:
    v = _number(s, int, "a whole number")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def nonneg_float(s: str) -> float:
    v = _number(s, float, "a number")
    if not v >= 0 or math.isinf(v):      # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0 and finite, got {s}")
    return v


def positive_float(s: str) -> float:
    v = _number(s, float, "a number")
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be > 0 and finite, got {s}")
    return v


MAX_SEED = 2**62


def seed(s: str) -> int:
    """A random seed: 0 <= seed < 2^62 (image i of a command uses seed + i in a 64-bit generator)."""
    v = _number(s, int, "a whole number")
    if not 0 <= v < MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be >= 0 and < 2^62, got {v}")
    return v


def port(s: str) -> int:
    """A TCP port: 0..65535 (0: any free port)."""
    v = _number(s, int, "a port number")
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535 (0: any free port), got {v}")
    return v


CKPT_HELP = ("a run directory, its checkpoints/ or one step folder, a .safetensors file, a diffusers model folder, "
             "or 'demo' (the model that ships with difflo)")


def null_class(s: str) -> int:
    """``--null-class K``: a class index, K >= 0 (its upper bound is the model's; checked when it is loaded)."""
    v = _number(s, int, "a class index (a whole number)")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a class index >= 0, got {v}")
    return v


def add_null_class(p) -> None:
    """``--null-class K``, beside every ``--ckpt`` (applied by ``difflo.model.load_model(null_class=K)``)."""
    p.add_argument("--null-class", type=null_class, metavar="K",
                   help="the class index a class-conditional diffusers model reads as 'no class', for guidance "
                        "(--w != 1) and unconditional edits; difflo's own exports name it themselves (their "
                        "difflo/config.yaml); a difflo-trained model's own is its num_classes")
