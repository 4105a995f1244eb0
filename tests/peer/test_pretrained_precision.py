"""Which precision a diffusers folder samples in, and how far bf16 lands from the pipeline's fp32 images.

A folder samples in fp32 by default whatever ``auto`` picks on the machine (docs/decisions.md, "Any
machine"), so it gives its pipeline's images; ``--precision bf16`` trades that for speed, within the
bf16-sized tolerance measured here."""
from __future__ import annotations

import pytest
import torch

from difflo.model import load_model
from difflo.generate import generate, settings_for

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel  # noqa: E402

SEEDS = [3, 4]
# bf16 autocast against diffusers' fp32, DDIM 10 steps on the tiny UNet below: measured 2.8e-2 max
# relative error (1 + |x|) (2026-12-07, AMD EPYC, bf16 emulated); fp32 measured 2.2e-6. The AMX
# Xeon measured 8.9e-3 on the DDIM cases of test_pretrained_vs_diffusers.py.
BF16_TOL = 5e-2


def folder(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4).eval()
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(timestep_spacing="trailing"))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "m")
    ref = pipe(batch_size=len(SEEDS), generator=[torch.Generator().manual_seed(s) for s in SEEDS], eta=0.0,
               num_inference_steps=10, use_clipped_model_output=True, output_type="pt").images
    return tmp_path / "m", torch.as_tensor(ref)


def err(x, ref):
    got = (x / 2 + 0.5).clamp(0, 1)
    return ((got - ref).abs() / (1 + ref.abs())).max().item()


@pytest.mark.parametrize("forced", ["fp32", "bf16"])
def test_a_folder_samples_in_fp32_whatever_auto_takes(tmp_path, monkeypatch, forced):
    monkeypatch.setenv("DIFFLO_AUTO_PRECISION", forced)
    path, ref = folder(tmp_path)
    model = load_model(path)
    s = settings_for(model, sampler="ddim", steps=10)
    assert s.precision == "fp32"
    assert err(generate(model, torch.zeros(2, dtype=torch.long), SEEDS, s), ref) < 5e-5


@pytest.mark.slow
def test_bf16_on_a_folder_stays_within_its_tolerance(tmp_path):
    path, ref = folder(tmp_path)
    model = load_model(path)
    e = err(generate(model, torch.zeros(2, dtype=torch.long), SEEDS,
                     settings_for(model, sampler="ddim", steps=10, precision="bf16")), ref)
    assert 1e-4 < e < BF16_TOL, e                     # bf16 really ran (not fp32), and stays close
