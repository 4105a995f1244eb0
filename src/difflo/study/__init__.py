"""Small, self-contained studies that train something for a few minutes on 2 CPU cores and write
figures, a ``results.json`` with the raw numbers and a markdown summary into an output folder.

- ``denoiser`` (``difflo study denoiser``): a single-step denoising UNet on mnist10k: the noising
  strip, training at one sigma, out-of-distribution sigmas, denoising pure noise, and a learning-
  rate schedule comparison for the class-conditional flow model (``denoiser.py``: the experiment;
  ``report.py``: its figures, tables, results.json and summary.md; the network is
  ``difflo.nn.SmallUNet``).

The command line is :mod:`difflo.cli.study`.
"""
