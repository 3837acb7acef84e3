"""More training data from the reference frames: batched Langevin dynamics with the target energy.

Maximum likelihood on a few thousand frames over-fits an internal-coordinate flow badly (alanine
dipeptide, 3 139 frames, 3 000 steps of batch 256: held-out log-likelihood 56 nats below the
training one; docs/pipelines.md, "Training data"). Langevin dynamics at the system temperature
leaves the Boltzmann distribution invariant, so running it from every reference frame (with
Maxwell-Boltzmann velocities) turns n frames into ``n * frames_per_start`` Boltzmann frames: the
fast degrees of freedom (bonds, angles, hydrogens) are fresh in every frame, while the slow ones
(backbone torsions) keep the populations of the reference. The burn-in also re-thermalises
reference frames whose fast degrees of freedom are off temperature.

All chains run together as one batch through the differentiable energy (``u(x)`` in kT, forces
``-kT grad u``), with the BAOAB splitting (Leimkuhler-Matthews) of the Langevin equation in
nm / ps / dalton / kJ/mol units. Every step costs one energy + gradient evaluation per chain; the
returned ``energy_evals`` is what it cost, to be counted with the training cost.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import ConfigError, InputError


@dataclass(frozen=True)
class LangevinAugmentConfig:
    """frames_per_start: frames kept per starting configuration (0 = no augmentation);
    burnin: steps before the first kept frame; stride: steps between kept frames;
    timestep_fs: integration step (fs; flexible bonds to hydrogens need about 1 fs);
    friction_per_ps: Langevin collision rate (1/ps); batch: chains integrated together."""

    frames_per_start: int = 0
    burnin: int = 400
    stride: int = 50
    timestep_fs: float = 1.0
    friction_per_ps: float = 5.0
    batch: int = 4096

    def __post_init__(self):
        if self.frames_per_start < 0 or self.burnin < 0 or self.stride < 1 or self.batch < 1:
            raise ConfigError("augmentation needs frames_per_start >= 0, burnin >= 0, stride >= 1 and batch >= 1")
        if not self.timestep_fs > 0 or self.friction_per_ps < 0:
            raise ConfigError("augmentation needs timestep_fs > 0 and friction_per_ps >= 0")

    @property
    def steps(self) -> int:
        """Integration steps per chain."""
        return self.burnin + self.frames_per_start * self.stride if self.frames_per_start else 0


@dataclass
class AugmentResult:
    """positions: (n_kept, n_atoms, 3) nm, grouped by starting frame (frames of start i are rows
    ``i*k .. i*k+k-1`` when no chain was dropped); start_index: (n_kept,) starting frame of each row;
    reduced_energy: (n_kept,) u in kT; energy_evals: energy + gradient evaluations spent;
    dropped_chains: chains that produced non-finite energies (all their frames dropped); wall_s."""

    positions: np.ndarray
    start_index: np.ndarray
    reduced_energy: np.ndarray
    energy_evals: int
    dropped_chains: int
    wall_s: float


def _forces(energy: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, kT: float):
    """(forces (b, n, 3) kJ/mol/nm, u (b,) kT) at x."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        u = energy(xg)
        (g,) = torch.autograd.grad(u.sum(), xg)
    return -kT * g.to(x.dtype), u.detach().to(x.dtype)


