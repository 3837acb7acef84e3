"""Named training recipes: shipped TOML files that ``boltzflow train --recipe NAME`` starts from.

* ``energy``: the energy-trained route. No reference data: batched parallel tempering with the
  target energy from the input structure (``data.source = "tempering"``), maximum likelihood on its
  frames, every energy evaluation counted. What a chemist runs on their own molecule.
* ``data``: the data route. Maximum likelihood on the system's reference frames (``data.reference``)
  grown by Langevin dynamics.

Both use the all-atom internal-coordinate generator with improper torsions as standardised
coordinates (docs/pipelines.md, "Recipes"). A ``--config`` file and
``--set`` overrides apply on top of the recipe.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from ..errors import ConfigError

_DIR = Path(__file__).parent


def names() -> list[str]:
    """The shipped recipe names."""
    return sorted(p.stem for p in _DIR.glob("*.toml"))


def recipe_path(name: str) -> Path:
    """The TOML file of recipe ``name``; ConfigError naming the valid ones otherwise."""
    path = _DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(names())}")
    return path


def recipe_data(name: str) -> dict[str, Any]:
    """The nested dict of recipe ``name`` (its TOML tables)."""
    return tomllib.loads(recipe_path(name).read_text())


__all__ = ["names", "recipe_path", "recipe_data"]
