"""argparse ``type=`` validators shared by every difflo command: a bad number is a one-line usage error."""
from __future__ import annotations

import argparse
import math

from ..config import parse_interval


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


def interval(s: str) -> tuple[float, ...]:
    """``--guidance-interval LO,HI``: two finite numbers (their range is checked with the settings), or
    ``off`` (guidance at every noise level, over a run's sample.guidance_interval)."""
    try:
        return parse_interval(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def number_pair(s: str) -> tuple[float, float]:
    """``LO,HI``: two finite numbers (their order and range are checked by the command that reads them)."""
    parts = s.split(",")
    try:
        lo, hi = (float(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be two numbers LO,HI, got {s!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise argparse.ArgumentTypeError(f"must be finite, got {s}")
    return lo, hi


def add_guidance_flags(p, guide: bool = False) -> None:
    """The guidance options beside ``--w`` (the config's sample.guidance_*; ``--guide`` where ``guide``)."""
    p.add_argument("--guidance-interval", type=interval, metavar="LO,HI",
                   help="guide only where the noise level sigma/alpha lies in [LO, HI] (Kynkaanniemi et al. 2024), "
                        "unguided (w = 1, one network call) elsewhere; off: everywhere (default: the run's "
                        "sample.guidance_interval, off)")
    p.add_argument("--guidance-rescale", type=nonneg_float, metavar="PHI",
                   help="rescaled guidance phi in [0, 1] (Lin et al. 2024, Eq. 15-16): match the guided v's std to "
                        "the conditional one's; 0: off (default: the run's sample.guidance_rescale)")
    if guide:
        p.add_argument("--guide", metavar="CKPT",
                       help="autoguidance (Karras et al. 2024): guide with this weaker model of the same kind (an "
                            "earlier checkpoint: any --ckpt form) instead of the unconditional prediction; --w is "
                            "its scale")


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
