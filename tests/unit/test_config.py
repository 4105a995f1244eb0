import pytest

from difflo import config as config_mod
from difflo.errors import ConfigError


def test_defaults_roundtrip_through_yaml(tmp_path):
    cfg = config_mod.Config()
    path = tmp_path / "c.yaml"
    path.write_text(config_mod.dump(cfg))
    assert config_mod.load(path) == cfg
    assert config_mod.from_dict(cfg.to_dict()) == cfg


def test_overrides_are_typed():
    cfg = config_mod.load(None, ["train.lr=1e-3", "model.channel_mult=[1,2]", "train.max_minutes=null",
                                 "sample.clip_x0=false", "train.steps=10"])
    assert cfg.train.lr == 1e-3 and cfg.model.channel_mult == (1, 2)
    assert cfg.train.max_minutes is None and cfg.sample.clip_x0 is False and cfg.train.steps == 10


def test_repo_configs_load_and_validate():
    from pathlib import Path
    configs = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
    assert configs, "configs/ holds no YAML file"
    for path in configs:
        config_mod.load(path).validate()


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1"], "did you mean train.lr"),
    (["trian.lr=1"], "unknown config key"),
    (["train.lr=abc"], "train.lr must be of type float"),
    (["train.steps=1.5"], "train.steps must be of type int"),
    (["model.channel_mult=x"], "model.channel_mult must be a list"),
    (["train.steps"], "not of the form section.key=value"),
    (["sample.clip_x0=3"], "sample.clip_x0 must be of type bool"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_mod.load(None, overrides)


@pytest.mark.parametrize("overrides, message", [
    (["train.steps=0"], "train.steps=0 must be > 0"),
    (["train.lr=-1"], "train.lr=-1.0 must be > 0"),
    (["model.image_size=30"], "not divisible by 2"),
    (["diffusion.schedule=quadratic"], "diffusion.schedule='quadratic' is not one of"),
    (["diffusion.prediction=score"], "diffusion.prediction='score' is not one of"),
    (["train.label_dropout=1.5"], "train.label_dropout=1.5 must be in"),
    (["model.attn_resolutions=[5]"], "not one of the UNet's feature-map sizes"),
    (["sample.step_rule=next"], "sample.step_rule='next' is not one of listed, stride"),
    (["sample.grid_end=zero"], "sample.grid_end='zero' is not one of clean, t0"),
    (["sample.steps_offset=-1"], "sample.steps_offset=-1 must be >= 0"),
    (["sample.spacing=leading", "sample.steps=50", "sample.steps_offset=20"],
     r"sample.steps_offset 20 does not fit leading spacing with 50 steps.*first timestep 1000 <= 999"),
    (["diffusion.objective=flow", "diffusion.prediction=u", "sample.sampler=euler", "sample.step_rule=stride"],
     "step_rule=stride .* objective flow takes 0, listed, clean"),
])
def test_out_of_range_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_mod.load(None, overrides).validate()


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config_mod.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_mod.load(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        config_mod.load(notmap)
    section = tmp_path / "section.yaml"
    section.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="train must be a mapping"):
        config_mod.load(section)
