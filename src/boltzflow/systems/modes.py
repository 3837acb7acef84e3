"""Conformational modes a system declares (used by training metrics, estimators and reports).

A mode set assigns each configuration one label. Molecules use torsion bins (alanine dipeptide:
phi > 0 is the minor mode; butane: trans / gauche+ / gauche- of the C-C-C-C dihedral); toy
targets use the sign of a coordinate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def dihedral(x: np.ndarray, atoms: tuple[int, int, int, int]) -> np.ndarray:
    """Dihedral angle in radians, range (-pi, pi], for ``x: (batch, n_atoms, 3)`` (numpy or torch)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    p0, p1, p2, p3 = (x[:, a] for a in atoms)
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1n = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    v = b0 - np.sum(b0 * b1n, axis=-1, keepdims=True) * b1n
    w = b2 - np.sum(b2 * b1n, axis=-1, keepdims=True) * b1n
    xx = np.sum(v * w, axis=-1)
    yy = np.sum(np.cross(b1n, v) * w, axis=-1)
    return np.arctan2(yy, xx)


@dataclass(frozen=True)
class TorsionModes:
    """Modes defined by binning one dihedral.

    ``edges`` are bin boundaries in degrees, in increasing order inside (-180, 180]; bin i is
    [edges[i-1], edges[i]) with wrap-around, and ``names[i]`` labels it. ``minor`` names the
    mode whose population is the headline number (e.g. alanine dipeptide's phi > 0).
    """

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


def modes_from_dict(d: dict[str, Any] | None):
    if not d:
        return None
    kind = d.get("kind")
    if kind == "torsion":
        return TorsionModes(tuple(d["atoms"]), tuple(d["edges_deg"]), tuple(d["names"]), d["minor"],
                            d.get("coordinate", "dihedral"))
    if kind == "sign":
        return SignModes(d["index"], tuple(d["names"]), d["minor"])
    raise ValueError(f"unknown mode kind {kind!r}")
