"""Conformational modes a system declares (used by training metrics, estimators and reports).

A mode set assigns each configuration one label. Molecules use torsion bins (alanine dipeptide:
phi > 0 is the minor mode; butane: trans / gauche+ / gauche- of the C-C-C-C dihedral); toy
targets use the sign of a coordinate; every other peptide gets :class:`PeptideModes` from its
backbone (phi, psi) automatically (:func:`peptide_modes`, used by the PDB and sequence builders).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..core.geometry import dihedral_of
from .torsions import backbone_torsions


def dihedral(x: np.ndarray, atoms: tuple[int, int, int, int]) -> np.ndarray:
    """Dihedral angle in radians, range (-pi, pi], for ``x: (batch, n_atoms, 3)`` (numpy or torch);
    :func:`boltzflow.core.geometry.dihedral_of`."""
    return dihedral_of(x, atoms)


@dataclass(frozen=True)
class TorsionModes:
    """Modes defined by binning one dihedral.

    ``edges`` are bin boundaries in degrees, in increasing order inside (-180, 180]; bin i is
    [edges[i-1], edges[i]) with wrap-around, and ``names[i]`` labels it. ``minor`` names the
    mode whose population is the headline number (e.g. alanine dipeptide's phi > 0).
    """

    #: coordinates are molecular ``(n, n_atoms, 3)`` (:class:`boltzflow.core.protocols.MolecularModeSet`)
    molecular: ClassVar[bool] = True
    atoms: tuple[int, int, int, int]
    edges_deg: tuple[float, ...]
    names: tuple[str, ...]
    minor: str
    coordinate: str = "dihedral"

    def __post_init__(self):
        if len(self.edges_deg) != len(self.names):
            raise ValueError("TorsionModes needs one name per bin (as many names as edges, bins wrap around)")
        if self.minor not in self.names:
            raise ValueError(f"minor mode {self.minor!r} is not one of {self.names}")

    def angle(self, x) -> np.ndarray:
        """The binned dihedral in radians, (batch,)."""
        return dihedral(x, self.atoms)

    def assign(self, x) -> np.ndarray:
        """Mode index per configuration, ``(batch,)`` int, for ``x: (batch, n_atoms, 3)`` nm."""
        deg = np.degrees(self.angle(x))
        edges = np.asarray(self.edges_deg)
        # bin i = [edges[i-1], edges[i]) wrapping: index of the last edge <= deg
        idx = np.searchsorted(edges, deg, side="right") - 1
        return np.where(idx < 0, len(edges) - 1, idx)

    def fractions(self, x) -> dict[str, float]:
        lab = self.assign(x)
        n = max(len(lab), 1)
        return {name: float(np.sum(lab == i)) / n for i, name in enumerate(self.names)}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "torsion", "atoms": list(self.atoms), "edges_deg": list(self.edges_deg),
                "names": list(self.names), "minor": self.minor, "coordinate": self.coordinate}


@dataclass(frozen=True)
class SignModes:
    """Two modes by the sign of coordinate ``index`` of a flat vector ``x: (batch, dim)``."""

    #: coordinates are flat vectors ``(n, dim)`` (a toy target's), not molecules
    molecular: ClassVar[bool] = False
    index: int = 0
    names: tuple[str, ...] = ("negative", "positive")
    minor: str = "negative"

    def assign(self, x) -> np.ndarray:
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        x = np.asarray(x).reshape(len(x), -1)
        return (x[:, self.index] > 0).astype(np.int64)

    def fractions(self, x) -> dict[str, float]:
        lab = self.assign(x)
        n = max(len(lab), 1)
        return {name: float(np.sum(lab == i)) / n for i, name in enumerate(self.names)}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "sign", "index": self.index, "names": list(self.names), "minor": self.minor}


#: per-residue backbone states, in label order (see :func:`backbone_states` for the boundaries)
BACKBONE_STATES = ("alpha_R", "beta_PPII", "alpha_L")
#: whole-molecule states of :class:`PeptideModes`, in label order
PEPTIDE_STATES = ("helix", "extended", "mixed", "any_alpha_L")
#: psi boundaries (degrees) of the alpha_R region for phi < 0: alpha_R is -120 <= psi < 50
ALPHA_R_PSI_DEG = (-120.0, 50.0)


def backbone_states(phi_deg, psi_deg) -> np.ndarray:
    """Backbone state index per (phi, psi) in degrees (arrays of equal shape), into ``BACKBONE_STATES``.

    The Ramachandran plane is split into three regions that cover it completely:

    * ``alpha_R`` (0): phi < 0 and -120 <= psi < 50 (right-handed helix, incl. the bridge region);
    * ``beta_PPII`` (1): phi < 0 and (psi >= 50 or psi < -120) (beta strand, polyproline II and, in
      vacuum, C5 and C7eq);
    * ``alpha_L`` (2): phi >= 0, any psi (left-handed helix and C7ax: alanine dipeptide's minor
      "phi > 0" mode).
    """
    phi = np.asarray(phi_deg, dtype=np.float64)
    psi = np.asarray(psi_deg, dtype=np.float64)
    lo, hi = ALPHA_R_PSI_DEG
    alpha_r = (psi >= lo) & (psi < hi)
    return np.where(phi >= 0.0, 2, np.where(alpha_r, 0, 1)).astype(np.int64)


@dataclass(frozen=True)
class PeptideModes:
    """Backbone conformational states of a peptide: per residue and for the whole molecule.

    ``residues`` lists the residues that have both backbone torsions as ``(index, label, phi_atoms,
    psi_atoms)``; ``index`` is the residue's number in :func:`boltzflow.systems.torsions.backbone_torsions`
    (the ``i`` of ``phi<i>``/``psi<i>`` in population expressions) and ``label`` its residue name and id.

    Per residue, (phi, psi) falls in one of ``BACKBONE_STATES`` (:func:`backbone_states`). The whole
    molecule is in one of ``PEPTIDE_STATES``:

    * ``helix``: every residue alpha_R;
    * ``extended``: every residue beta_PPII;
    * ``mixed``: every residue has phi < 0 but the residues are not all in the same region;
    * ``any_alpha_L``: at least one residue has phi >= 0 (the minor, headline mode; for a
      dipeptide it is "phi > 0").

    Population expressions name the per-residue states as ``mode=res<i>_<state>`` (e.g.
    ``mode=res1_alpha_R``) and the molecule's as ``mode=helix`` etc.
    """

    #: coordinates are molecular ``(n, n_atoms, 3)`` (:class:`boltzflow.core.protocols.MolecularModeSet`)
    molecular: ClassVar[bool] = True
    residues: tuple
    names: tuple[str, ...] = PEPTIDE_STATES
    minor: str = "any_alpha_L"
    coordinate: str = "backbone (phi, psi)"

    def __post_init__(self):
        if not self.residues:
            raise ValueError("PeptideModes needs at least one residue with both phi and psi")
        if tuple(self.names) != PEPTIDE_STATES or self.minor not in self.names:
            raise ValueError(f"PeptideModes names are {PEPTIDE_STATES}")

    @property
    def atoms(self) -> tuple[int, int, int, int]:
        """The first residue's phi atoms (the one torsion a 1D histogram shows)."""
        return tuple(self.residues[0][2])

    @property
    def residue_names(self) -> list[str]:
        """``res<i>`` of every residue with states, in order."""
        return [f"res{r[0]}" for r in self.residues]

    def torsions_deg(self, x) -> tuple[np.ndarray, np.ndarray]:
        """(phi, psi) in degrees, each ``(batch, n_residues)``."""
        phi = np.stack([np.degrees(dihedral(x, tuple(r[2]))) for r in self.residues], axis=1)
        psi = np.stack([np.degrees(dihedral(x, tuple(r[3]))) for r in self.residues], axis=1)
        return phi, psi

    def residue_states(self, x) -> np.ndarray:
        """``(batch, n_residues)`` int index into ``BACKBONE_STATES``."""
        return backbone_states(*self.torsions_deg(x))

    def combinations(self, x) -> np.ndarray:
        """``(batch,)`` int index of the combination of every residue's backbone state: sum over residues r of
        ``state_r * 3 ** r`` (``BACKBONE_STATES`` order), e.g. 27 combinations for three residues."""
        st = self.residue_states(x)
        return st @ (len(BACKBONE_STATES) ** np.arange(st.shape[1], dtype=np.int64))

    def assign(self, x) -> np.ndarray:
        """Whole-molecule state index (into ``names``) per configuration, ``(batch,)`` int."""
        st = self.residue_states(x)
        any_l = np.any(st == 2, axis=1)
        helix = np.all(st == 0, axis=1)
        ext = np.all(st == 1, axis=1)
        return np.where(any_l, 3, np.where(helix, 0, np.where(ext, 1, 2))).astype(np.int64)

    def fractions(self, x) -> dict[str, float]:
        lab = self.assign(x)
        n = max(len(lab), 1)
        return {name: float(np.sum(lab == i)) / n for i, name in enumerate(self.names)}

    @property
    def region_names(self) -> list[str]:
        """Per-residue state names ``res<i>_<state>``, residue by residue."""
        return [f"{r}_{s}" for r in self.residue_names for s in BACKBONE_STATES]

    def region(self, name: str):
        """Indicator ``f(x) -> (batch,) bool`` of a whole-molecule state or ``res<i>_<state>``."""
        if name in self.names:
            i = list(self.names).index(name)
            return lambda x: self.assign(x) == i
        if name not in self.region_names:
            raise KeyError(name)
        k, j = divmod(self.region_names.index(name), len(BACKBONE_STATES))
        return lambda x: self.residue_states(x)[:, k] == j

    def indicators(self, per_residue: bool = True) -> dict[str, Any]:
        """``{name: indicator}`` for the whole-molecule states and (``per_residue``) every residue state."""
        out = {n: self.region(n) for n in self.names}
        if per_residue:
            out.update({n: self.region(n) for n in self.region_names})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "peptide", "names": list(self.names), "minor": self.minor,
                "residues": [{"index": int(i), "label": str(lab), "phi": [int(a) for a in phi],
                              "psi": [int(a) for a in psi]} for i, lab, phi, psi in self.residues],
                "backbone_states": list(BACKBONE_STATES), "alpha_R_psi_deg": list(ALPHA_R_PSI_DEG),
                "coordinate": self.coordinate}


