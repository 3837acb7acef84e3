from dataclasses import dataclass, field, replace

import pytest

from boltzflow.config import dump_toml, from_dict, load_config
from boltzflow.errors import ConfigError


@dataclass(frozen=True)
class Opt:
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)


@dataclass(frozen=True)
class Cfg:
    steps: int = 10
    name: str = "run"
    opt: Opt = field(default_factory=Opt)


def test_toml_round_trip(tmp_path):
    cfg = replace(Cfg(), steps=3, opt=Opt(lr=0.5))
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(cfg))
    assert load_config(Cfg, p) == cfg


def test_overrides_and_int_to_float():
    cfg = load_config(Cfg, overrides={"opt.lr": 1, "steps": 7})
    assert cfg.opt.lr == 1.0 and isinstance(cfg.opt.lr, float) and cfg.steps == 7


def test_unknown_key_is_error():
    with pytest.raises(ConfigError, match="stepz"):
        from_dict(Cfg, {"stepz": 1})
    with pytest.raises(ConfigError, match="opt"):
        from_dict(Cfg, {"opt": {"lrr": 1}})


def test_wrong_type_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="steps"):
        from_dict(Cfg, {"steps": "many"})
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(Cfg, bad)


@dataclass(frozen=True)
class Parent:
    first: Opt = Opt(lr=0.5)
    second: Opt = field(default_factory=lambda: Opt(betas=(0.1, 0.2)))


def test_partial_table_keeps_parent_default():
    p = from_dict(Parent, {"first": {"betas": [0.3, 0.4]}, "second": {"lr": 2.0}})
    assert p.first == Opt(lr=0.5, betas=(0.3, 0.4))
    assert p.second == Opt(lr=2.0, betas=(0.1, 0.2))


def test_run_config_partial_training_table_keeps_defaults():
    from boltzflow.pipeline import load_run_config

    cfg = load_run_config(overrides={"training.pretrain.steps": 5})
    assert cfg.training.pretrain.loss == "klz" and cfg.training.pretrain.steps == 5
    assert cfg.training.pretrain.penalty_weight == 1.0
