"""Configs: random YAML documents, wrong types, misspelled keys, out-of-range values -> one line, exit 2."""
import dataclasses
import typing

import pytest
import yaml
from hypothesis import assume, given
from hypothesis import strategies as st

from difflo import config as config_mod
from difflo.errors import ConfigError, DiffloError
from difflo.model import build_net
from conftest import TINY
from inputcheck import assert_clean_error, call, fuzz, tally

KEYS = config_mod.all_keys()
SECTIONS = [f.name for f in dataclasses.fields(config_mod.Config)]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=6))
names = st.one_of(st.sampled_from(SECTIONS), st.sampled_from([k.split(".")[1] for k in KEYS]), st.text(max_size=6))
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                         st.dictionaries(names, inner, max_size=4), max_leaves=12)


def yaml_value(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def field_type(key: str):
    section, name = key.split(".")
    return typing.get_type_hints(type(getattr(config_mod.Config(), section)))[name]


@pytest.mark.slow
@fuzz(60)
@given(doc=st.one_of(documents.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), st.text(max_size=80),
                     st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_random_yaml_documents(tmp_path, doc):
    """Any file given as --config: a config error (train.steps=0 makes sure nothing trains)."""
    tally("config: random YAML documents")
    path = tmp_path / "random.yaml"
    path.write_text(doc, encoding="utf-8", errors="surrogateescape")
    code, out, err = call(["train", "--config", path, "train.steps=0", "--out", tmp_path / "run"])
    assert_clean_error(code, err)


def misspell(name: str, data) -> str:
    i = data.draw(st.integers(0, len(name) - 1))
    letter = data.draw(st.sampled_from("abcdefghijklmnopqrstuvwxyz_"))
    op = data.draw(st.sampled_from(["delete", "insert", "replace", "swap"]))
    if op == "delete":
        return name[:i] + name[i + 1:]
    if op == "insert":
        return name[:i] + letter + name[i:]
    if op == "swap" and i + 1 < len(name):
        return name[:i] + name[i + 1] + name[i] + name[i + 2:]
    return name[:i] + letter + name[i + 1:]


@pytest.mark.slow
@fuzz(100)
@given(key=st.sampled_from([k for k in KEYS if len(k.split(".")[1]) >= 3]), data=st.data(),
       in_file=st.booleans())
def test_misspelled_keys_suggest_the_closest(tmp_path, key, data, in_file):
    section, name = key.split(".")
    wrong = misspell(name, data)
    assume(f"{section}.{wrong}" not in KEYS)
    tally("config: misspelled keys")
    if in_file:
        path = tmp_path / "typo.yaml"
        path.write_text(yaml.safe_dump({section: {wrong: 1}}))
        argv = ["train", "--config", path]
    else:
        argv = ["train", f"{section}.{wrong}=1"]
    code, out, err = call(argv + ["--out", tmp_path / "run"])
    assert_clean_error(code, err, f"unknown config key '{section}.{wrong}'", f"did you mean {key}?")


@pytest.mark.parametrize("typo, suggestion", [("trian.lr=1", "did you mean train.lr?"),
                                              ("modle.channels=8", "did you mean model.channels?"),
                                              ("train=1", "did you mean train"), ("lr=1e-3", "train.lr")])
def test_misspelled_sections(tmp_path, typo, suggestion):
    tally("config: misspelled keys")
    assert_clean_error(*call(["train", typo, "--out", tmp_path / "run"])[::2], suggestion)


def wrong_values(tp):
    """Values of a type the field does not accept."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, __import__("types").UnionType):
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    words = st.text(min_size=1, max_size=6).filter(lambda s: yaml.safe_load(yaml_value(s)) == s)
    nested = st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2)
    if tp is bool:
        return st.one_of(st.integers(), words, nested, st.lists(st.booleans(), max_size=2))
    if tp is int:
        return st.one_of(words.filter(lambda s: not _is_number(s)), nested, st.booleans(),
                         st.floats(allow_nan=False).filter(lambda f: not f.is_integer()), st.lists(st.integers()))
    if tp is float:
        return st.one_of(words.filter(lambda s: not _is_number(s)), nested, st.booleans(),
                         st.lists(st.floats(), min_size=1, max_size=2), st.sampled_from([".nan", ".inf", "-.inf"]))
    if tp is str:
        return st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), nested,
                         st.lists(st.text(max_size=2), min_size=1, max_size=2))
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is str:
        return st.one_of(st.integers(), nested, st.lists(st.integers(), min_size=1, max_size=2))
    if typing.get_origin(tp) is tuple:
        return st.one_of(words, nested, st.lists(words.filter(lambda s: not _is_number(s)), min_size=1, max_size=2))
    raise AssertionError(tp)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


@pytest.mark.slow
@fuzz(100)
@given(data=st.data(), key=st.sampled_from(KEYS))
def test_wrong_types(tmp_path, data, key):
    value = data.draw(wrong_values(field_type(key)))
    tally("config: wrong types")
    text = value if isinstance(value, str) and value.startswith(".") else yaml_value(value)
    code, out, err = call(["train", f"{key}={text}", "--out", tmp_path / "run"])
    line = assert_clean_error(code, err, key)
    assert any(s in line for s in ("must be of type", "must be a list", "must be a finite number")), line


@pytest.mark.parametrize("override, needle", [
    ("train.lr=-0.001", "train.lr=-0.001 must be > 0"), ("train.steps=0", "train.steps=0 must be > 0"),
    ("train.batch_size=0", "train.batch_size=0 must be > 0"), ("train.lr=.nan", "must be a finite number"),
    ("train.lr=1e999", "must be a finite number"), ("train.ema_decay=1.5", "must be in [0, 1]"),
    ("train.label_dropout=-0.1", "must be in [0, 1]"), ("train.adam_betas=[0.9,1.0]", "must lie in [0, 1)"),
    ("train.adam_betas=[0.9]", "two values"), ("train.seed=-1", "train.seed=-1 must be in"),
    ("train.seed=99999999999999999999", "must be in 0..2^32-1"), ("train.max_minutes=0", "must be > 0"),
    ("train.keep_checkpoints=0", "must be > 0"), ("train.max_nonfinite_steps=0", "must be > 0"),
    ("train.warmup_steps=-1", "must be >= 0"), ("train.grad_clip=-1", "must be >= 0"),
    ("model.channel_mult=[1,2,2,2]", "model.image_size=28 is not divisible by 2^(levels-1)=8"),
    ("model.channel_mult=[]", "must be positive"), ("model.channels=0", "must be positive"),
    ("model.attn_heads=0", "model.attn_heads must be >= 1"), ("model.attn_heads=3", "must divide"),
    ("model.attn_resolutions=[5]", "not one of the UNet's feature-map sizes"), ("model.dropout=1", "[0, 1)"),
    ("model.num_res_blocks=0", "must be >= 1"), ("diffusion.timesteps=0", "must be > 0"),
    ("sample.steps=2000", "exceeds diffusion.timesteps=1000"), ("diffusion.objective=flow", "prediction"),
    ("diffusion.schedule=cosin", "is not one of"), ("diffusion.logit_std=0", "must be > 0"),
    ("data.image_size=30", "model.image_size=30 is not divisible by 2^(levels-1)=4"),
    ("data.image_size=0", "must be a positive number of pixels"), ("data.name=mnist11k", "unknown data set"),
    ("data.attribute=Smiling", "only for celeba"), ("data.split=validation", "split"),
    ("train.device=tpu", "unknown device"),
])
def test_out_of_range_values(tmp_path, override, needle):
    tally("config: out-of-range values")
    code, out, err = call(["train", override, "--out", tmp_path / "run"])
    assert_clean_error(code, err, needle)
    assert not (tmp_path / "run").exists()                       # refused before the run directory exists


scalar_values = st.one_of(st.integers(-3, 64), st.floats(-2, 70), st.booleans(), st.none(), st.text(max_size=5),
                          st.lists(st.integers(-2, 32), max_size=4), st.sampled_from(["linear", "cosine", "flow",
                                                                                      "x0", "eps", "u", "min_snr"]))


@pytest.mark.slow
@fuzz(200)
@given(pairs=st.lists(st.tuples(st.sampled_from([k for k in KEYS if not k.startswith("data.")]), scalar_values),
                      min_size=1, max_size=4))
def test_random_overrides_fail_cleanly_or_build(pairs):
    """Anything the config layer accepts must also build a network; everything else is a ConfigError."""
    tally("config: random overrides")
    try:
        cfg = config_mod.load(None, [f"{k}={yaml_value(v)}" for k, v in pairs])
        cfg.validate()
    except ConfigError:
        return
    if cfg.model.channels * max(cfg.model.channel_mult) <= 512:
        build_net(cfg)


small = {"model.channels": st.sampled_from([4, 8, 12]), "model.channel_mult": st.sampled_from([[1], [1, 2], [2, 1]]),
         "model.num_res_blocks": st.integers(1, 2), "model.attn_resolutions": st.sampled_from([[], [14], [28], [7]]),
         "model.attn_heads": st.integers(1, 4), "model.dropout": st.floats(0, 0.99),
         "diffusion.objective": st.sampled_from(["diffusion", "flow"]),
         "diffusion.schedule": st.sampled_from(["linear", "cosine", "sigmoid", "quadratic"]),
         "diffusion.timesteps": st.integers(1, 2000), "diffusion.prediction": st.sampled_from(["eps", "x0", "v", "u"]),
         "diffusion.loss_weighting": st.sampled_from(["none", "min_snr"]),
         "diffusion.min_snr_gamma": st.floats(0, 1e6), "diffusion.t_sampling": st.sampled_from(["uniform",
                                                                                                "logit_normal"]),
         "diffusion.logit_mean": st.floats(-30, 30), "diffusion.logit_std": st.floats(1e-6, 100),
         "train.lr": st.floats(1e-12, 1e3), "train.lr_schedule": st.sampled_from(["constant", "cosine",
                                                                                  "exponential"]),
         "train.warmup_steps": st.integers(0, 5), "train.min_lr_ratio": st.floats(0, 1),
         "train.weight_decay": st.floats(0, 1e3), "train.adam_betas": st.lists(st.floats(0, 0.9999), min_size=2,
                                                                               max_size=2),
         "train.grad_clip": st.floats(0, 1e3), "train.label_dropout": st.floats(0, 1), "train.ema_decay": st.floats(0, 1),
         "train.ema_warmup": st.booleans(), "train.batch_size": st.integers(1, 8), "train.seed": st.integers(0, 2**32 - 1),
         "train.steps": st.integers(1, 2)}


@pytest.mark.slow
@fuzz(15)
@given(data=st.data())
def test_valid_random_configs_train_without_a_traceback(tmp_path_factory, data):
    """Random small configs through `difflo train` for 1-2 steps: exit 0, or one clean line."""
    keys = data.draw(st.lists(st.sampled_from(sorted(small)), min_size=1, max_size=6, unique=True))
    overrides = [f"{k}={yaml_value(data.draw(small[k]))}" for k in keys]
    tally("config: random configs trained")
    run = tmp_path_factory.mktemp("cfg")
    code, out, err = call(["train", *TINY, "train.steps=2", "train.ckpt_every=2", *overrides, "--out", run / "run"])
    if code != 0:
        assert_clean_error(code, err)


def test_config_errors_are_diffloerrors():
    assert issubclass(ConfigError, DiffloError)