def peptide_modes(topology) -> PeptideModes | None:
    """:class:`PeptideModes` of every residue of ``topology`` with both phi and psi (None if there is none)."""
    res = []
    for i, t in enumerate(backbone_torsions(topology)):
        if "phi" in t and "psi" in t:
            ca = list(topology.atoms())[t["phi"][2]].residue
            res.append((i, f"{ca.name}{ca.id}", tuple(int(a) for a in t["phi"]), tuple(int(a) for a in t["psi"])))
    return PeptideModes(tuple(res)) if res else None


def modes_from_dict(d: dict[str, Any] | None):
    if not d:
        return None
    kind = d.get("kind")
    if kind == "torsion":
        return TorsionModes(tuple(d["atoms"]), tuple(d["edges_deg"]), tuple(d["names"]), d["minor"],
                            d.get("coordinate", "dihedral"))
    if kind == "sign":
        return SignModes(d["index"], tuple(d["names"]), d["minor"])
    if kind == "peptide":
        return PeptideModes(tuple((r["index"], r["label"], tuple(r["phi"]), tuple(r["psi"])) for r in d["residues"]),
                            tuple(d["names"]), d["minor"], d.get("coordinate", "backbone (phi, psi)"))
    raise ValueError(f"unknown mode kind {kind!r}")
