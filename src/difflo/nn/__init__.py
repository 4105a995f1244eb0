"""Networks. They know nothing about diffusion: ``net(x, time, y) -> output`` of x's shape."""
from .small_unet import SmallUNet
from .unet import UNet, UNetConfig

__all__ = ["SmallUNet", "UNet", "UNetConfig"]
