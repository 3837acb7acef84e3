"""Internal coordinates: Cartesian <-> (bonds, angles, torsions) with exact log-determinants.

Layouts (flat vectors, ``(batch, dim)``):

* :class:`InternalCoordinates` over an m-atom Z-matrix: ``dim = 3m - 6`` laid out as
  ``[bonds (m-1) | angles (m-2) | torsions (m-3)]``. Bonds and angles are standardised
  (``z = (value - mean) / std``, mean/std fitted on data with :meth:`fit`); torsions are raw
  radians in [-pi, pi) and are periodic: :attr:`circular` lists their indices.
  ``fixed_torsions`` (indices into the torsion block) are not periodic coordinates but standardised
  deviations from their mean, ``z = wrap(t - mean) / std``: improper-like torsions whose value is
  fixed by chemistry (a sibling substituent, a chiral centre's handedness, a methyl hydrogen's place
  relative to its sibling; :func:`improper_torsions` finds them in a Z-matrix). A flow then models a
  narrow peak instead of a whole circle and cannot flip a chiral centre or permute hydrogens; the
  map is a bijection onto ``mean +- pi`` (values beyond ``pi / std`` standard deviations, more than
  ~15 for any fitted std, are wrapped: their density is below ``exp(-100)``).
  The 6 rigid-body dofs (position of the first atom, orientation of the first bond, rotation
  about it) are not part of the flat vector: ``forward`` places the molecule in a canonical
  frame (or the frame given by ``rigid``).
* :class:`LocalFrames` places a set of atoms (hydrogens) given the others: ``dim = 3 n_h``
  laid out ``[bonds | angles | torsions]`` the same way; torsions circular.

Log-determinants (``forward``: flat z -> Cartesian, ``log|det dx/dz|``, shape (batch,)):
``sum log std`` of the standardisation plus the NeRF volume element ``r^2 sin(theta)`` of every
atom placed by (r, theta, phi); the second atom (placed by r and the rigid orientation)
contributes ``r^2`` and the third ``r^2 sin(theta)``. With uniform rigid-body dofs, this is
the Jacobian that makes ``log p(x) = log p(z) - logdet`` the density of Cartesian
configurations modulo rotations/translations, so ``-u(x) - log p(x)`` are correct importance
weights. (The full 3m x 3m Jacobian including the rigid dofs ``(t, alpha, beta, psi)`` is this
times ``sin(alpha)``, the orientation measure; tests check exactly that with autograd.)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..core.bijection import Bijection
from ..core.geometry import dihedral
from ..errors import InputError
from .zmatrix import ZMatrix, _levels

_EPS = 1e-12


# ---- geometry ------------------------------------------------------------------------------
def _norm(v: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((v * v).sum(-1).clamp_min(_EPS))


def bond_length(xi: torch.Tensor, xj: torch.Tensor) -> torch.Tensor:
    """|xi - xj|, (..., 3) -> (...)."""
    return _norm(xi - xj)


def bond_angle(xi: torch.Tensor, xj: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
    """Angle i-j-k in radians [0, pi], (..., 3) -> (...). atan2 form (stable near 0 and pi)."""
    a, b = xi - xj, xk - xj
    return torch.atan2(_norm(torch.cross(a, b, dim=-1)), (a * b).sum(-1))


def nerf(xl: torch.Tensor, xk: torch.Tensor, xj: torch.Tensor, r: torch.Tensor, theta: torch.Tensor,
         phi: torch.Tensor) -> torch.Tensor:
    """Place atom i with |i-j| = r, angle(i, j, k) = theta, dihedral(i, j, k, l) = phi.

    xl, xk, xj: (..., 3) nm; r, theta, phi: (...) -> (..., 3) nm. Inverse of
    (:func:`bond_length`, :func:`bond_angle`, :func:`dihedral`). Volume element r^2 sin(theta).
    """
    bc = xj - xk
    bc = bc / _norm(bc).unsqueeze(-1)
    n = torch.cross(xk - xl, bc, dim=-1)
    n = n / _norm(n).unsqueeze(-1)
    m = torch.cross(n, bc, dim=-1)
    st = torch.sin(theta)
    d = (-r * torch.cos(theta)).unsqueeze(-1) * bc + (r * st * torch.cos(phi)).unsqueeze(-1) * m \
        + (r * st * torch.sin(phi)).unsqueeze(-1) * n
    return xj + d


def wrap_angle(phi: torch.Tensor) -> torch.Tensor:
    """Map angles to [-pi, pi)."""
    return torch.remainder(phi + math.pi, 2 * math.pi) - math.pi


def _as_index(a, device=None) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.int64), device=device)


class _Standardizer(nn.Module):
    """Affine standardisation of bonds and angles: value = mean + std * z (buffers)."""

    def __init__(self, bond_mean, angle_mean, bond_std: float, angle_std: float):
        super().__init__()
        bm = torch.as_tensor(np.asarray(bond_mean, dtype=np.float64))
        am = torch.as_tensor(np.asarray(angle_mean, dtype=np.float64))
        self.register_buffer("bond_mean", bm.clone())
        self.register_buffer("bond_std", torch.full_like(bm, float(bond_std)))
        self.register_buffer("angle_mean", am.clone())
        self.register_buffer("angle_std", torch.full_like(am, float(angle_std)))

    def fit(self, bonds: torch.Tensor, angles: torch.Tensor, min_bond_std: float = 1e-3, min_angle_std: float = 1e-2):
        """bonds: (n, nb) nm, angles: (n, na) rad measured on data."""
        with torch.no_grad():
            self.bond_mean.copy_(bonds.mean(0).to(self.bond_mean))
            self.angle_mean.copy_(angles.mean(0).to(self.angle_mean))
            if bonds.shape[0] > 1:
                self.bond_std.copy_(bonds.std(0).clamp_min(min_bond_std).to(self.bond_std))
                self.angle_std.copy_(angles.std(0).clamp_min(min_angle_std).to(self.angle_std))

    def log_scale(self) -> torch.Tensor:
        """sum of log std over bonds and angles (scalar)."""
        return torch.log(self.bond_std).sum() + torch.log(self.angle_std).sum()


class InternalCoordinates(Bijection):
    """Bijection flat internal coordinates (batch, 3m-6) <-> Cartesian (batch, m, 3) nm.

    zmatrix: a full :class:`ZMatrix` (rows 0-2 are the frame atoms) over atom indices of the
        input file; ``atoms`` (m,) gives the order of the Cartesian output (default: sorted
        ``zmatrix.order``). reference: (m, 3) nm coordinates (in ``atoms`` order) used for the
        default standardisation means.
    """

    def __init__(self, zmatrix: ZMatrix, reference: np.ndarray, atoms=None, bond_std: float = 0.005,
                 angle_std: float = 0.05, fixed_torsions=(), torsion_std: float = 0.15, whiten: bool = False):
        super().__init__()
        atoms = np.sort(zmatrix.order) if atoms is None else np.asarray(atoms, dtype=np.int64)
        if sorted(atoms.tolist()) != sorted(zmatrix.order.tolist()):
            raise InputError("atoms must be a permutation of the Z-matrix atoms")
        m = len(atoms)
        self.m = m
        self.dim = 3 * m - 6
        local = {int(a): p for p, a in enumerate(atoms)}
        rows = np.vectorize(lambda a: local.get(int(a), -1))(zmatrix.rows)
        rows = np.where(zmatrix.rows < 0, -1, rows)
        self.register_buffer("rows", _as_index(rows))
        rest = rows[3:]
        self._levels = [torch.as_tensor(lv + 3) for lv in _levels(rest, set(rows[:3, 0].tolist()))] if m > 3 else []
        self.atoms = atoms
        ref = torch.as_tensor(np.array(reference, dtype=np.float64)).reshape(1, m, 3)
        b, a, _, _ = self._measure(ref)
        self.std = _Standardizer(b[0], a[0], bond_std, angle_std)
        fixed = sorted({int(q) for q in fixed_torsions})
        if any(not 0 <= q < max(m - 3, 0) for q in fixed):
            raise InputError(f"fixed_torsions must index the {max(m - 3, 0)} torsions, got {fixed}")
        # buffers only when used, so checkpoints of generators without them keep loading
        if fixed:
            _, _, t_ref, _ = self._measure(ref)
            self.register_buffer("fixed_idx", torch.as_tensor(fixed, dtype=torch.long))
            self.register_buffer("fixed_mean", t_ref[0, fixed].clone())
            self.register_buffer("fixed_std", torch.full((len(fixed),), float(torsion_std), dtype=torch.float64))
        else:
            self.fixed_idx = None
        fset = set(fixed)
        self.circular = [2 * m - 3 + q for q in range(m - 3) if q not in fset]
        self.fixed = [2 * m - 3 + q for q in fixed]
        # optional whitening of the non-periodic block (bonds, angles, fixed torsions): z = L^-1 v with
        # L L^T the correlation matrix of the standardised coordinates on the fitting data
        self.whiten = bool(whiten)
        if self.whiten:
            lin = list(range(2 * m - 3)) + self.fixed
            self.register_buffer("white_idx", torch.as_tensor(lin, dtype=torch.long))
            self.register_buffer("white_L", torch.eye(len(lin), dtype=torch.float64))

    # ---- internals --------------------------------------------------------------------------
    def _measure(self, x: torch.Tensor):
        """x: (batch, m, 3) -> bonds (batch, m-1), angles (batch, m-2), torsions (batch, m-3), rigid (batch, 6)."""
        R = self.rows
        i, j, k, l = R[:, 0], R[:, 1], R[:, 2], R[:, 3]
        bonds = bond_length(x[:, i[1:]], x[:, j[1:]])
        angles = bond_angle(x[:, i[2:]], x[:, j[2:]], x[:, k[2:]])
        tors = dihedral(x[:, i[3:]], x[:, j[3:]], x[:, k[3:]], x[:, l[3:]])
        # rigid dofs: position of atom 0, orientation (alpha, beta) of atom1 - atom0, psi of atom 2
        # one-element slices, not 0-d tensor indices: those read the index back to the host (a device sync,
        # which also breaks CUDA-graph capture of a training step)
        x0, x1 = x[:, i[0:1]].squeeze(1), x[:, i[1:2]].squeeze(1)
        u = (x1 - x0) / _norm(x1 - x0).unsqueeze(-1)
        alpha = torch.acos(u[:, 2].clamp(-1.0, 1.0))
        beta = torch.atan2(u[:, 1], u[:, 0])
        e = self._perp(alpha, beta)
        xk2 = x[:, k[2:3]].squeeze(1)
        psi = dihedral(x[:, i[2:3]].squeeze(1), x[:, j[2:3]].squeeze(1), xk2, xk2 + e)
        rigid = torch.cat([x0, alpha[:, None], beta[:, None], psi[:, None]], dim=-1)
        return bonds, angles, tors, rigid

    @staticmethod
    def _perp(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Unit vector d u(alpha, beta)/d alpha, perpendicular to the first bond."""
        ca, sa, cb, sb = torch.cos(alpha), torch.sin(alpha), torch.cos(beta), torch.sin(beta)
        return torch.stack([ca * cb, ca * sb, -sa], dim=-1)

    def _split(self, z: torch.Tensor):
        m = self.m
        return z[:, : m - 1], z[:, m - 1 : 2 * m - 3], z[:, 2 * m - 3 :]

    # ---- public -------------------------------------------------------------------------------
    def fit(self, x: torch.Tensor) -> "InternalCoordinates":
        """Fit the bond/angle standardisation on data ``x: (n, m, 3)`` nm (``atoms`` order)."""
        x = torch.as_tensor(x, dtype=torch.float64)
        b, a, t, _ = self._measure(x)
        self.std.fit(b, a)
        if self.fixed_idx is not None and x.shape[0] > 1:
            tf = t[:, self.fixed_idx]
            mean = torch.atan2(torch.sin(tf).mean(0), torch.cos(tf).mean(0))
            dev = wrap_angle(tf - mean)
            with torch.no_grad():
                self.fixed_mean.copy_(mean.to(self.fixed_mean))
                self.fixed_std.copy_(dev.pow(2).mean(0).sqrt().clamp_min(1e-2).to(self.fixed_std))
        if self.whiten and x.shape[0] > len(self.white_idx):
            v = self._standardised(x)[0][:, self.white_idx]
            c = torch.cov(v.T)
            with torch.no_grad():
                self.white_L.copy_(torch.linalg.cholesky(c + 1e-6 * torch.eye(len(c), dtype=c.dtype)))
        return self

    def _white_log_det(self, ref: torch.Tensor) -> torch.Tensor:
        """log|det L| of the whitening (0 without it)."""
        if not self.whiten:
            return ref.new_zeros(())
        return torch.log(torch.diagonal(self.white_L)).sum().to(ref)

    def _fixed_log_scale(self, ref: torch.Tensor) -> torch.Tensor:
        return torch.log(self.fixed_std).sum().to(ref) if self.fixed_idx is not None else ref.new_zeros(())

    def default_rigid(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """Canonical frame: atom 0 at the origin, first bond along +x, psi = 0. (n, 6)."""
        r = like.new_zeros(n, 6)
        r[:, 3] = math.pi / 2
        return r

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None, rigid: torch.Tensor | None = None):
        """z: (batch, 3m-6) -> x: (batch, m, 3) nm, logdet = log|det dx/dz| (batch,)."""
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise InputError(f"internal coordinates must have shape (batch, {self.dim}), got {tuple(z.shape)}")
        n = z.shape[0]
        if rigid is None:
            rigid = self.default_rigid(n, z)
        if self.whiten:
            v = z.index_select(1, self.white_idx) @ self.white_L.to(z).T
            z = z.index_copy(1, self.white_idx, v)
        zb, za, tors = self._split(z)
        if self.fixed_idx is not None:
            tf = wrap_angle(self.fixed_mean.to(z) + self.fixed_std.to(z) * tors.index_select(1, self.fixed_idx))
            tors = tors.index_copy(1, self.fixed_idx, tf)
        s = self.std
        bonds = s.bond_mean.to(z) + s.bond_std.to(z) * zb
        angles = s.angle_mean.to(z) + s.angle_std.to(z) * za
        R = self.rows
        x = z.new_zeros(n, self.m, 3)
        x0 = rigid[:, :3]
        alpha, beta, psi = rigid[:, 3], rigid[:, 4], rigid[:, 5]
        sa = torch.sin(alpha)
        u = torch.stack([sa * torch.cos(beta), sa * torch.sin(beta), torch.cos(alpha)], dim=-1)
        x1 = x0 + bonds[:, :1] * u
        x = x.index_copy(1, R[:2, 0], torch.stack([x0, x1], dim=1))
        j2, k2 = R[2, 1], R[2, 2]
        e = self._perp(alpha, beta)
        x2 = nerf(x[:, k2] + e, x[:, k2], x[:, j2], bonds[:, 1], angles[:, 0], psi)
        x = x.index_copy(1, R[2:3, 0], x2[:, None])
        for lv in self._levels:
            rr = R[lv]
            xi = nerf(x[:, rr[:, 3]], x[:, rr[:, 2]], x[:, rr[:, 1]], bonds[:, lv - 1], angles[:, lv - 2], tors[:, lv - 3])
            x = x.index_copy(1, rr[:, 0], xi)
        logdet = 2 * torch.log(bonds.abs()).sum(-1) + torch.log(torch.sin(angles).abs()).sum(-1) + s.log_scale().to(z)
        return x, logdet + self._fixed_log_scale(z) + self._white_log_det(z)

    def inverse(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """x: (batch, m, 3) nm -> z: (batch, 3m-6), logdet = log|det dz/dx| (batch,)."""
        z, logdet, _ = self.to_internal(x)
        return z, logdet

    def to_internal(self, x: torch.Tensor):
        """x: (batch, m, 3) -> (z (batch, 3m-6), log|det dz/dx| (batch,), rigid (batch, 6))."""
        z, logdet, rigid = self._standardised(x)
        if self.whiten:
            v = torch.linalg.solve_triangular(self.white_L.to(z), z.index_select(1, self.white_idx).T, upper=False).T
            z = z.index_copy(1, self.white_idx, v)
        return z, logdet - self._white_log_det(x), rigid

    def _standardised(self, x: torch.Tensor):
        """``to_internal`` before the whitening."""
        if x.dim() != 3 or x.shape[1:] != (self.m, 3):
            raise InputError(f"coordinates must have shape (batch, {self.m}, 3) in nm, got {tuple(x.shape)}")
        bonds, angles, tors, rigid = self._measure(x)
        s = self.std
        zb = (bonds - s.bond_mean.to(x)) / s.bond_std.to(x)
        za = (angles - s.angle_mean.to(x)) / s.angle_std.to(x)
        if self.fixed_idx is not None:
            tf = wrap_angle(tors.index_select(1, self.fixed_idx) - self.fixed_mean.to(x)) / self.fixed_std.to(x)
            tors = tors.index_copy(1, self.fixed_idx, tf)
        z = torch.cat([zb, za, tors], dim=-1)
        logdet = -(2 * torch.log(bonds).sum(-1) + torch.log(torch.sin(angles)).sum(-1) + s.log_scale().to(x))
        return z, logdet - self._fixed_log_scale(x), rigid

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Rigid-motion invariant features of x (batch, m, 3): standardised bonds and angles, cos/sin
        of torsions. (batch, (m-1) + (m-2) + 2(m-3))."""
        z, _, _ = self.to_internal(x)
        zb, za, t = self._split(z)
        if self.fixed_idx is None:
            return torch.cat([zb, za, torch.cos(t), torch.sin(t)], dim=-1)
        tc = t.index_select(1, torch.as_tensor(self.circular, dtype=torch.long, device=z.device) - (2 * self.m - 3))
        return torch.cat([zb, za, t.index_select(1, self.fixed_idx), torch.cos(tc), torch.sin(tc)], dim=-1)

    @property
    def feature_dim(self) -> int:
        return (self.m - 1) + (self.m - 2) + len(self.fixed) + 2 * len(self.circular)


class LocalFrames(nn.Module):
    """Place atoms (hydrogens) in local frames of already placed atoms, with exact log-det.

    zmatrix: a :func:`~boltzflow.transforms.zmatrix.hydrogen_zmatrix` (complete rows (i, j, k, l)
    over input-file atom indices). Works on full coordinate tensors ``(batch, n_atoms, 3)``:
    ``forward(z, x)`` overwrites the rows' atoms of ``x`` and returns (x_new, log|det dx_H/dz|);
    ``inverse(x)`` returns (z, log|det dz/dx_H|). z: (batch, 3 n_h) = [bonds | angles | torsions],
    bonds/angles standardised, torsions radians (circular, :attr:`circular`).
    """

    def __init__(self, zmatrix: ZMatrix, reference: np.ndarray, bond_std: float = 0.005, angle_std: float = 0.05):
        super().__init__()
        self.register_buffer("rows", _as_index(zmatrix.rows))
        self._levels = [torch.as_tensor(lv) for lv in zmatrix.levels]
        self.n_h = int(zmatrix.rows.shape[0])
        self.dim = 3 * self.n_h
        ref = torch.as_tensor(np.array(reference, dtype=np.float64))[None]
        b, a, _ = self.measure(ref)
        self.std = _Standardizer(b[0], a[0], bond_std, angle_std)
        self.circular = list(range(2 * self.n_h, 3 * self.n_h))

    def measure(self, x: torch.Tensor):
        """x: (batch, n_atoms, 3) -> bonds, angles, torsions of the rows, each (batch, n_h)."""
        R = self.rows
        i, j, k, l = R[:, 0], R[:, 1], R[:, 2], R[:, 3]
        return (bond_length(x[:, i], x[:, j]), bond_angle(x[:, i], x[:, j], x[:, k]),
                dihedral(x[:, i], x[:, j], x[:, k], x[:, l]))

    def fit(self, x: torch.Tensor) -> "LocalFrames":
        """Fit the standardisation on data ``x: (n, n_atoms, 3)`` nm."""
        b, a, _ = self.measure(torch.as_tensor(x, dtype=torch.float64))
        self.std.fit(b, a)
        return self

    def place(self, x: torch.Tensor, bonds: torch.Tensor, angles: torch.Tensor, tors: torch.Tensor) -> torch.Tensor:
        """Put the rows' atoms at (bonds, angles, tors) (each (batch, n_h)) into x (batch, n_atoms, 3)."""
        R = self.rows
        for lv in self._levels:
            rr = R[lv]
            xi = nerf(x[:, rr[:, 3]], x[:, rr[:, 2]], x[:, rr[:, 1]], bonds[:, lv], angles[:, lv], tors[:, lv])
            x = x.index_copy(1, rr[:, 0], xi)
        return x

    def forward(self, z: torch.Tensor, x: torch.Tensor):
        """z: (batch, 3 n_h), x: (batch, n_atoms, 3) with the reference atoms set -> (x, logdet (batch,))."""
        n_h = self.n_h
        s = self.std
        bonds = s.bond_mean.to(z) + s.bond_std.to(z) * z[:, :n_h]
        angles = s.angle_mean.to(z) + s.angle_std.to(z) * z[:, n_h : 2 * n_h]
        x = self.place(x, bonds, angles, z[:, 2 * n_h :])
        logdet = 2 * torch.log(bonds.abs()).sum(-1) + torch.log(torch.sin(angles).abs()).sum(-1) + s.log_scale().to(z)
        return x, logdet

    def inverse(self, x: torch.Tensor):
        """x: (batch, n_atoms, 3) -> (z (batch, 3 n_h), log|det dz/dx_H| (batch,))."""
        b, a, t = self.measure(x)
        s = self.std
        z = torch.cat([(b - s.bond_mean.to(x)) / s.bond_std.to(x), (a - s.angle_mean.to(x)) / s.angle_std.to(x), t], -1)
        logdet = -(2 * torch.log(b).sum(-1) + torch.log(torch.sin(a)).sum(-1) + s.log_scale().to(x))
        return z, logdet


def improper_torsions(zmatrix: ZMatrix, adjacency: dict[int, list[int]]) -> list[int]:
    """Indices into the torsion block of a full Z-matrix (rows 3.. -> torsion 0..) of the improper-like
    torsions: rows ``(i, j, k, l)`` whose ``l`` is bonded to ``j`` (i and l are both substituents of j),
    so the torsion is fixed by j's geometry (chirality, sp2 planarity, a methyl hydrogen relative to its
    sibling) rather than by a rotation about the j-k bond."""
    out = []
    for q, (i, j, k, l) in enumerate(np.asarray(zmatrix.rows)[3:]):
        if l >= 0 and int(l) in set(adjacency[int(j)]):
            out.append(q)
    return out


def amide_torsions(zmatrix: ZMatrix, adjacency: dict[int, list[int]], elements) -> list[int]:
    """Indices into the torsion block of a full Z-matrix of the torsions about amide C-N bonds (peptide
    omega and the caps': the carbonyl carbon bonded to a one-neighbour oxygen, the nitrogen to three
    atoms). Their cis/trans isomers are separated by ~20 kcal/mol: a generator that keeps them as
    standardised coordinates samples the input structure's isomer only. ``elements``: per-atom symbols."""
    el = [str(e) for e in elements]

    def carbonyl_c(a: int) -> bool:
        return el[a] == "C" and any(el[b] == "O" and len(adjacency[b]) == 1 for b in adjacency[a])

    out = []
    for q, (i, j, k, l) in enumerate(np.asarray(zmatrix.rows)[3:]):
        j, k = int(j), int(k)
        for c, n in ((j, k), (k, j)):
            if el[n] == "N" and len(adjacency[n]) == 3 and carbonyl_c(c):
                out.append(q)
                break
    return out


# ---- chirality / mirror images ----------------------------------------------------------------
def chiral_centers(adjacency: dict[int, list[int]], heavy) -> np.ndarray:
    """(c, 4) int64 rows (centre, n1, n2, n3): heavy atoms with 4 bonded neighbours of which >= 3 are
    heavy (e.g. a protein CA with N, C, CB), neighbours the first three heavy ones by index."""
    hset = set(int(a) for a in heavy)
    out = []
    for a in sorted(hset):
        nb = adjacency[a]
        hn = [b for b in nb if b in hset]
        if len(nb) == 4 and len(hn) >= 3:
            out.append((a, hn[0], hn[1], hn[2]))
    return np.array(out, dtype=np.int64).reshape(-1, 4)


def chirality_signs(x, centers: np.ndarray) -> np.ndarray:
    """Sign of det[n1-c, n2-c, n3-c] per centre. x: (batch, n_atoms, 3) -> (batch, c) in {-1, 0, +1}."""
    x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    if len(centers) == 0:
        return np.zeros((x.shape[0], 0))
    c = x[:, centers[:, 0]]
    m = np.stack([x[:, centers[:, q]] - c for q in (1, 2, 3)], axis=-2)  # (batch, c, 3, 3)
    return np.sign(np.linalg.det(m))


def mirror_image_mask(x, centers: np.ndarray, reference) -> np.ndarray:
    """(batch,) bool: True where any chiral centre has the opposite handedness of ``reference``
    ((n_atoms, 3), e.g. the system's L-amino-acid input structure): mirror-image (D) samples."""
    ref = chirality_signs(reference, centers)[0]
    return np.any(chirality_signs(x, centers) != ref[None], axis=-1)


def count_mirror_images(x, centers: np.ndarray, reference) -> int:
    """Number of samples in x (batch, n_atoms, 3) with a flipped chiral centre (see :func:`mirror_image_mask`)."""
    return int(mirror_image_mask(x, centers, reference).sum())
