"""Post-hoc EMA: power-function averages tracked in training, any other average rebuilt afterwards.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2),
Sec. 3 and Appendix C. The power-function EMA with exponent gamma averages the weights theta_1..theta_t
of the first t steps with the profile p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]
(Eq. 2); as a running average it is the update (Eq. 4)

    avg_t = beta_t avg_{t-1} + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma + 1),

which gives theta_i the weight (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1): exactly the profile's
mass over (i-1, i], ~ t^gamma. Its width relative to t is (Eq. 3)

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).

Training (``train.posthoc_ema: [0.05, 0.10]``) tracks one such average per sigma_rel, in float32, and
writes all of them every ``train.posthoc_every`` steps to ``RUN/posthoc/step_N.safetensors``. A
snapshot taken at step t with exponent g holds <p_{t,g}, theta>; the average of any other profile
p_T is approximated by the combination sum_k c_k snapshot_k whose profile is nearest to p_T in L2
(App. C.3): the inner products of two power-function profiles have a closed form
(:func:`profile_dot`), so c solves the linear system A c = b with A_jk = <p_j, p_k>, b_j = <p_j, p_T>
(least squares). Since the tracked averages give step i exactly the profile's mass over (i-1, i],
the rebuilt weights differ from a directly tracked average only by that profile mismatch, which
:func:`solve` reports (the relative L2 error of the fitted profile); a target equal to a snapshot's
own (step, sigma_rel) is that snapshot.

Snapshot files: keys ``"<sigma_rel>/<parameter>"`` per tracked average and ``"buffer/<name>"``
for the network's buffers (copied, not averaged, as the training EMA does); metadata format
``difflo-posthoc``, step, sigma_rels (JSON) and the run's config (JSON).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from .errors import DiffloError
from .io import atomic_path

FORMAT = "difflo-posthoc"
SNAPSHOT_DIR = "posthoc"                        # RUN/posthoc/step_N.safetensors
GAMMA_AT_MAX = (math.sqrt(5) - 3) / 2           # sigma_rel(gamma) is largest here and falls for larger gamma
MAX_ERROR = 0.1                                 # default limit on the relative L2 error of a fitted profile


def sigma_rel_of(gamma: float) -> float:
    """EDM2 Eq. 3: the relative standard deviation of the power-function profile with exponent gamma."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


SIGMA_REL_MAX = sigma_rel_of(GAMMA_AT_MAX)      # ~0.3003: no power function is wider


def gamma_of(sigma_rel: float) -> float:
    """The exponent gamma >= GAMMA_AT_MAX with sigma_rel_of(gamma) = sigma_rel (EDM2 Eq. 3 solved for
    gamma: the largest root of its cubic), by bisection; sigma_rel in (0, SIGMA_REL_MAX]."""
    if not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise DiffloError(f"sigma_rel={sigma_rel} must be in (0, {SIGMA_REL_MAX:.4f}] (the widest power-function "
                          f"average)")
    lo, hi = GAMMA_AT_MAX, 2 / sigma_rel + 10    # sigma_rel(gamma) < 1/gamma: the root lies below 1/sigma_rel
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sigma_rel_of(mid) > sigma_rel else (lo, mid)
    return (lo + hi) / 2


def power_beta(step: int, gamma: float) -> float:
    """EDM2 Eq. 4: the decay of the update after ``step`` (>= 1) steps, (1 - 1/step)^(gamma + 1)."""
    return (1 - 1 / step) ** (gamma + 1)


