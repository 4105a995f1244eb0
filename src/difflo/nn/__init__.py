"""Networks. They know nothing about diffusion: ``net(x, time, y) -> output`` of x's shape."""
from .unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig"]
