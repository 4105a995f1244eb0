"""Where one training step's time goes, and what share of the machine's convolution limit it reaches.

    python benchmarks/profile_step.py [--config configs/emoji32.yaml] [--precision auto|fp32|bf16]
                                      [--steps 6] [--out benchmarks/profile_step.txt]

1. **The step, profiled.** ``torch.profiler`` over ``--steps`` full training steps of the config's model
   (data batch, noise, forward, loss, backward, gradient clipping, AdamW, EMA: the training loop's own
   calls), self CPU time grouped into kinds of op: convolution (forward and backward), matmul/linear,
   GroupNorm, SiLU, attention, elementwise, optimizer, EMA, autocast casts, data and the rest.
2. **The conv limit.** The same convolutions the UNet runs (every Conv2d's shape, batch and precision),
   timed alone, forward + both backward passes (``torch.autograd.grad`` of input and weight): their
   FLOPs over their time is the best this machine does on this model's convolutions. The step's share
   of that limit = (the step's conv FLOPs / the limit's FLOP/s) / the step's wall time: the fraction of
   the step a perfect implementation would still spend in convolutions.
3. **What pays.** The step's wall time (median over alternating rounds) with each change that can
   help: the other memory layout of the batch (``contiguous`` / ``channels_last``; the baseline is the
   one ``difflo.precision.training_layout`` picks for the precision, as the training loop does), a fused
   optimizer, compile.

Speed is machine-specific: the output names the CPU model, its flags and what ``auto`` picked.
"""
from __future__ import annotations

import argparse
import copy
import platform
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from difflo import config as config_mod, data as data_mod, precision  # noqa: E402
from difflo.model import build_net  # noqa: E402
from difflo.noise_paths import make_path  # noqa: E402
from difflo.train import batch_indices, ema_update, resolve  # noqa: E402

KINDS = [  # (kind, regex over profiler op names); the first match wins
    ("convolution", r"conv|mkldnn_convolution|convolution_backward"),
    ("matmul / linear", r"addmm|\bmm\b|aten::mm|bmm|matmul|linear"),
    ("attention", r"scaled_dot_product|softmax|flash_attention"),
    ("GroupNorm", r"group_norm|native_group_norm"),
    ("SiLU", r"silu"),
    ("optimizer (AdamW)", r"_foreach_(?!lerp)|adam"),
    ("EMA", r"_foreach_lerp"),
    ("autocast casts", r"aten::to$|_to_copy|copy_"),
    ("data (batch, noise, labels)", r"randn|rand|normal_|index|gather|randint"),
    ("elementwise", r"add|mul|sub|div|sum|mean|cat|pow|sqrt|exp|neg|where|clamp|norm"),
]


def cpu_facts() -> str:
    model = platform.processor() or "?"
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", text).group(1)
        flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())
        shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    except (OSError, AttributeError):
        shown = []
    return f"{model}; flags {' '.join(shown) or '(none of avx2/avx512/amx)'}; torch {torch.__version__}, " \
           f"{torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}"


