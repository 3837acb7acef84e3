from dataclasses import dataclass, field

import pytest

from boltzflow.config import dump_toml, from_dict, load_config, replace
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
    cfg = replace(Cfg(), steps=3, **{"opt.lr": 0.5})
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
