"""difflo: train, sample, edit and evaluate class-conditional diffusion models, every equation visible."""
__version__ = "0.1.0"
