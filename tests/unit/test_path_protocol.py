"""The contracts of docs/decisions.md, "One denoiser interface": the NoisePath protocol declares every
member the code reads from a path (checked on the source, and on both path classes), objective-dependent
behaviour asks the path instead of comparing the objective string, and the one model denoiser leaves
autograd to its callers, every sampling entry point turning it off."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from samplers_common import SAMPLER_CASES, SHAPE, case_id, noise_fn, objective_path
from conftest import tiny_config
from difflo import noise_paths
from difflo.config import DiffusionConfig
from difflo.diffusion import DiscreteSchedule
from difflo.edit import operators
from difflo.flow import FlowPath
from difflo.guidance import ModelDenoiser
from difflo.noise_paths import MEMBERS, NoisePath, missing_members
from difflo.samplers import SAMPLERS

PKG = Path(__file__).resolve().parents[2] / "src" / "difflo"
# ``path`` also names filesystem paths (pathlib, os.path) and URL strings in difflo; their attributes are
# left out of the scan, and no NoisePath member may share a name with them (test_members_are_not_file_path_names).
FILE_PATH_NAMES = {n for n in dir(Path) + dir(str) + dir(os.path) if not n.startswith("_")}


def is_path_object(node: ast.expr) -> bool:
    """A name ``path`` or an attribute ``X.path`` (``model.path``, ``denoiser.path``, ``self.path``), not os.path."""
    if isinstance(node, ast.Name):
        return node.id == "path"
    return (isinstance(node, ast.Attribute) and node.attr == "path"
            and not (isinstance(node.value, ast.Name) and node.value.id == "os"))


def path_attributes() -> dict[str, list[str]]:
    """Every attribute read from a path object in src/difflo (``path.X`` and ``getattr(path, "X", ...)``),
    each with the places it is read."""
    found: dict[str, list[str]] = {}
    for f in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Attribute) and is_path_object(node.value):
                name = node.attr
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                  and len(node.args) >= 2 and is_path_object(node.args[0])
                  and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
                name = node.args[1].value
            else:
                continue
            if name not in FILE_PATH_NAMES:
                found.setdefault(name, []).append(f"{f.relative_to(PKG.parent)}:{node.lineno}")
    return found


@pytest.mark.slow
def test_every_path_member_the_code_reads_is_declared():
    found = path_attributes()
    assert {"alpha_sigma", "d_alpha_sigma", "time_at_nsr", "spacings", "samplers"} <= set(found)   # the scan sees them
    undeclared = {k: v for k, v in found.items() if k not in MEMBERS}
    assert not undeclared, f"read from a path but not declared in noise_paths.NoisePath: {undeclared}"


def test_members_are_not_file_path_names():
    """The scan skips pathlib/str/os.path names, so a member with such a name would go unchecked."""
    assert not set(MEMBERS) & FILE_PATH_NAMES


def test_members_come_from_the_protocol():
    assert "t_clean" in MEMBERS and "training_loss" in MEMBERS and "samplers" in MEMBERS
    assert set(MEMBERS) == {n for n in {**NoisePath.__annotations__, **vars(NoisePath)} if not n.startswith("_")}


def test_sampler_needs_are_declared_flags():
    """``Sampler.needs`` names path attributes read by getattr (hidden from the scan): each must be declared."""
    for name, entry in SAMPLERS.items():
        for need in entry.needs:
            assert need in MEMBERS, f"sampler {name} needs {need!r}, which NoisePath does not declare"
            assert isinstance(getattr(DiscreteSchedule, need), bool) and isinstance(getattr(FlowPath, need), bool)


@pytest.mark.parametrize("cls, path", [(DiscreteSchedule, DiscreteSchedule.from_name("cosine", 100)),
                                       (FlowPath, FlowPath())], ids=["discrete", "flow"])
def test_both_paths_implement_every_member(cls, path):
    assert missing_members(cls) == [] and missing_members(path) == []
    for flag in ("variance_preserving", "continuous", "beta_schedule", "timestep_grids"):   # class level
        assert isinstance(getattr(cls, flag), bool)
    for choices in ("predictions", "loss_weightings", "t_samplings"):
        assert isinstance(getattr(cls, choices), tuple) and getattr(cls, choices)


@pytest.mark.parametrize("objective", noise_paths.OBJECTIVES)
def test_make_path_builds_a_complete_path(objective):
    d = DiffusionConfig(objective=objective)
    assert isinstance(noise_paths.make_path(d), noise_paths.PATHS[objective])


def test_make_path_refuses_a_path_lacking_members(monkeypatch):
    class Partial:
        @classmethod
        def from_config(cls, d):
            return cls()

        def alpha_sigma(self, t):
            return 1.0 - t, t

    monkeypatch.setitem(noise_paths.PATHS, "partial", Partial)
    with pytest.raises(TypeError, match="Partial does not implement NoisePath: it lacks t_clean, "):
        noise_paths.make_path(DiffusionConfig(objective="partial"))


def test_discrete_schedule_has_no_time_derivative():
    with pytest.raises(ValueError, match="no d alpha/dt"):
        DiscreteSchedule.from_name("cosine", 100).d_alpha_sigma(10)


def test_objective_questions_are_path_members():
    assert DiscreteSchedule.beta_schedule and DiscreteSchedule.timestep_grids
    assert not FlowPath.beta_schedule and not FlowPath.timestep_grids
    d = DiffusionConfig()
    assert DiscreteSchedule.describe(d) == f"diffusion, {d.schedule}, {d.prediction}-prediction"
    assert FlowPath.describe(DiffusionConfig(objective="flow", prediction="u")) == "flow, u-prediction"


@pytest.mark.slow
def test_no_code_compares_the_objective_string():
    """``X.objective == "flow"`` and the like: the behaviour belongs to the path (noise_paths.PATHS)."""
    def is_objective(node):
        return (isinstance(node, ast.Attribute) and node.attr == "objective") or \
               (isinstance(node, ast.Name) and node.id == "objective")

    bad = []
    for f in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                sides = [node.left, *node.comparators]
                if any(is_objective(s) for s in sides) and any(isinstance(s, ast.Constant) for s in sides):
                    bad.append(f"{f.relative_to(PKG.parent)}:{node.lineno}")
    assert not bad, f"objective string compared (ask the path instead): {bad}"


# --------------------------------------------------------------------------- the denoiser and autograd
class Net(torch.nn.Module):
    """A network whose weights require grad (as a loaded model's do): x0-ish output depending on t."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(SHAPE[1], SHAPE[1], 3, padding=1)

    def forward(self, x, t, y=None):
        return torch.tanh(self.conv(x)) * (1 + t.view(-1, 1, 1, 1) / 1000)


def prediction_for(path) -> str:
    return path.predictions[0] if path.continuous else "v"        # flow: u, edm: edm


@pytest.mark.parametrize("name, opts, objective", SAMPLER_CASES, ids=[case_id(*c) for c in SAMPLER_CASES])
def test_every_sampler_runs_without_autograd(name, opts, objective):
    """Sampling a model whose parameters require grad builds no graph: the samplers carry no_grad."""
    path = objective_path(objective)
    torch.manual_seed(0)
    den = ModelDenoiser(Net(), path, prediction_for(path))
    seen = []
    x = torch.randn(SHAPE)
    out = SAMPLERS[name](den, x, path.sampling_times(3), callback=seen.append, noise=noise_fn(torch.float32), **opts)
    assert torch.isfinite(out).all() and not out.requires_grad
    assert not any(d["denoised"].requires_grad or d["x"].requires_grad for d in seen)


def test_the_denoiser_leaves_autograd_to_its_caller():
    """No no_grad inside: the output of a network with trainable weights carries a graph, and one time for
    the batch equals the same time given per sample; ``dtype`` sets x0_hat's dtype."""
    for path in (DiscreteSchedule.from_name("cosine", 1000), FlowPath()):
        torch.manual_seed(0)
        den = ModelDenoiser(Net(), path, prediction_for(path))
        x = torch.randn(SHAPE)
        t = 500 if not path.continuous else 0.5
        one = den(x, t)
        assert one.requires_grad and one.dtype == torch.float32
        per_sample = den(x, torch.full((SHAPE[0],), t, dtype=torch.long if isinstance(t, int) else torch.float64))
        torch.testing.assert_close(per_sample, one)
        wide = ModelDenoiser(den.net, path, den.prediction, dtype=torch.float64)(x.double(), torch.tensor([t] * SHAPE[0]))
        assert wide.dtype == torch.float64
        torch.testing.assert_close(wide.float(), one, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            assert not den(x, t).requires_grad


def test_editing_loops_run_without_autograd():
    path = DiscreteSchedule.from_name("cosine", 1000)
    torch.manual_seed(0)
    den = ModelDenoiser(Net(), path, "v")
    ts, seeds, y = path.sampling_times(3), [1, 2], None
    x = torch.rand(SHAPE) * 2 - 1
    mask = torch.zeros(1, 1, *SHAPE[2:])
    mask[..., :2] = 1
    outs = [operators.sdedit(den, x, y, ts, 2, seeds),
            operators.inpaint(den, x, mask, y, ts, seeds, jump_length=1, jump_n_sample=2),
            operators.sample_plain(den, y, ts, seeds, SHAPE[1:]),
            operators.ddim_invert(den, x, ts, {"y": y})]
    assert not any(o.requires_grad for o in outs)


def test_generate_runs_without_autograd():
    from difflo.generate import generate, settings_for
    from difflo.model import Model, build_net
    cfg = tiny_config()
    model = Model(build_net(cfg), cfg)
    assert all(p.requires_grad for p in model.net.parameters())
    out = generate(model, torch.tensor([0, 1]), [0, 1], settings_for(model, steps=2))
    assert not out.requires_grad