def _nonfinite_rows(u: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """(b,) bool: which configurations have a non-finite energy u (b,) or any non-finite force in f (b, n, 3).
    Screens by the per-row sum first (one reduction; a non-finite element makes the sum non-finite), which
    is ~15x faster on the CPU than the element-wise test it falls back to when the screen finds one."""
    screen = ~torch.isfinite(u + f.sum((1, 2)))
    if not bool(screen.any()):
        return screen
    return ~torch.isfinite(u) | ~torch.isfinite(f).flatten(1).all(1)


def langevin_augment(energy: Callable[[torch.Tensor], torch.Tensor], x0, masses, kT: float,
                     config: LangevinAugmentConfig, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> AugmentResult:
    """Run ``config.frames_per_start`` frames of Langevin dynamics from every configuration of x0.

    energy: differentiable ``(b, n_atoms, 3) nm -> (b,)`` reduced energy in kT at the temperature
    whose kT (kJ/mol) is given; x0: (m, n_atoms, 3) nm starting configurations (Boltzmann samples:
    then every kept frame is one too); masses: (n_atoms,) dalton; generator: noise (velocities and
    Langevin kicks), for reproducibility. Chains whose energy turns non-finite are dropped whole."""
    x0 = torch.as_tensor(np.asarray(x0) if not isinstance(x0, torch.Tensor) else x0)
    if x0.dim() != 3 or x0.shape[-1] != 3 or x0.shape[0] < 1:
        raise InputError(f"starting configurations must have shape (m, n_atoms, 3), got {tuple(x0.shape)}")
    masses = torch.as_tensor(np.asarray(masses, dtype=np.float64))
    if masses.shape != (x0.shape[1],) or not bool((masses > 0).all()):
        raise InputError("masses must be (n_atoms,) positive values in dalton (virtual sites are not supported)")
    if not kT > 0:
        raise InputError(f"kT must be > 0, got {kT}")
    k = int(config.frames_per_start)
    t_start = time.perf_counter()
    if k == 0:
        empty = np.zeros((0,) + tuple(x0.shape[1:]), dtype=np.float32)
        return AugmentResult(empty, np.zeros(0, dtype=np.int64), np.zeros(0), 0, 0, 0.0)
    dt = config.timestep_fs * 1e-3  # ps
    c1 = math.exp(-config.friction_per_ps * dt)
    c2 = math.sqrt(max(1.0 - c1 * c1, 0.0))
    out_x, out_i, out_u = [], [], []
    dropped = 0
    for s in range(0, x0.shape[0], config.batch):
        x = x0[s:s + config.batch].to(dtype).clone()
        b = x.shape[0]
        m = masses.to(dtype=dtype, device=x.device)[None, :, None]  # x0 may live on a GPU
        sigma = torch.sqrt(kT / m)
        kick = (0.5 * dt) / m  # v += kick * f: half a step of the force
        noise = lambda: torch.randn(x.shape, generator=generator, dtype=dtype, device=x.device)  # noqa: E731
        v = sigma * noise()
        f, u = _forces(energy, x, kT)
        ok = torch.isfinite(u)
        frames, us = [], []
        for step in range(1, config.steps + 1):
            v = torch.addcmul(v, f, kick)         # B
            x = x + (0.5 * dt) * v                # A
            v = c1 * v + c2 * sigma * noise()     # O
            x = x + (0.5 * dt) * v                # A
            f, u = _forces(energy, x, kT)
            bad = _nonfinite_rows(u, f)
            if bool(bad.any()):  # freeze exploded chains (they are dropped below)
                ok = ok & ~bad
                f = torch.where(bad[:, None, None], torch.zeros_like(f), f)
                v = torch.where(bad[:, None, None], torch.zeros_like(v), v)
                x = torch.where(bad[:, None, None], x0[s:s + b].to(dtype), x)
            v = torch.addcmul(v, f, kick)         # B
            if step > config.burnin and (step - config.burnin) % config.stride == 0:
                frames.append(x.clone())
                us.append(u.clone())
        keep = ok.cpu().numpy()
        dropped += int((~keep).sum())
        xs = torch.stack(frames, 1).cpu().numpy()[keep]  # (b_ok, k, n, 3)
        out_x.append(xs.reshape(-1, *xs.shape[2:]).astype(np.float32))
        out_u.append(torch.stack(us, 1).double().cpu().numpy()[keep].reshape(-1))
        out_i.append(np.repeat(np.arange(s, s + b)[keep], k))
    evals = int(x0.shape[0]) * (config.steps + 1)
    return AugmentResult(np.concatenate(out_x), np.concatenate(out_i), np.concatenate(out_u), evals, dropped,
                         time.perf_counter() - t_start)


__all__ = ["LangevinAugmentConfig", "AugmentResult", "langevin_augment"]
