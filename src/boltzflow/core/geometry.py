"""The dihedral (torsion) angle: the one implementation in boltzflow.

:func:`dihedral` works on torch tensors (differentiable; used by the internal-coordinate transform);
:func:`dihedral_of` takes a batch of structures and four atom indices (numpy or torch) and returns
numpy (used by modes, regions, plots, the analysis). The native energy's kernels have their own
dihedral with a hand-written gradient (:mod:`boltzflow.energy.native_kernels`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_EPS = 1e-12


def _norm(v: torch.Tensor) -> torch.Tensor:
    """|v| over the last axis, floored at 1e-6 (finite gradients for coincident atoms)."""
    return torch.sqrt((v * v).sum(-1).clamp_min(_EPS))


def dihedral(xi: torch.Tensor, xj: torch.Tensor, xk: torch.Tensor, xl: torch.Tensor) -> torch.Tensor:
    """Torsion i-j-k-l in radians (-pi, pi], IUPAC sign convention; positions ``(..., 3)`` -> ``(...)``."""
    b0 = xi - xj
    b1 = xk - xj
    b1 = b1 / _norm(b1).unsqueeze(-1)
    b2 = xl - xk
    v = b0 - (b0 * b1).sum(-1, keepdim=True) * b1
    w = b2 - (b2 * b1).sum(-1, keepdim=True) * b1
    x = (v * w).sum(-1)
    y = (torch.cross(b1, v, dim=-1) * w).sum(-1)
    return torch.atan2(y, x)


def dihedral_of(x: np.ndarray | torch.Tensor, atoms: Sequence[int]) -> np.ndarray:
    """Dihedral of atoms ``atoms = (i, j, k, l)`` in radians (-pi, pi], float64 ``(batch,)``, for
    positions ``x: (batch, n_atoms, 3)`` or one structure ``(n_atoms, 3)`` (numpy or torch, any unit)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu", torch.float64)
    else:
        a = np.asarray(x, dtype=np.float64)
        t = torch.from_numpy(a if a.flags.writeable else a.copy())  # read-only arrays (MolecularSystem.positions)
    if t.ndim == 2:
        t = t[None]
    i, j, k, m = (int(a) for a in atoms)
    return dihedral(t[:, i], t[:, j], t[:, k], t[:, m]).numpy()