def profile_dot(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """EDM2 App. C.3: the L2 inner product of the profiles p_{t_a, gamma_a} and p_{t_b, gamma_b},
    (a+1)(b+1) min(t_a, t_b)^(a+b+1) / ((a+b+1) t_a^(a+1) t_b^(b+1)), written with the ratio of the
    times so that large exponents do not overflow."""
    if t_a > t_b:
        t_a, gamma_a, t_b, gamma_b = t_b, gamma_b, t_a, gamma_a
    a, b = gamma_a, gamma_b
    return (a + 1) * (b + 1) / ((a + b + 1) * t_b) * (t_a / t_b) ** b


def solve(snapshots: list[tuple[int, float]], step: int, sigma_rel: float) -> tuple[np.ndarray, float]:
    """Coefficients c of the snapshots ((step, sigma_rel) each) whose combined profile is nearest (L2) to
    the power-function profile of ``sigma_rel`` at ``step``, and the relative L2 error of that fit."""
    gammas = [gamma_of(s) for _, s in snapshots]
    gamma = gamma_of(sigma_rel)
    exact = [k for k, (t, s) in enumerate(snapshots) if t == step and math.isclose(s, sigma_rel, rel_tol=1e-12)]
    A = np.array([[profile_dot(tj, gj, tk, gk) for tk, gk in zip((t for t, _ in snapshots), gammas)]
                  for tj, gj in zip((t for t, _ in snapshots), gammas)])
    b = np.array([profile_dot(t, g, step, gamma) for (t, _), g in zip(snapshots, gammas)])
    if exact:                                    # the target is a snapshot: itself, bit for bit
        c = np.zeros(len(snapshots))
        c[exact[0]] = 1.0
    else:
        c = np.linalg.lstsq(A, b, rcond=None)[0]
    norm = profile_dot(step, gamma, step, gamma)
    err2 = norm - 2 * c @ b + c @ A @ c
    return c, math.sqrt(max(err2, 0.0) / norm)


class PowerEMA:
    """The power-function averages of ``net``'s parameters tracked during training (one per sigma_rel,
    float32, on the parameters' device), and their snapshots in ``out_dir``."""

    def __init__(self, net: torch.nn.Module, sigma_rels, every: int, out_dir: Path, config: dict):
        self.net, self.sigma_rels, self.every, self.dir = net, tuple(sigma_rels), every, Path(out_dir)
        self.config = config
        self.gammas = [gamma_of(s) for s in self.sigma_rels]
        self.names = [n for n, _ in net.named_parameters()]
        self.averages = [[p.detach().float().clone() for p in net.parameters()] for _ in self.sigma_rels]
        self.dir.mkdir(parents=True, exist_ok=True)

    def update(self, step: int) -> None:
        """After ``step`` updates: avg <- beta avg + (1 - beta) theta per average (one multi-tensor lerp each).
        A skipped (non-finite) step averages the unchanged weights again, so step i keeps its weight."""
        with torch.no_grad():
            params = [p.detach().float() for p in self.net.parameters()]
            for gamma, avg in zip(self.gammas, self.averages):
                torch._foreach_lerp_(avg, params, 1 - power_beta(step, gamma))

    def state_dict(self) -> dict:
        """The averages, for the checkpoint's training state (resume continues them exactly)."""
        return {"sigma_rels": list(self.sigma_rels),
                "averages": {f"{s}/{n}": a for s, avg in zip(self.sigma_rels, self.averages)
                             for n, a in zip(self.names, avg)}}

    def load_state_dict(self, state: dict | None, step: int, where) -> None:
        """Continue the averages of a checkpoint at ``step``; snapshots after it are removed (the resumed run
        writes them again). A checkpoint without them (or with other sigma_rels) cannot be continued."""
        if state is None or list(state.get("sigma_rels", [])) != list(self.sigma_rels):
            had = state.get("sigma_rels") if state else "none"
            raise DiffloError(f"--resume: train.posthoc_ema={list(self.sigma_rels)} but {where} tracked {had}; the "
                              f"power-function averages start at step 0, so resume with the run's own "
                              f"train.posthoc_ema or train a new run")
        with torch.no_grad():
            for s, avg in zip(self.sigma_rels, self.averages):
                for n, a in zip(self.names, avg):
                    a.copy_(state["averages"][f"{s}/{n}"])
        for path in list_snapshots(self.dir.parent):
            if snapshot_step(path) > step:
                path.unlink()

    def snapshot(self, step: int) -> Path:
        """Write ``step_N.safetensors`` atomically: every average, the buffers, step, sigma_rels, config."""
        tensors = {f"{s}/{n}": a.detach().cpu().contiguous() for s, avg in zip(self.sigma_rels, self.averages)
                   for n, a in zip(self.names, avg)}
        params = set(self.names)
        tensors.update({f"buffer/{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()
                        if k not in params})
        meta = {"format": FORMAT, "step": str(step), "sigma_rels": json.dumps(list(self.sigma_rels)),
                "config": json.dumps(self.config)}
        path = self.dir / f"step_{step:07d}.safetensors"
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path


def list_snapshots(run_dir: Path) -> list[Path]:
    """A run's snapshot files, oldest first."""
    root = Path(run_dir) / SNAPSHOT_DIR
    return sorted(root.glob("step_*.safetensors")) if root.is_dir() else []


def snapshot_step(path: Path) -> int:
    return int(Path(path).stem.split("_")[1])


def read_meta(path: Path) -> dict:
    """A snapshot's metadata, checked: {"step", "sigma_rels", "config"}."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError("not a difflo post-hoc EMA snapshot")
        return {"step": int(meta["step"]), "sigma_rels": [float(s) for s in json.loads(meta["sigma_rels"])],
                "config": json.loads(meta["config"])}
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise DiffloError(f"{path} is not a readable post-hoc EMA snapshot ({e})") from None


def reconstruct(run_dir: Path, sigma_rel: float, max_error: float = MAX_ERROR, step: int | None = None) -> dict:
    """The weights of the power-function EMA with ``sigma_rel`` at the run's last snapshot (or at the snapshot
    of ``step``), rebuilt from the snapshots up to it: {"state", "config", "step", "snapshots", "coefficients",
    "error"}."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DiffloError(f"run directory {run_dir} not found")
    files = list_snapshots(run_dir)
    if not files:
        raise DiffloError(f"{run_dir} has no post-hoc EMA snapshots ({run_dir / SNAPSHOT_DIR}/step_*.safetensors): "
                          f"train with train.posthoc_ema=[0.05,0.1] to write them")
    metas = [read_meta(p) for p in files]
    if step is not None:                                            # an earlier point: only what was known then
        steps = [m["step"] for m in metas]
        if step not in steps:
            shown = ", ".join(map(str, steps[:12])) + (", ..." if len(steps) > 12 else "")
            raise DiffloError(f"--step {step}: {run_dir} has post-hoc EMA snapshots at steps {shown}; choose one "
                              f"of them")
        files, metas = files[:steps.index(step) + 1], metas[:steps.index(step) + 1]
    basis = [(m["step"], s) for m in metas for s in m["sigma_rels"]]
    step = metas[-1]["step"]   # list_snapshots sorts by step
    coefficients, error = solve(basis, step, sigma_rel)             # a sigma_rel no power function has: an error
    tracked = sorted({s for _, s in basis})
    if error > max_error:
        raise DiffloError(f"--sigma-rel {sigma_rel} is outside what the {len(files)} snapshots of {run_dir} "
                          f"reconstruct: the fitted averaging profile is off by {error:.1%} (limit {max_error:.0%}, "
                          f"--max-error); the run tracked sigma_rel {', '.join(map(str, tracked))}")
    state: dict[str, torch.Tensor] = {}
    k = 0
    for path, meta in zip(files, metas):
        with safe_open(str(path), framework="pt") as f:
            for s in meta["sigma_rels"]:
                c = float(coefficients[k])
                k += 1
                if c == 0.0:
                    continue
                for key in f.keys():
                    if key.startswith(f"{s}/"):
                        name = key.split("/", 1)[1]
                        term = f.get_tensor(key).double() * c
                        state[name] = state[name] + term if name in state else term
            if path == files[-1]:
                dtypes = {key.split("/", 1)[1]: f.get_tensor(key).dtype for key in f.keys()
                          if key.startswith(f"{meta['sigma_rels'][0]}/")}
                state = {n: v.to(dtypes[n]) for n, v in state.items()}
                state.update({key.split("/", 1)[1]: f.get_tensor(key) for key in f.keys()
                              if key.startswith("buffer/")})
    return {"state": state, "config": metas[-1]["config"], "step": step, "snapshots": len(files),
            "coefficients": coefficients, "error": error}
