"""Named training recipes: shipped TOML files that ``boltzflow train --recipe NAME`` starts from.

* ``energy``: the energy-trained route. No reference data: batched parallel tempering with the
  target energy from the input structure (``data.source = "tempering"``), maximum likelihood on its
  frames, every energy evaluation counted. What a chemist runs on their own molecule.
* ``data``: the data route. Maximum likelihood on the system's reference frames (``data.reference``)
  grown by Langevin dynamics.
* ``peptide``: the energy route for peptides as the shipped tetrapeptide generator was made: a flow whose first
  couplings model the backbone torsions (``generator.lead = "backbone"``), maximum likelihood on 300 K
  tempering frames with rare backbone states drawn more often, then ``logvar_data`` on the same frames;
  ``auto``'s choice for peptides.

All use the all-atom internal-coordinate generator with improper torsions as standardised
coordinates (docs/pipelines.md, "Recipes"). A ``--config`` file and
``--set`` overrides apply on top of the recipe.

``boltzflow train`` with no ``--recipe`` uses ``auto`` (:func:`resolve`): ``data`` when the configuration
names reference frames (``data.reference``, or ``data.source = "reference"``); otherwise, from the structure
alone, ``peptide`` for a peptide of two or more residues with both backbone torsions (phi, psi; e.g. the alanine
tetrapeptide, where it measured best: docs/peptides.md, "The peptide recipe") and ``energy`` for any other
molecule. ``none`` starts from the bare defaults of ``RunConfig``.
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


#: residues with both backbone torsions (phi, psi) from which ``auto`` picks the ``peptide`` recipe
PEPTIDE_MIN_RESIDUES = 2


def peptide_residues(system) -> int:
    """The number of residues of ``system`` (a :class:`~boltzflow.systems.MolecularSystem`) with both backbone
    torsions, phi and psi (0 for molecules without a peptide backbone)."""
    from ..systems.torsions import backbone_torsions

    return sum(1 for t in backbone_torsions(system.topology) if "phi" in t and "psi" in t)


def resolve(name: str | None, config_data: dict[str, Any] | None = None, system=None) -> str | None:
    """The shipped recipe a run starts from, or None for the bare ``RunConfig`` defaults.

    name: a shipped recipe, ``"auto"`` or ``"none"`` (None = ``"none"``). ``"auto"`` picks ``"data"``
    when ``config_data`` (the nested dict of the user's TOML and ``--set`` overrides) names reference
    frames (a non-empty ``data.reference`` or ``data.source = "reference"``); otherwise the molecule is
    trained from its structure alone: ``"peptide"`` when ``system`` has at least :data:`PEPTIDE_MIN_RESIDUES`
    residues with both backbone torsions, ``"energy"`` for any other molecule (or with no ``system``)."""
    if name is None or name == "none":
        return None
    if name == "auto":
        data = (config_data or {}).get("data", {})
        data = data if isinstance(data, dict) else {}
        if data.get("reference") or data.get("source") == "reference":
            return "data"
        return "peptide" if system is not None and peptide_residues(system) >= PEPTIDE_MIN_RESIDUES else "energy"
    recipe_path(name)  # ConfigError for an unknown name
    return name


def recipe_data(name: str) -> dict[str, Any]:
    """The nested dict of recipe ``name`` (its TOML tables)."""
    return tomllib.loads(recipe_path(name).read_text())


__all__ = ["DEFAULT", "PEPTIDE_MIN_RESIDUES", "SPECIAL", "names", "peptide_residues", "recipe_path", "recipe_data",
           "resolve"]
