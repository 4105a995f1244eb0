"""Improved precision and recall of a generator in a feature space.

Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative Models",
Eq. 1-2: each feature vector phi' of a set Phi owns a ball whose radius is the distance to its k-th
nearest neighbour in Phi (itself excluded); a vector phi is "covered" by Phi when it lies in at least
one such ball,

    f(phi, Phi) = 1  if  ||phi - phi'||_2 <= ||phi' - NN_k(phi', Phi)||_2  for some phi' in Phi, else 0,

    precision = mean over generated phi_g of f(phi_g, Phi_real)   (samples that look real: fidelity)
    recall    = mean over real phi_r of f(phi_r, Phi_gen)         (real data the samples cover: diversity)

with k = 3 (the paper's choice). Distances are Euclidean, computed in float64 in row blocks; ties
count as covered (``<=``), as in the paper and torch-fidelity's ``prc_features_to_metric`` (whose
argument order this module keeps: generated first, real second).

Both numbers depend on the set sizes (a k-NN ball shrinks as a set grows), so
:func:`difflo.eval.evaluate.score` compares equal numbers of generated and real vectors, as the
paper does, and every result states that N.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import DiffloError

K = 3               # the paper's neighbourhood size
BLOCK = 1024        # rows per distance block: memory BLOCK x N float64


def kth_neighbour_radii(feats: torch.Tensor, k: int = K) -> torch.Tensor:
    """Kynkaanniemi et al. 2019, Eq. 1's radius ||phi' - NN_k(phi', Phi)||: (N,) distance of every row
    to its k-th nearest other row (the (k+1)-th smallest distance, the row itself being the first)."""
    radii = [torch.cdist(block, feats).kthvalue(k + 1, dim=1).values for block in feats.split(BLOCK)]
    return torch.cat(radii)


def covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Kynkaanniemi et al. 2019, Eq. 1: (N,) bool, each row of ``points`` lies within ``radii[j]`` of some
    row j of ``centres``."""
    return torch.cat([(torch.cdist(block, centres) <= radii).any(dim=1) for block in points.split(BLOCK)])


def needs(k: int = K) -> int:
    """The fewest vectors in each set that give every one a k-th nearest other: k + 1."""
    return k + 1


def precision_recall(gen: np.ndarray, real: np.ndarray, k: int = K) -> dict:
    """Kynkaanniemi et al. 2019, Eq. 2: {prc_precision, prc_recall, prc_k, prc_n_gen, prc_n_real} of
    generated vs real (N, d) features. The keys carry ``prc_`` because "precision" already names the numerical precision of a run."""
    g = torch.as_tensor(np.asarray(gen), dtype=torch.float64)
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    if g.ndim != 2 or r.ndim != 2 or g.shape[1] != r.shape[1]:
        raise DiffloError(f"precision/recall need two (N, d) feature arrays of one d, got {tuple(g.shape)} and "
                          f"{tuple(r.shape)}")
    if min(len(g), len(r)) < needs(k):
        raise DiffloError(f"precision/recall with k = {k} neighbours need at least {needs(k)} samples and {needs(k)} "
                          f"reference images, got {len(g)} and {len(r)}")
    precision = covered(g, r, kth_neighbour_radii(r, k)).double().mean().item()
    recall = covered(r, g, kth_neighbour_radii(g, k)).double().mean().item()
    return {"prc_precision": precision, "prc_recall": recall, "prc_k": k, "prc_n_gen": len(g), "prc_n_real": len(r)}
