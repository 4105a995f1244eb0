"""Evaluation during training (``eval.every = K``): every K steps the EMA weights sample ``eval.n``
class-balanced images (the run's sampler and w, ``eval.steps`` steps, seeds fixed across
evaluations) and are scored by a Frechet distance (``fd_classifier`` or Inception ``fid``) against
reference statistics of ``eval.ref_split``, by KID (``kd_classifier`` or ``kid``) and precision/recall
against the reference features, and by class accuracy. The numbers go to
``RUN/metrics.csv`` (rows with an empty loss) and ``RUN/eval.csv``; the checkpoint with the lowest
distance is kept as ``RUN/best/`` (copied atomically, with ``best/eval.json``).
"""
from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

from .. import data as data_mod
from ..errors import DiffloError
from ..io import atomic_dir
from . import evaluate, fid as fid_mod
from .classifier import classifier_path_for, train_and_save

EVAL_METRICS = ["fid", "fd_classifier", "class_accuracy", "kid", "kd_classifier", "prc_precision", "prc_recall"]
EVAL_FIELDS = ["step", *EVAL_METRICS, "kid_std", "kd_classifier_std", "kid_subset_size", "n", "seconds"]


def csv_value(key: str, v):
    """A result as CSV text: 4 decimals, 6 for the kernel distances (KID is ~1e-3 for good models)."""
    if not isinstance(v, float):
        return v
    return f"{v:.6f}" if key.startswith(("kid", "kd_")) else f"{v:.4f}"


class Judge:
    """What scores a data set's samples: its classifier (class accuracy), a feature extractor and the
    reference statistics of ``eval.ref_split`` (cached as ``ref_dir/eval_ref_<features>.npz``).
    Shared by the periodic evaluation and ``difflo experiment``."""

    def __init__(self, cfg, ref_dir: Path, device, log=print):
        e, d = cfg.eval, cfg.data
        self.cfg, self.ref_dir, self.log = cfg, Path(ref_dir), log
        self.classifier = None
        self.categories = None            # each class's category (emoji subcategories): adds category accuracy
        if cfg.model.num_classes > 0:
            self.classifier = Path(e.classifier) if e.classifier else classifier_path_for(d)
            if not self.classifier.is_file():
                if e.classifier:
                    raise DiffloError(f"eval.classifier={e.classifier}: no such file (make one with "
                                      f"`difflo eval train-classifier --data {d.name} --out {e.classifier}`)")
                log(f"eval: training the {d.name} classifier once (cached at {self.classifier})")
                train_and_save(d.name, self.classifier, root=d.root, image_size=d.image_size, log=log,
                               cache_dir=d.cache_dir, **data_mod.options_of(d))
        if e.features == "classifier":
            if self.classifier is None:
                raise DiffloError("eval.features=classifier needs a labelled data set; use eval.features=inception")
            self.extractor = fid_mod.ClassifierFeatures(self.classifier, device)
        else:
            self.extractor = fid_mod.InceptionFeatures(None, device)
        self.metric = fid_mod.metric_name(self.extractor)
        self.ref = self._reference()

    def _reference(self) -> dict:
        e, d = self.cfg.eval, self.cfg.data
        path = self.ref_dir / f"eval_ref_{e.features}.npz"
        if path.is_file():
            st = fid_mod.load_stats(path)
            if st["extractor"] == self.extractor.name and "features" in st:   # older caches lack the features
                return st
        ds = data_mod.load_split(d, e.ref_split)
        t0 = time.time()
        st = evaluate.reference_stats(ds, self.extractor, e.ref_n)
        self.ref_dir.mkdir(parents=True, exist_ok=True)
        fid_mod.save_stats(path, st["mu"], st["sigma"], st["n"], st["extractor"], st["features"], data=d.name,
                           split=e.ref_split)
        self.log(f"eval: reference statistics of {d.name}/{e.ref_split} ({st['n']} images, {self.extractor.name}) "
                 f"in {time.time() - t0:.0f}s -> {path}")
        return st

    def score(self, images, labels) -> dict:
        """{metric, KID, precision, recall, class_accuracy, per_class, n, ...} of uint8 (N, H, W, C) samples."""
        return evaluate.score(images, labels, ref=self.ref, extractor=self.extractor, classifier=self.classifier,
                              categories=self.categories)


class PeriodicEval:
    def __init__(self, cfg, run_dir: Path, device, log=print):
        self.cfg, self.run_dir, self.log = cfg, Path(run_dir), log
        self.judge = Judge(cfg, run_dir, device, log)
        self.metric = self.judge.metric
        best = self.run_dir / "best" / "eval.json"
        self.best = json.loads(best.read_text())[self.metric] if best.is_file() else float("inf")

    def __call__(self, model, step: int) -> dict:
        """Score the model (a :class:`difflo.generate.Model` over the EMA net) at this step."""
        e = self.cfg.eval
        t0 = time.time()
        images, labels, _ = evaluate.generate_samples(model, e.n, e.seed, steps=e.steps)
        res = self.judge.score(images, labels)
        res["seconds"] = round(time.time() - t0, 1)
        path = self.run_dir / "eval.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, EVAL_FIELDS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({"step": step, **{k: csv_value(k, v) for k, v in res.items()}})
        acc = f", class accuracy {res['class_accuracy']:.3f}" if "class_accuracy" in res else ""
        kid = fid_mod.kid_metric_name(self.judge.extractor)
        self.log(f"eval at step {step}: {self.metric} {res[self.metric]:.3f}, {kid} {res[kid]:.5f}, precision "
                 f"{res['prc_precision']:.3f}, recall {res['prc_recall']:.3f}{acc} (N={e.n}, {e.steps} steps, "
                 f"{res['seconds']:.0f}s)")
        return res

    def is_best(self, res: dict) -> bool:
        return res[self.metric] < self.best

    def keep_best(self, ckpt: Path, res: dict, step: int) -> None:
        """Copy the checkpoint directory to RUN/best (via a temporary name, so it is always whole)."""
        self.best = res[self.metric]
        final = self.run_dir / "best"
        with atomic_dir(final) as tmp:
            shutil.copytree(ckpt, tmp, dirs_exist_ok=True)
            (tmp / "eval.json").write_text(json.dumps({"step": step, **res}, default=str))
        self.log(f"eval: best {self.metric} so far ({self.best:.3f} at step {step}) -> {final}")
