"""Named training recipes: shipped TOML files that ``boltzflow train --recipe NAME`` starts from.

* ``energy``: the energy-trained route. No reference data: batched parallel tempering with the
  target energy from the input structure (``data.source = "tempering"``), maximum likelihood on its
  frames, every energy evaluation counted. What a chemist runs on their own molecule.
* ``data``: the data route. Maximum likelihood on the system's reference frames (``data.reference``)
  grown by Langevin dynamics.
* ``peptide``: the energy route for peptides as the shipped tetrapeptide generator was made: a flow whose first
  couplings model the backbone torsions (``generator.lead = "backbone"``), maximum likelihood on 300 K
  tempering frames with rare backbone states drawn more often, then ``logvar_data`` on the same frames.

All use the all-atom internal-coordinate generator with improper torsions as standardised
coordinates (docs/pipelines.md, "Recipes"). A ``--config`` file and
``--set`` overrides apply on top of the recipe.

``boltzflow train`` with no ``--recipe`` uses ``auto`` (:func:`resolve`): ``data`` when the configuration
names reference frames (``data.reference``, or ``data.source = "reference"``), otherwise ``energy``, the
route that needs nothing but the structure. ``none`` starts from the bare defaults of ``RunConfig``.
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
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(names() + list(SPECIAL))}")
    return path


#: the recipe `boltzflow train` starts from when none is named
DEFAULT = "auto"
#: the names :func:`resolve` accepts besides the shipped recipes
SPECIAL = ("auto", "none")


def resolve(name: str | None, config_data: dict[str, Any] | None = None) -> str | None:
    """The shipped recipe a run starts from, or None for the bare ``RunConfig`` defaults.

    name: a shipped recipe, ``"auto"`` or ``"none"`` (None = ``"none"``). ``"auto"`` picks ``"data"``
    when ``config_data`` (the nested dict of the user's TOML and ``--set`` overrides) names reference
    frames (a non-empty ``data.reference`` or ``data.source = "reference"``) and ``"energy"`` otherwise:
    a molecule with no reference frames is trained from its structure alone."""
    if name is None or name == "none":
        return None
    if name == "auto":
        data = (config_data or {}).get("data", {})
        data = data if isinstance(data, dict) else {}
        return "data" if data.get("reference") or data.get("source") == "reference" else "energy"
    recipe_path(name)  # ConfigError for an unknown name
    return name


def recipe_data(name: str) -> dict[str, Any]:
    """The nested dict of recipe ``name`` (its TOML tables)."""
    return tomllib.loads(recipe_path(name).read_text())


__all__ = ["DEFAULT", "SPECIAL", "names", "recipe_path", "recipe_data", "resolve"]
