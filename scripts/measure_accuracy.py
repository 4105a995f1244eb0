"""Class accuracy of a difflo model's samples, judged by a classifier trained on real digits.

    python scripts/measure_accuracy.py --ckpt runs/demo/run [--per-class 50] [--sampler ddim]
                                       [--steps 50] [--w 3] [--json out.json]

``--sampler``, ``--steps`` and ``--w`` take comma-separated lists; every combination is measured and
printed as a markdown table. The classifier (a small CNN, :mod:`difflo.eval.classifier`) is trained
once on the mnist10k train split and cached; its accuracy on the 2,000 held-out real digits is
printed first. Samples use seeds ``--seed + i``, so every setting sees the same starting noise.
"""
import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from difflo import data
from difflo.eval.classifier import accuracy, load_classifier, save_classifier, train_classifier
from difflo.model import load_model
from difflo.generate import generate, settings_for


def get_classifier(cache: Path):
    train, test = data.load("mnist10k", "train"), data.load("mnist10k", "test")
    if cache.exists():
        clf = load_classifier(cache, train.channels, train.num_classes)
    else:
        clf = train_classifier(train)
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_classifier(clf, cache, {"data": "mnist10k/train"})
    x, y = test.batch(range(len(test)))
    return clf, accuracy(clf, x, y, test.num_classes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--sampler", default=None, help="default: the checkpoint's own sample.sampler")
    p.add_argument("--steps", default="50")
    p.add_argument("--w", default="3")
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "difflo" / "mnist10k_classifier.safetensors")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    args = p.parse_args()
    clf, real = get_classifier(args.cache)
    print(f"classifier accuracy on the 2,000 held-out real mnist10k digits: {real['accuracy']:.4f}")
    model = load_model(args.ckpt)
    samplers = (args.sampler or model.cfg.sample.sampler).split(",")
    labels = torch.arange(10).repeat_interleave(args.per_class)
    seeds = [args.seed + i for i in range(len(labels))]
    results = []
    print(f"| sampler | steps | w | class accuracy | N | seconds |\n|---|---|---|---|---|---|")
    for sampler, steps, w in itertools.product(samplers, args.steps.split(","), args.w.split(",")):
        t0 = time.time()
        images = generate(model, labels, seeds, settings_for(model, sampler=sampler, steps=int(steps), w=float(w)))
        res = accuracy(clf, images, labels, 10)
        res.update(sampler=sampler, steps=int(steps), w=float(w), seconds=round(time.time() - t0, 1))
        results.append(res)
        print(f"| {sampler} | {steps} | {w} | {res['accuracy']:.3f} | {len(labels)} | {res['seconds']} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"ckpt": str(args.ckpt), "real_test_accuracy": real["accuracy"],
                                         "per_class_samples": args.per_class, "results": results}, indent=1))


if __name__ == "__main__":
    main()
