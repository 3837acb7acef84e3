"""Population expressions: a small grammar naming regions of configuration space.

Grammar (angles in degrees, ``&`` or ``and`` joins conditions)::

    region     := condition ( ("&" | "and") condition )*
    condition  := coordinate OP number | "mode" ("=" | "==") NAME    NAME: a mode of the system, or for
                                                                   peptides a residue state res<i>_<state>
    coordinate := "phi" | "psi" | "phi<i>" | "psi<i>"        backbone torsions found from the topology
                | "dihedral(a,b,c,d)"                          any torsion by 0-based atom indices
                | "x[i]"                                       coordinate i of flat (n, dim) samples
    OP         := ">" | "<" | ">=" | "<="

Examples: ``phi>0``, ``phi<0 & psi>100``, ``mode=phi_positive``, ``dihedral(4,6,8,14)>0``; for a
peptide (:class:`boltzflow.systems.modes.PeptideModes`) ``mode=any_alpha_L``, ``mode=res1_alpha_R``
(residue ``i`` as in ``phi<i>``/``psi<i>``; states alpha_R, beta_PPII, alpha_L).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import InputError
from ..systems.modes import dihedral
from ..systems.torsions import named_torsions

GRAMMAR = ("expected e.g. 'phi>0', 'psi<-100', 'phi<0 & psi>100', 'mode=phi_positive', "
           "'dihedral(4,6,8,14)>0' or 'x[0]>0' (angles in degrees; OP one of > < >= <=; join with & or and)")

_COND = re.compile(
    r"^\s*(?:(?P<mode>mode)\s*==?\s*(?P<name>[A-Za-z_][\w+\-]*)"
    r"|(?P<coord>dihedral\s*\(\s*\d+\s*,\s*\d+\s*,\s*\d+\s*,\s*\d+\s*\)|x\s*\[\s*\d+\s*\]|[A-Za-z_]\w*)"
    r"\s*(?P<op>>=|<=|>|<)\s*(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))\s*$"
)


@dataclass(frozen=True)
class Region:
    """A parsed region: ``indicator(x) -> (n,) bool`` for ``x: (n, n_atoms, 3)`` nm or ``(n, dim)``."""

    expression: str
    _fn: Callable[[np.ndarray], np.ndarray]

    @property
    def name(self) -> str:
        return self.expression.replace(" ", "")

    def indicator(self, x) -> np.ndarray:
        return np.asarray(self._fn(np.asarray(x)), dtype=bool)

    def __call__(self, x) -> np.ndarray:
        return self.indicator(x)


def parse_region(expression: str, topology=None, modes=None) -> Region:
    """Parse a population expression (grammar in the module docstring) into a :class:`Region`.

    ``topology`` (openmm Topology) resolves phi/psi; ``modes`` (system modes) resolves ``mode=NAME``.
    Raises InputError naming the bad part and the allowed grammar."""
    if not isinstance(expression, str) or not expression.strip():
        raise InputError(f"empty population expression; {GRAMMAR}")
    parts = [p for p in re.split(r"\s*(?:&&?|\band\b)\s*", expression.strip()) if p.strip()]
    fns = [_condition(p, expression, topology, modes) for p in parts]

    def fn(x):
        out = np.ones(len(x), dtype=bool)
        for f in fns:
            out &= f(x)
        return out

    return Region(expression.strip(), fn)


def _condition(text: str, whole: str, topology, modes) -> Callable[[np.ndarray], np.ndarray]:
    m = _COND.match(text)
    if m is None:
        raise InputError(f"cannot parse population expression {whole!r} at {text.strip()!r}; {GRAMMAR}")
    if m.group("mode"):
        name = m.group("name")
        if modes is None:
            raise InputError(f"'{text.strip()}' needs a system with modes; pass --system (alanine-dipeptide, butane, ...)")
        names = list(modes.names)
        extra = list(getattr(modes, "region_names", []))  # per-residue states of peptides
        if name in names:
            i = names.index(name)
            return lambda x: modes.assign(x) == i
        if name in extra:
            return modes.region(name)
        known = ", ".join(names) + (f"; per residue {extra[0]} ... {extra[-1]}" if extra else "")
        raise InputError(f"unknown mode {name!r} in {whole!r}; this system's modes are {known}")
    coord = re.sub(r"\s+", "", m.group("coord"))
    op = m.group("op")
    thr = float(m.group("num"))
    cmp = {">": np.greater, "<": np.less, ">=": np.greater_equal, "<=": np.less_equal}[op]
    if coord.startswith("x["):
        j = int(coord[2:-1])

        def flat(x):
            x = np.asarray(x).reshape(len(x), -1)
            if j >= x.shape[1]:
                raise InputError(f"'{coord}' is out of range for samples with {x.shape[1]} coordinates")
            return cmp(x[:, j], thr)

        return flat
    if coord.startswith("dihedral("):
        atoms = tuple(int(a) for a in coord[len("dihedral("):-1].split(","))
    else:
        atoms = _named_torsion(coord, whole, topology)
    if not -180.0 <= thr <= 180.0:
        raise InputError(f"angle threshold {thr} in {whole!r} must be in [-180, 180] degrees")

    def tors(x):
        x = np.asarray(x)
        if x.ndim != 3:
            raise InputError(f"'{coord}' needs molecular samples (n, n_atoms, 3), got shape {x.shape}")
        if max(atoms) >= x.shape[1]:
            raise InputError(f"'{coord}': atom index {max(atoms)} out of range for {x.shape[1]} atoms")
        return cmp(np.degrees(dihedral(x, atoms)), thr)

    return tors


def _named_torsion(name: str, whole: str, topology) -> tuple[int, int, int, int]:
    if topology is None:
        raise InputError(f"'{name}' in {whole!r} needs the system's topology; pass --system SYSTEM_DIR "
                         "(or use dihedral(a,b,c,d) with atom indices)")

    tors = named_torsions(topology)
    if name not in tors:
        known = ", ".join(sorted(tors)) or "none"
        raise InputError(f"unknown coordinate {name!r} in {whole!r}; this system has torsions: {known}; {GRAMMAR}")
    return tuple(int(a) for a in tors[name])


def torsion_atoms(topology, name: str) -> tuple[int, int, int, int]:
    """Atom indices of named torsion ``name`` ("phi", "psi", ...) of ``topology``."""
    return _named_torsion(name, name, topology)