class Step:
    """One training step of the loop in difflo.train (same calls, same order), reusable for timing."""

    def __init__(self, cfg, prec, layout: str, fused=False, compiled=False):
        self.cfg, self.prec = cfg, prec
        self.ds = data_mod.from_config(cfg.data)
        torch.manual_seed(0)
        self.net = build_net(cfg)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        kw = {"fused": True} if fused else {"foreach": True}
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4, **kw)
        self.model = precision.compile_net(self.net, torch.device("cpu")) if compiled else self.net
        self.path = make_path(cfg.diffusion)
        self.layout = precision.LAYOUTS[layout]                 # a name in precision.LAYOUTS
        self.i = 0

    def __call__(self):
        t = self.cfg.train
        gen = torch.Generator().manual_seed(self.i)
        x0, y = self.ds.batch(batch_indices(self.i, len(self.ds), t.batch_size, 0), torch.device("cpu"), gen)
        x0 = x0.contiguous(memory_format=self.layout)         # as the training loop does
        self.opt.zero_grad(set_to_none=True)
        with precision.autocast(self.prec, torch.device("cpu")):
            loss = self.path.training_loss(self.model, x0, y, self.cfg.diffusion, gen, slice(0, len(y)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        ema_update(self.ema, self.net, 0.999)
        self.i += 1


def conv_shapes(net, x0, cfg, prec):
    """Every Conv2d call of one forward pass: (module, input shape)."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, tuple(i[0].shape), tuple(o.shape))))
             for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    y = torch.zeros(len(x0), dtype=torch.long)
    with torch.no_grad(), precision.autocast(prec, torch.device("cpu")):
        net(x0, torch.full((len(x0),), 500.0), y)
    for h in hooks:
        h.remove()
    return seen


def conv_flops(seen) -> float:
    """Multiply-adds x 2 of forward + input-grad + weight-grad (3 passes of the same size)."""
    total = 0.0
    for m, _, out in seen:
        k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
        total += 2.0 * out[0] * out[1] * out[2] * out[3] * k * 3
    return total


def conv_limit(seen, prec, repeats=5) -> float:
    """FLOP/s of the model's convolutions run alone (forward + both backward passes), the best of the
    contiguous and the channels_last layout (best of rounds each): what oneDNN does on these shapes."""
    return max(_conv_limit(seen, prec, fmt, repeats) for fmt in (torch.contiguous_format, torch.channels_last))


def _conv_limit(seen, prec, fmt, repeats) -> float:
    dt = prec.dtype or torch.float32
    jobs = []
    for m, inp, out in seen:
        w = m.weight.detach().to(dt).contiguous(memory_format=fmt).requires_grad_(True)
        x = torch.randn(inp, dtype=dt).contiguous(memory_format=fmt).requires_grad_(True)
        g = torch.randn(out, dtype=dt).contiguous(memory_format=fmt)
        jobs.append((m, w, x, g))

    def once():
        for m, w, x, g in jobs:
            o = torch.nn.functional.conv2d(x, w, None, m.stride, m.padding, m.dilation, m.groups)
            torch.autograd.grad(o, (x, w), g)
    once()
    best = min(_timed(once) for _ in range(repeats))
    return conv_flops(seen) / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def profile(step: Step, n: int) -> tuple[dict, float]:
    from torch.profiler import ProfilerActivity, profile as tprofile
    step()
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        wall = (time.perf_counter() - t0) / n
    kinds: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        name = e.key
        kind = next((k for k, rx in KINDS if re.search(rx, name)), "other")
        kinds[kind] += e.self_cpu_time_total / 1e6 / n
    return dict(kinds), wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/emoji32.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=6, help="alternating timing rounds of each variant (the order rotates)")
    p.add_argument("--variants", default="contiguous,channels_last,fused",
                   help="comma list of contiguous, channels_last (the batch's layout), fused, compile")
    p.add_argument("--out", help="also write the table here")
    a = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    cfg = config_mod.load(a.config, a.overrides)
    cfg = resolve(cfg, data_mod.from_config(cfg.data))
    prec = precision.resolve(a.precision, torch.device("cpu"), lambda *x: None, "--precision")
    lines = [f"# {a.config} {' '.join(a.overrides)}: batch {cfg.train.batch_size}, precision {prec}",
             f"# {cpu_facts()}"]

    layout = precision.training_layout(prec, torch.device("cpu"))[0]   # the training loop's, the baseline's
    base = Step(cfg, prec, layout)
    kinds, wall = profile(base, a.steps)
    total = sum(kinds.values())
    lines.append(f"\n## 1. One step, profiled ({a.steps} steps): {wall:.3f} s/step, "
                 f"{cfg.train.batch_size / wall:.1f} images/s; self CPU time by kind (both threads' ops "
                 f"counted once; 'other' = the rest)\n")
    lines.append("| kind | s/step | share |\n|---|---|---|")
    for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {v:.4f} | {100 * v / total:.1f} % |")

    x0, _ = base.ds.batch(list(range(cfg.train.batch_size)), torch.device("cpu"))
    seen = conv_shapes(base.net, x0, cfg, prec)
    flops = conv_flops(seen)
    limit = conv_limit(seen, prec)
    share = flops / limit / wall
    lines.append(f"\n## 2. Conv limit\n\n{len(seen)} convolutions, {flops / 1e9:.1f} GFLOP per step "
                 f"(forward + 2 backward); alone they run at {limit / 1e9:.1f} GFLOP/s in {prec} -> "
                 f"{flops / limit:.3f} s. The step's share of the conv limit: {100 * share:.1f} %.")

    variants = {f"baseline (foreach AdamW, {layout})": dict()}
    for v in filter(None, a.variants.split(",")):
        if v not in ("contiguous", "channels_last", "fused", "compile"):
            raise SystemExit(f"--variants: unknown {v!r}; choose from contiguous, channels_last, fused, compile")
        if v != layout:
            variants[v] = {"fused": dict(fused=True), "compile": dict(compiled=True)}.get(v, dict(layout=v))
    steps = {name: (base if not kw else Step(cfg, prec, **{"layout": layout, **kw})) for name, kw in variants.items()}
    for s in steps.values():
        s(), s()                                           # warm up (compile happens here)
    times = defaultdict(list)
    names = list(steps)
    for r in range(a.rounds):                              # alternate, so load that comes and goes hits all,
        for name in names[r % len(names):] + names[:r % len(names)]:   # and rotate who goes first
            times[name].append(min(_timed(steps[name]) for _ in range(3)))
    lines.append("\n## 3. What pays (best of 3 steps, median over alternating rounds)\n")
    lines.append("| variant | s/step | images/s | vs baseline | share of conv limit |\n|---|---|---|---|---|")
    b = statistics.median(times[next(iter(steps))])
    for name in steps:
        m = statistics.median(times[name])
        lines.append(f"| {name} | {m:.3f} | {cfg.train.batch_size / m:.1f} | {b / m:.2f}x | "
                     f"{100 * flops / limit / m:.1f} % |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
