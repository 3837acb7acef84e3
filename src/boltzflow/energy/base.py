"""The Energy contract shared by the OpenMM bridge and the native torch evaluator.

An energy is a ``torch.nn.Module``::

    u = energy(x)             # x: (batch, n_atoms, 3) nm, float32/float64, any device -> (batch,) kT
    res = energy.evaluate(x)  # EnergyResult(u, valid): valid[i] is False when x[i] could not be evaluated
    parts = energy.terms(x)   # {term name: (batch,) kT}; sum over terms == u (before capping)

Invalid configurations (non-finite coordinates, overflow) get ``u = +inf``, ``valid = False``
and zero gradient. Energies are differentiable w.r.t. x (forces = -grad).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import InputError

#: Canonical per-term names. Every backend reports a subset of these.
TERM_NAMES = (
    "bond",  # HarmonicBondForce between bonded atoms
    "urey_bradley",  # HarmonicBondForce between 1-3 atoms (CHARMM UB)
    "angle",  # HarmonicAngleForce
    "torsion",  # PeriodicTorsionForce (proper dihedrals, incl. CHARMM multi-term)
    "improper",  # CustomTorsionForce harmonic impropers
    "cmap",  # CMAPTorsionForce
    "lj",  # Lennard-Jones: NonbondedForce LJ part, CustomNonbondedForce tables, CustomBondForce 1-4
    "coulomb",  # NonbondedForce Coulomb part incl. exceptions
    "gb",  # implicit solvent: GBSAOBCForce / CustomGBForce incl. surface-area term
)


class EnergyResult(NamedTuple):
    """u: (batch,) reduced energy in kT (+inf where invalid); valid: (batch,) bool."""

    u: torch.Tensor
    valid: torch.Tensor


@dataclass(frozen=True)
class EnergyCap:
    """Optional regularisation of energies for training on clashing configurations.

    term_grad_max: per-sample, per-term cap on the gradient norm ||d u_term / d x|| in kT/nm
        (science.md section 2: each term's gradient rescaled to at most this norm). None = off.
    energy_max: log-linear cap of the total reduced energy: u -> u_max + log(1 + u - u_max)
        above ``energy_max`` kT. None = off.
    """

    term_grad_max: float | None = None
    energy_max: float | None = None

    @property
    def active(self) -> bool:
        return self.term_grad_max is not None or self.energy_max is not None


class _CapGrad(torch.autograd.Function):
    """Identity in forward; in backward rescales each sample's gradient to norm <= max_norm."""

    @staticmethod
    def forward(ctx, x, max_norm):
        ctx.max_norm = max_norm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return cap_norm(g, ctx.max_norm), None


def cap_norm(g: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Each sample ``g[i]`` (batch first, any trailing shape) rescaled to norm <= ``max_norm``; a sample
    with a non-finite norm becomes zero."""
    norm = g.reshape(g.shape[0], -1).norm(dim=1).clamp_min(1e-30)
    scale = torch.clamp(max_norm / norm, max=1.0)
    scale = torch.where(torch.isfinite(norm), scale, torch.zeros_like(scale))
    g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    return g * scale.view(-1, *([1] * (g.dim() - 1)))


def cap_gradient(x: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """Pass-through whose backward caps the per-sample gradient norm at ``max_norm``.

    Use one call per energy term: ``u_t = term_t(cap_gradient(x, g))`` caps each term's force."""
    if max_norm is None:
        return x
    return _CapGrad.apply(x, float(max_norm))


def log_linear_cap(u: torch.Tensor, energy_max: float | None) -> torch.Tensor:
    """u below ``energy_max`` unchanged; above it ``energy_max + log1p(u - energy_max)``. +inf stays +inf."""
    if energy_max is None:
        return u
    over = u - energy_max
    capped = energy_max + torch.log1p(torch.clamp(over, min=0.0))
    return torch.where(over > 0, capped, u)


def check_positions(x: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """Validate ``x: (batch, n_atoms, 3)``; a single ``(n_atoms, 3)`` frame is promoted to batch 1."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"positions must be a torch.Tensor of shape (batch, {n_atoms}, 3) in nm, got {type(x).__name__}")
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.shape[1:] != (n_atoms, 3):
        raise InputError(f"positions must have shape (batch, {n_atoms}, 3) in nm, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"positions must be float32 or float64, got {x.dtype}")
    return x
