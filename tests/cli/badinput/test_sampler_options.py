"""No silently ignored sampler option: every sampler x option pair, built from the registry.

An option (``difflo.samplers.OPTIONS``: the keywords some registered sampler reads) that the chosen
sampler reads is accepted and acts (``describe`` shows it); one it does not read, set by the user, is
one error line naming the flag and the sampler. The full table runs through ``settings_for`` (what
``difflo sample``, ``eval``, the experiments and the web page call, before any sampling) on untrained
tiny models; a few pairs run through the CLI on the session's tiny run. A value the run's config carries
is a default for whichever sampler reads it: never an error, a note only where the config's own sampler
ignores a non-default value.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_config
from difflo.config import SampleConfig
from difflo.errors import DiffloError
from difflo.model import Model
from difflo.generate import check_settings, describe, settings_for
from difflo.samplers import OPTIONS, SAMPLERS, as_flag, users
from inputcheck import assert_clean_error, call, tally

FLOW = ("diffusion.objective=flow", "diffusion.prediction=u", "sample.sampler=euler")
PAIRS = [(sampler, option) for sampler in SAMPLERS for option in OPTIONS]


def model_of(*overrides: str) -> Model:
    """A model for settings_for, which reads only its config and path (the network is never called)."""
    cfg = tiny_config(*overrides)
    cfg.validate()
    return Model(torch.nn.Identity(), cfg)


@pytest.fixture(scope="module")
def models() -> list[Model]:
    return [model_of(), model_of(*FLOW)]


def test_the_registry_names_its_options():
    """Every sampler option is a sample setting (a flag and a config key) that some sampler reads, and every
    sampler fits one of the two test models (so the table below covers every pair)."""
    fields = {f.name for f in dataclasses.fields(SampleConfig)}
    assert OPTIONS and set(OPTIONS) <= fields
    assert all(users(o) for o in OPTIONS)
    assert {o for s in SAMPLERS.values() for o in s.options} == set(OPTIONS)
    assert set(SAMPLERS) == set(model_of().path.samplers) | set(model_of(*FLOW).path.samplers)


@pytest.mark.parametrize("sampler, option", PAIRS)
def test_every_sampler_option_pair(models, sampler, option):
    tally("sampler options: registry pairs")
    model = next(m for m in models if sampler in m.path.samplers)
    value = getattr(SampleConfig(), option)          # even the default counts, once the user sets it
    if option in SAMPLERS[sampler].options:
        s = settings_for(model, sampler=sampler, **{option: value})
        assert f"{option}={value}" in describe(s)
        return
    with pytest.raises(DiffloError) as e:
        settings_for(model, sampler=sampler, **{option: value})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{as_flag(option)} has no effect with sampler {sampler};"), msg
    fitting = [u for u in users(option) if u in model.path.samplers]
    assert msg.endswith(f"it is used by {', '.join(fitting)}" if fitting else
                        f"it is used by {', '.join(users(option))}, none of which fits this model"), msg
    assert f"{option}=" not in describe(settings_for(model, sampler=sampler))   # never shown where not read


@pytest.mark.parametrize("argv, needles", [
    (["--sampler", "dpmpp_2m_sde", "--eta", "0.5"], ["--eta has no effect with sampler dpmpp_2m_sde; it is used by ddim"]),
    (["--eta", "0.5"], ["--eta has no effect with sampler ddpm (the run's sample.sampler", "--sampler", "ddim"]),
    (["--sampler", "ddim", "--variance", "fixed_large"], ["--variance has no effect with sampler ddim", "ddpm"]),
    (["--sampler", "ddpm", "--s-churn", "1"], ["--s-churn has no effect with sampler ddpm",
                                               "euler, heun, none of which fits this model"]),
    (["--sampler", "dpmpp", "--s-noise", "1.5"], ["--s-noise has no effect with sampler dpmpp"]),
])
def test_sample_cli_refuses_an_option_its_sampler_ignores(tiny_run, tmp_path, argv, needles):
    tally("sampler options: cli refusals")
    out = tmp_path / "x.npz"
    code, _, err = call(["sample", "--ckpt", tiny_run, "--n", "1", "--steps", "2", *argv, "--out", out])
    assert_clean_error(code, err, *needles)
    assert not out.exists()


@pytest.mark.parametrize("sampler, option, value", [("ddim", "eta", "0.5"), ("ddpm", "variance", "fixed_large")])
def test_sample_cli_takes_and_reports_an_option_its_sampler_reads(tiny_run, tmp_path, sampler, option, value):
    code, out, err = call(["sample", "--ckpt", tiny_run, "--n", "1", "--steps", "2", "--sampler", sampler,
                           as_flag(option), value, "--out", tmp_path / "x.npz"])
    assert code == 0, err
    shown = [o for o in OPTIONS if f"{o}=" in out]
    assert shown == [option] and f"{option}={value}" in out, out     # only the options the sampler reads


def test_config_values_are_defaults_for_the_samplers_that_read_them(capsys):
    """A run whose config says sampler ddpm and eta 0.5: eta is ddim's default (no error with any sampler); with
    the config's own sampler, which ignores it, one note; a value set in code that the sampler ignores: an error."""
    model = model_of("sample.eta=0.5", "sample.variance=fixed_large")
    assert settings_for(model, sampler="ddim").eta == 0.5
    assert settings_for(model, sampler="dpmpp").sampler == "dpmpp"
    assert capsys.readouterr().err == ""                                    # another sampler chosen: silent
    s = settings_for(model)
    settings_for(model)
    notes = capsys.readouterr().err.splitlines()
    assert notes == ["note: the run's sample.eta=0.5 has no effect with sampler ddpm; it is used by ddim"], notes
    assert "eta=" not in describe(s) and "variance=fixed_large" in describe(s)
    with pytest.raises(DiffloError, match=r"^eta=0.7 has no effect with sampler ddpm; it is used by ddim$"):
        check_settings(dataclasses.replace(model.cfg.sample, eta=0.7), model)
