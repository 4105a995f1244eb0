import pytest
import torch

from difflo.nn import UNet, UNetConfig
from difflo.nn.unet import timestep_embedding


@pytest.mark.parametrize("c, size, mult, attn", [(1, 28, (1, 2, 2), (7,)), (3, 32, (1, 2, 2, 2), (8,)),
                                                  (3, 64, (1, 1, 2, 2), (16, 8)), (1, 28, (1, 2), ())])
def test_shapes_for_common_sizes(c, size, mult, attn):
    net = UNet(UNetConfig(in_channels=c, image_size=size, channels=8, channel_mult=mult, attn_resolutions=attn,
                          num_classes=5))
    x = torch.randn(2, c, size, size)
    out = net(x, torch.tensor([0.0, 999.0]), torch.tensor([0, 5]))   # 5 = null class
    assert out.shape == x.shape


def perturbed(net):
    torch.manual_seed(1)
    for p in net.parameters():           # perturb: zero-initialised output layers would hide the dependence
        p.data.add_(0.05 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("scale_shift", [False, True])
def test_output_depends_on_time_and_class(scale_shift):
    """At widths 64 and 128 (2 and 4 channels per GroupNorm group) the embedding moves the output by far more than
    rounding, added before the norm or as scale and shift after it."""
    torch.manual_seed(0)
    net = perturbed(UNet(UNetConfig(channels=64, channel_mult=(1, 2), attn_resolutions=(14,), num_classes=3,
                                    scale_shift=scale_shift)))
    x = torch.randn(1, 1, 28, 28)
    a = net(x, torch.tensor([10.0]), torch.tensor([0]))
    assert (a - net(x, torch.tensor([500.0]), torch.tensor([0]))).abs().max() > 1e-3
    assert (a - net(x, torch.tensor([10.0]), torch.tensor([1]))).abs().max() > 1e-3
    assert torch.equal(a, net(x, torch.tensor([10.0]), torch.tensor([0])))


@pytest.mark.parametrize("scale_shift", [False, True])
def test_groupnorm_of_single_channels_removes_an_added_embedding(scale_shift):
    """The UNet docstring's claim: at width 8 every GroupNorm group is one channel, so an embedding added before the
    norm cancels in the mean subtraction and the class moves the output only by rounding (the model cannot use
    it); scale_shift applies it after the norm, where it survives."""
    torch.manual_seed(0)
    net = perturbed(UNet(UNetConfig(channels=8, channel_mult=(1, 2), attn_resolutions=(14,), num_classes=3,
                                    scale_shift=scale_shift)))
    x, t = torch.randn(1, 1, 28, 28), torch.tensor([10.0])
    moved = (net(x, t, torch.tensor([0])) - net(x, t, torch.tensor([1]))).abs().max().item()
    assert (moved > 1e-3) if scale_shift else (moved < 1e-5), moved


def test_zero_initialised_output():
    net = UNet(UNetConfig(channels=8, channel_mult=(1, 2), attn_resolutions=()))
    assert net(torch.randn(2, 1, 28, 28), torch.tensor([1.0, 2.0]), torch.tensor([0, 1])).abs().max() == 0


def test_sinusoidal_embedding():
    emb = timestep_embedding(torch.tensor([0.0, 1.0]), 8)
    assert emb.shape == (2, 8)
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))   # cos(0) = 1, sin(0) = 0


def test_invalid_config_is_refused():
    with pytest.raises(ValueError, match="not divisible"):
        UNet(UNetConfig(image_size=30))
