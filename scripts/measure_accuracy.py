"""Class accuracy of a difflo model's samples, judged by a classifier trained on real digits.

    python scripts/measure_accuracy.py --ckpt runs/demo/run [--per-class 100] [--steps 50] [--w 3]

Trains (once, cached beside the script's --cache path) a small CNN on the mnist10k train split,
reports its accuracy on the 2,000 held-out real digits, then generates --per-class samples of every
digit with DDIM and prints the fraction the classifier assigns to the digit they were asked for.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from difflo import data
from difflo.eval.classifier import accuracy, load_classifier, save_classifier, train_classifier
from difflo.sample import generate, load_model


def get_classifier(cache: Path):
    train, test = data.load("mnist10k", "train"), data.load("mnist10k", "test")
    if cache.exists():
        clf = load_classifier(cache, train.channels, train.num_classes)
    else:
        clf = train_classifier(train)
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_classifier(clf, cache, {"data": "mnist10k/train"})
    x, y = test.batch(range(len(test)))
    real = accuracy(clf, x, y, test.num_classes)
    return clf, real


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--w", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "difflo" / "mnist10k_classifier.safetensors")
    p.add_argument("--json", type=Path, help="also write the result as JSON")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    clf, real = get_classifier(args.cache)
    print(f"classifier accuracy on the 2,000 held-out real mnist10k digits: {real['accuracy']:.4f}")
    model = load_model(args.ckpt)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    t0 = time.time()
    images = generate(model, labels, [args.seed + i for i in range(len(labels))], sampler=args.sampler,
                      steps=args.steps, w=args.w)
    res = accuracy(clf, images, labels, 10)
    res.update(real_test_accuracy=real["accuracy"], sampler=args.sampler, steps=args.steps, w=args.w,
               sampling_seconds=round(time.time() - t0, 1), ckpt=str(args.ckpt))
    print(f"samples: {len(labels)} ({args.per_class} per digit), {args.sampler} {args.steps} steps, w={args.w}: "
          f"class accuracy {res['accuracy']:.4f}")
    print("per digit: " + " ".join(f"{c}:{a:.2f}" for c, a in res["per_class"].items()))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
