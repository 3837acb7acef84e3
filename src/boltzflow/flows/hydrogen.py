"""Hydrogens given heavy atoms: the placement network ``h`` and the conditional hydrogen flow.

Both express every hydrogen in the local frame of its heavy parent (bond length, angle, torsion
relative to parent / heavy neighbours / earlier sibling hydrogen, see
:func:`boltzflow.transforms.zmatrix.hydrogen_zmatrix`) and read the heavy atoms through
rigid-motion invariant features (heavy-atom bonds, angles, cos/sin torsions), so their output
moves rigidly with the heavy atoms.

* :class:`HydrogenNet` (felardos2023): deterministic ``x_H = h(x_C)``; an MLP (default 3 linear
  layers, hidden 512, CELU) outputs offsets of each hydrogen's (r, theta, phi) from the
  reference geometry; zero-initialised last layer, so an untrained net places hydrogens at the
  reference (input-structure) local geometry. Trained to minimise u(x_C, h(x_C)). Using it
  biases the target (see docs/pipelines.md).
* :class:`ConditionalHydrogenFlow`: a conditional density q(x_H | x_C) (spline coupling flow over
  the local-frame coordinates, circular on torsions, conditioned on heavy-atom features) with
  the exact log-det of the local-frame change of variables: heavy flow x this flow is an exact
  all-atom density, so reweighting targets the true Boltzmann distribution.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..transforms.internal import InternalCoordinates, LocalFrames, wrap_angle
from ..transforms.zmatrix import bond_graph, build_zmatrix, hydrogen_zmatrix
from .nn import MLP


class HeavyFeatures(nn.Module):
    """Rigid-motion invariant features of the heavy atoms of full coordinates.

    ``forward(x: (batch, n_atoms, 3) nm) -> (batch, feature_dim)``: standardised heavy bonds and
    angles, softly clipped to (-5, 5) (``5 tanh(z / 5)``: distorted geometries from an untrained
    Cartesian flow would otherwise give features of O(100) and ill-conditioned conditioners), and
    cos/sin of heavy torsions (heavy-atom Z-matrix from the topology bonds).
    """

    def __init__(self, system, reference: np.ndarray | None = None):
        super().__init__()
        heavy = np.array(system.heavy_indices)
        ref = np.array(system.positions if reference is None else reference, dtype=np.float64)
        self.register_buffer("heavy", torch.as_tensor(heavy))
        self.ic = InternalCoordinates(build_zmatrix(bond_graph(system.topology), heavy), ref[heavy], atoms=heavy)
        self.feature_dim = self.ic.feature_dim

    def fit(self, x: torch.Tensor) -> "HeavyFeatures":
        """Fit the standardisation on data x (n, n_atoms, 3) nm."""
        self.ic.fit(torch.as_tensor(x, dtype=torch.float64)[:, self.heavy])
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.ic.features(x[:, self.heavy])
        nb = 2 * self.ic.m - 3  # bonds and angles come first
        return torch.cat([5.0 * torch.tanh(f[:, :nb] / 5.0), f[:, nb:]], dim=-1)


def hydrogen_frames(system, reference: np.ndarray | None = None) -> LocalFrames:
    """LocalFrames placing all hydrogens of ``system`` relative to heavy atoms (reference: (n_atoms, 3) nm)."""
    if len(system.hydrogen_indices) == 0:
        raise InputError(f"system {system.name!r} has no hydrogens; use pipeline='internal-all'")
    zm = hydrogen_zmatrix(bond_graph(system.topology), system.heavy_indices, system.hydrogen_indices,
                          system.hydrogen_parents)
    ref = np.array(system.positions if reference is None else reference, dtype=np.float64)
    return LocalFrames(zm, ref)


class HydrogenNet(nn.Module):
    """Hydrogen placement network ``h: x_C -> x_H``.

    system: a :class:`~boltzflow.systems.MolecularSystem`; hidden / depth / activation: the MLP
    (depth counts linear layers; default 3 layers, 512 wide, CELU as in felardos2023);
    reference: (n_atoms, 3) nm geometry whose local hydrogen coordinates are the starting point
    (default: ``system.positions``).

    ``forward(x)``: x (batch, n_atoms, 3) nm whose heavy atoms are used (hydrogen entries are
    ignored) -> (batch, n_atoms, 3) with hydrogens placed. ``place_hydrogens(x_heavy)``:
    (batch, n_heavy, 3) -> (batch, n_h, 3).
    """

    def __init__(self, system, hidden: int = 512, depth: int = 3, activation: str = "celu",
                 reference: np.ndarray | None = None):
        super().__init__()
        self.n_atoms = int(system.n_atoms)
        self.features = HeavyFeatures(system, reference)
        self.frames = hydrogen_frames(system, reference)
        n_h = self.frames.n_h
        self.n_h = n_h
        self.register_buffer("heavy", torch.as_tensor(np.array(system.heavy_indices)))
        self.register_buffer("hydrogens", torch.as_tensor(np.array(system.hydrogen_indices)))
        ref = torch.as_tensor(np.array(system.positions if reference is None else reference, dtype=np.float64))
        _, _, t = self.frames.measure(ref[None])
        self.register_buffer("torsion_ref", t[0].clone())
        self.mlp = MLP(self.features.feature_dim, 3 * n_h, hidden=hidden, depth=depth, activation=activation,
                       zero_init_last=True)
        self.to(torch.get_default_dtype())  # buffers follow the parameters' dtype (checkpoints use one dtype)

    def fit(self, x: torch.Tensor) -> "HydrogenNet":
        """Fit heavy-feature and local-frame standardisations and the torsion offsets on data
        x (n, n_atoms, 3) nm (the untrained net then places hydrogens at the data's mean local geometry)."""
        _fit_hydrogen_standardisation(self, x)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise InputError(f"HydrogenNet expects (batch, {self.n_atoms}, 3) nm, got {tuple(x.shape)}")
        out = self.mlp(self.features(x))
        n_h = self.n_h
        s = self.frames.std
        bonds = s.bond_mean.to(x) + s.bond_std.to(x) * out[:, :n_h]
        angles = s.angle_mean.to(x) + s.angle_std.to(x) * out[:, n_h : 2 * n_h]
        tors = self.torsion_ref.to(x) + out[:, 2 * n_h :]
        return self.frames.place(x, bonds, angles, tors)

    def place_hydrogens(self, x_heavy: torch.Tensor) -> torch.Tensor:
        """x_heavy: (batch, n_heavy, 3) nm -> hydrogen coordinates (batch, n_h, 3) nm (input order of H)."""
        x = x_heavy.new_zeros(x_heavy.shape[0], self.n_atoms, 3).index_copy(1, self.heavy, x_heavy)
        return self.forward(x)[:, self.hydrogens]


class ConditionalHydrogenFlow(nn.Module):
    """Exact conditional density of hydrogens given heavy atoms, q(x_H | x_C).

    z ~ base (normal on bonds/angles, uniform on torsions) -> spline flow conditioned on heavy-atom
    features -> local-frame coordinates y = [bonds | angles | torsions] (standardised) -> NeRF
    placement. ``log q(x_H | x_C) = log q_flow(y | c) - log|det dx_H/dy|``.

    flow_kw: keywords for :func:`boltzflow.flows.builders.spline_flow` (blocks, hidden, depth, bins,
    seed...). The density is with respect to the hydrogens' Cartesian coordinates (nm^-3 n_h).
    """

    def __init__(self, system, reference: np.ndarray | None = None, **flow_kw):
        super().__init__()
        from .builders import make_flow

        self.n_atoms = int(system.n_atoms)
        self.features = HeavyFeatures(system, reference)
        self.frames = hydrogen_frames(system, reference)
        self.register_buffer("hydrogens", torch.as_tensor(np.array(system.hydrogen_indices)))
        ref = torch.as_tensor(np.array(system.positions if reference is None else reference, dtype=np.float64))
        _, _, t = self.frames.measure(ref[None])
        # torsions are modelled relative to the reference torsion (periodic shift: log-det 0)
        self.register_buffer("torsion_ref", t[0].clone())
        self.flow = make_flow(self.frames.dim, kind="spline", circular=self.frames.circular,
                              context_dim=self.features.feature_dim, **flow_kw)
        self.to(torch.get_default_dtype())

    def fit(self, x: torch.Tensor) -> "ConditionalHydrogenFlow":
        """Fit the standardisations (heavy features, hydrogen bonds/angles, torsion offsets) on data."""
        _fit_hydrogen_standardisation(self, x)
        return self

    def _to_y(self, x: torch.Tensor):
        z, ld = self.frames.inverse(x)
        n_h = self.frames.n_h
        t = wrap_angle(z[:, 2 * n_h :] - self.torsion_ref.to(x))
        return torch.cat([z[:, : 2 * n_h], t], -1), ld

    def sample_and_log_prob(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """x: (batch, n_atoms, 3) with heavy atoms set -> (x with hydrogens sampled, log q(x_H | x_C) (batch,))."""
        ctx = self.features(x)
        y, logq_y = self.flow.sample_and_log_prob(x.shape[0], generator=generator, context=ctx)
        return self.place(y, logq_y, x)

    def place(self, y: torch.Tensor, logq_y: torch.Tensor, x: torch.Tensor):
        """Hydrogens of x (batch, n_atoms, 3) from the flow output y (batch, dim) with log density logq_y
        -> (x with hydrogens placed, log q(x_H | x_C) (batch,))."""
        n_h = self.frames.n_h
        t = wrap_angle(y[:, 2 * n_h :] + self.torsion_ref.to(y))
        x_new, ld = self.frames(torch.cat([y[:, : 2 * n_h], t], -1), x)
        return x_new, logq_y - ld

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, n_atoms, 3) nm -> log q(x_H | x_C) (batch,)."""
        y, ld = self._to_y(x)
        return self.flow.log_prob(y, context=self.features(x)) + ld


def torsion_circular_mean(t: torch.Tensor) -> torch.Tensor:
    """Circular mean over the batch: (n, d) radians -> (d,)."""
    return torch.atan2(torch.sin(t).mean(0), torch.cos(t).mean(0))


__all__ = ["HeavyFeatures", "HydrogenNet", "ConditionalHydrogenFlow", "hydrogen_frames", "torsion_circular_mean"]


def _fit_hydrogen_standardisation(module, x) -> None:
    """Fit ``module``'s heavy-feature and local-frame standardisations and its torsion offsets on data
    x (n, n_atoms, 3) nm (shared by HydrogenNet and ConditionalHydrogenFlow)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    module.features.fit(x)
    module.frames.fit(x)
    _, _, t = module.frames.measure(x)
    module.torsion_ref.copy_(torsion_circular_mean(t).to(module.torsion_ref))
