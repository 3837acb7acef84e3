"""Training data from the energy alone: batched parallel tempering with Langevin dynamics.

The energy-trained route starts from the input structure only. Maximum likelihood needs
configurations that cover every metastable state, and straight Langevin dynamics at 300 K does not
leave the input basin on a training budget (alanine dipeptide's phi > 0 state is visited about once
per nanosecond). Parallel tempering does, and with the native energy thousands of chains are one
batched evaluation: ``ladders`` independent ladders of ``replicas`` temperatures (geometric from the
system temperature to ``t_max``) run BAOAB Langevin dynamics together, and every ``steps_per_swap``
steps neighbouring temperatures exchange configurations (Metropolis, even/odd pairs alternating;
velocities rescaled by sqrt(T_new / T_old), which keeps them Maxwell-Boltzmann at the new
temperature). Frames of the lowest (system) temperature are kept.

The frames need not carry exact populations: the generator trained on them is reweighted against
the energy, so they only have to cover the states (a short run from one structure over-represents
its basin; the reweighted estimates correct that). Every step costs one energy + gradient
evaluation per chain; ``energy_evals`` counts them all, for the route's cost.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import ConfigError, InputError
from .augment import _forces


@dataclass(frozen=True)
class TemperingConfig:
    """ladders: independent replica ladders integrated as one batch; replicas: temperatures per ladder,
    geometric from the system temperature to t_max (K); steps_per_swap: Langevin steps between swap
    attempts; burnin_rounds: swap rounds discarded before the first kept frame; frames: frames kept per
    ladder at the system temperature, one every stride_rounds rounds; timestep_fs (fs) and
    friction_per_ps (1/ps) of the BAOAB integrator; keep_replicas: frames are kept from this many of the
    coldest temperatures of each ladder (1: the system temperature only; 2 adds the next one, broader
    training data that covers minor states and tails better, see docs/pipelines.md); minimize_steps: L-BFGS iterations on the start
    structure(s) first (a PDB straight from a builder or the PDB bank can hold strained contacts that
    would blow up the first Langevin steps; 0 = off); seed: velocities, noise and swaps."""

    ladders: int = 128
    replicas: int = 8
    t_max: float = 1000.0
    steps_per_swap: int = 50
    burnin_rounds: int = 100
    frames: int = 500
    stride_rounds: int = 1
    timestep_fs: float = 1.0
    friction_per_ps: float = 5.0
    keep_replicas: int = 1
    minimize_steps: int = 200
    seed: int = 0

    def __post_init__(self):
        if min(self.ladders, self.replicas, self.steps_per_swap, self.frames, self.stride_rounds) < 1 or self.burnin_rounds < 0:
            raise ConfigError("tempering needs ladders, replicas, steps_per_swap, frames, stride_rounds >= 1 and "
                              "burnin_rounds >= 0")
        if not 1 <= self.keep_replicas <= self.replicas:
            raise ConfigError(f"tempering.keep_replicas must be between 1 and replicas ({self.replicas}), "
                              f"got {self.keep_replicas}")
        if not (self.timestep_fs > 0 and self.friction_per_ps >= 0 and math.isfinite(self.t_max)):
            raise ConfigError("tempering needs timestep_fs > 0, friction_per_ps >= 0 and a finite t_max")

    @property
    def rounds(self) -> int:
        """Swap rounds in all (burn-in + kept)."""
        return self.burnin_rounds + self.frames * self.stride_rounds

    def temperatures(self, t0: float) -> np.ndarray:
        """(replicas,) K, geometric from t0 to t_max."""
        if self.replicas == 1:
            return np.array([float(t0)])
        if not self.t_max > t0:
            raise ConfigError(f"tempering.t_max ({self.t_max} K) must be above the system temperature ({t0} K)")
        return float(t0) * (self.t_max / float(t0)) ** (np.arange(self.replicas) / (self.replicas - 1))


@dataclass
class TemperingResult:
    """positions: (ladders * keep_replicas * frames, n_atoms, 3) nm, ordered (ladder, kept
    temperature, frame): per ladder the system temperature's frames, then the next temperatures' with
    ``keep_replicas > 1``;
    reduced_energy: (n,) kT; temperatures: (replicas,) K; swap_acceptance: (replicas - 1,) per
    neighbouring pair; reset_chains: chains put back to the start after non-finite energies;
    energy_evals: energy + gradient evaluations; wall_s."""

    positions: np.ndarray
    reduced_energy: np.ndarray
    temperatures: np.ndarray
    swap_acceptance: np.ndarray
    reset_chains: int
    energy_evals: int
    wall_s: float
    info: dict = field(default_factory=dict)


def parallel_tempering(energy: Callable[[torch.Tensor], torch.Tensor], x0, masses, kT: float, temperature: float,
                       config: TemperingConfig, dtype: torch.dtype = torch.float32,
                       progress: Callable[[int, int], None] | None = None) -> TemperingResult:
    """Run batched parallel tempering from the configuration(s) x0.

    energy: differentiable ``(b, n_atoms, 3) nm -> (b,)`` reduced energy in kT at ``temperature`` (K),
    whose kT (kJ/mol) is given; x0: (n_atoms, 3) or (m, n_atoms, 3) nm starting structures (chain c
    starts from x0[c % m]); masses: (n_atoms,) dalton. progress(round, rounds) is called every round."""
    x0 = x0 if isinstance(x0, torch.Tensor) else torch.as_tensor(np.array(x0, dtype=np.float64))
    if x0.dim() == 2:
        x0 = x0[None]
    if x0.dim() != 3 or x0.shape[-1] != 3:
        raise InputError(f"starting structures must have shape (n_atoms, 3) or (m, n_atoms, 3), got {tuple(x0.shape)}")
    masses = torch.as_tensor(np.asarray(masses, dtype=np.float64))
    if masses.shape != (x0.shape[1],) or not bool((masses > 0).all()):
        raise InputError("masses must be (n_atoms,) positive values in dalton")
    if not kT > 0:
        raise InputError(f"kT must be > 0, got {kT}")
    t_start = time.perf_counter()
    cfg = config
    L, R = cfg.ladders, cfg.replicas
    evals = 0
    if cfg.minimize_steps > 0:
        x0, n_min = minimize(energy, x0.to(torch.float64), cfg.minimize_steps)
        evals += n_min
    temps = cfg.temperatures(temperature)
    g = torch.Generator().manual_seed(int(cfg.seed))
    n_chain = L * R
    start = x0[torch.arange(n_chain) % x0.shape[0]].to(dtype).clone()
    x = start.clone()
    ratio = torch.as_tensor(np.tile(temps / float(temperature), L), dtype=dtype)  # (n_chain,) T_r / T0
    m = masses.to(dtype)[None, :, None]
    sigma = torch.sqrt(kT * ratio[:, None, None] / m)
    dt = cfg.timestep_fs * 1e-3
    c1 = math.exp(-cfg.friction_per_ps * dt)
    c2 = math.sqrt(max(1.0 - c1 * c1, 0.0))

    def noise():
        return torch.randn(x.shape, generator=g, dtype=dtype)

    v = sigma * noise()
    f, u = _forces(energy, x, kT)
    evals += n_chain
    reset = 0
    accepted = np.zeros(max(R - 1, 0))
    attempted = np.zeros(max(R - 1, 0))
    beta = torch.as_tensor(float(temperature) / temps, dtype=torch.float64)  # (R,) in units of 1/kT0
    frames, us = [], []
    for rnd in range(cfg.rounds):
        for _ in range(cfg.steps_per_swap):
            v = v + (0.5 * dt) * f / m
            x = x + (0.5 * dt) * v
            v = c1 * v + c2 * sigma * noise()
            x = x + (0.5 * dt) * v
            f, u = _forces(energy, x, kT)
            bad = ~torch.isfinite(u) | ~torch.isfinite(f).flatten(1).all(1)
            if bool(bad.any()):  # an exploded chain restarts from its start structure with fresh velocities
                reset += int(bad.sum())
                b3 = bad[:, None, None]
                x = torch.where(b3, start, x)
                f2, u2 = _forces(energy, x, kT)
                f = torch.where(b3, f2, f)
                u = torch.where(bad, u2, u)
                v = torch.where(b3, sigma * noise(), v)
                evals += n_chain
            v = v + (0.5 * dt) * f / m
        evals += n_chain * cfg.steps_per_swap
        if R > 1:
            x, v, u, f = _swap(x, v, u, f, rnd % 2, L, R, beta, ratio, g, accepted, attempted)
        if rnd >= cfg.burnin_rounds and (rnd - cfg.burnin_rounds + 1) % cfg.stride_rounds == 0:
            cold = (torch.arange(L)[:, None] * R + torch.arange(cfg.keep_replicas)[None]).reshape(-1)
            frames.append(x[cold].clone())
            us.append(u[cold].double().clone())
        if progress is not None:
            progress(rnd + 1, cfg.rounds)
    pos = torch.stack(frames, 1).reshape(-1, *x.shape[1:]).cpu().numpy().astype(np.float32)
    red = torch.stack(us, 1).reshape(-1).cpu().numpy()
    acc = np.divide(accepted, np.maximum(attempted, 1))
    return TemperingResult(pos, red, temps, acc, reset, int(evals), time.perf_counter() - t_start,
                           info={"ladders": L, "replicas": R, "rounds": cfg.rounds})


def minimize(energy: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, steps: int) -> tuple[torch.Tensor, int]:
    """L-BFGS on every structure of x (m, n_atoms, 3) nm for at most ``steps`` iterations; returns the
    minimised structures (the input's where the energy did not go down or turned non-finite) and the
    energy + gradient evaluations spent."""
    x = x.detach().clone()
    with torch.no_grad():
        u0 = energy(x).double()
    xv = x.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([xv], lr=1.0, max_iter=int(steps), line_search_fn="strong_wolfe")
    calls = [0]

    def closure():
        opt.zero_grad()
        u = energy(xv).sum()
        u.backward()
        calls[0] += 1
        return u

    opt.step(closure)
    with torch.no_grad():
        u1 = energy(xv).double()
        better = torch.isfinite(u1) & (u1 <= u0)
        out = torch.where(better[:, None, None], xv.detach(), x)
    return out, (calls[0] + 2) * x.shape[0]


def _swap(x, v, u, f, parity: int, L: int, R: int, beta, ratio, g, accepted, attempted):
    """Metropolis exchange between temperatures (r, r+1) for r = parity, parity + 2, ... in every ladder."""
    lo = np.arange(parity, R - 1, 2)
    if len(lo) == 0:
        return x, v, u, f
    lo_t = torch.as_tensor(lo)
    base = (torch.arange(L) * R)[:, None]
    i = (base + lo_t[None]).reshape(-1)      # chain slots at temperature r
    j = i + 1                                # at temperature r + 1
    ud = u.double()
    b = beta[lo_t].repeat(L)
    b1 = beta[lo_t + 1].repeat(L)
    log_acc = (b - b1) * (ud[i] - ud[j])
    acc = torch.rand(len(i), generator=g, dtype=torch.float64) < torch.exp(log_acc.clamp(max=0.0))
    acc = acc & torch.isfinite(log_acc)
    np.add.at(attempted, np.tile(lo, L), 1)
    np.add.at(accepted, np.tile(lo, L)[acc.numpy()], 1)
    if bool(acc.any()):
        ia, ja = i[acc], j[acc]
        src = torch.arange(x.shape[0])
        src[ia], src[ja] = ja, ia
        x, f, u = x[src], f[src], u[src]
        scale = torch.sqrt(ratio / ratio[src]).to(v.dtype)  # velocity of the arriving chain, rescaled to T_new
        v = v[src] * scale[:, None, None]
    return x, v, u, f


__all__ = ["TemperingConfig", "TemperingResult", "parallel_tempering", "minimize"]
