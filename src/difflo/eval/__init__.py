"""Evaluation: how good a model's samples are, and how likely its held-out images (``difflo eval``).

- ``classifier`` — a small CNN trained on real images; class accuracy of conditional samples;
- ``fid`` — Frechet distances (Inception FID, the classifier-feature proxy) and reference statistics;
- ``kid`` — Kernel Inception Distance; ``precision_recall`` — improved precision and recall;
- ``evaluate`` — scoring a sample set (distance, KID, precision/recall, accuracy), used by the CLI;
- ``periodic`` — the same during training (``eval.every``), with the best checkpoint kept;
- ``memorization`` — nearest training images of samples against held-out images (copies);
- ``nll`` — bits per dimension: the variational bound and the probability-flow ODE.

The command line is :mod:`difflo.cli.eval`.
"""
from __future__ import annotations

FEATURES = ("inception", "classifier")     # the feature extractors (fid.make_extractor): --features, eval.features
