"""Particle benchmark systems DW4, LJ13, LJ55 and their reference data by Metropolis MCMC.

The energies are :class:`~boltzflow.systems.toy.DW4` and :class:`~boltzflow.systems.toy.LJ13`
(``n_particles=55`` for LJ55) with the parameters of Klein et al. 2023 and draxler2024 appendix
C.2.3 (DW4: a = 0, b = -4, c = 0.9, d0 = 4, tau = 1; LJ: eps = 1, rm = 1, tau = 1, harmonic
restraint to the centre of mass with strength 1). Reduced units throughout (energies in kT).

:func:`metropolis_reference` runs many independent random-walk Metropolis chains in parallel on the
centre-of-mass-free subspace (moves of all particles at once, a Gaussian step projected onto the
subspace, so the proposal stays symmetric), tunes the step size during burn-in to an acceptance near
0.3, measures the integrated autocorrelation time of the energy on the chains and keeps one frame
every ``thin`` steps. Frames are CoM-free, ``(n, n_particles, n_spatial)`` float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from .toy import DW4, LJ13, ToyTarget

PARTICLE_SYSTEMS = ("dw4", "lj13", "lj55")


def particle_target(name: str) -> ToyTarget:
    """The energy of a particle benchmark: ``"dw4"`` (4 x 2D), ``"lj13"`` (13 x 3D), ``"lj55"`` (55 x 3D).
    The returned target has ``n_particles`` and ``n_spatial``; ``energy`` takes ``(batch, n d)``."""
    if name == "dw4":
        return DW4()
    if name == "lj13":
        return LJ13(13)
    if name == "lj55":
        return LJ13(55)
    raise InputError(f"unknown particle system {name!r}; choose one of {', '.join(PARTICLE_SYSTEMS)}")


@dataclass(frozen=True)
class MCMCConfig:
    """Reference MCMC of a particle system: ``chains`` parallel chains, ``burnin`` steps (step size
    tuned towards acceptance ``target_acceptance``), then ``frames_per_chain`` frames ``thin`` steps
    apart (``thin = 0``: ``ceil(3 tau_int)`` from a pilot of ``pilot`` steps after burn-in). ``step``:
    initial step size (length units), ``seed``: the torch generator's seed."""

    chains: int = 1000
    burnin: int = 2000
    frames_per_chain: int = 100
    thin: int = 0
    pilot: int = 2000
    step: float = 0.1
    target_acceptance: float = 0.3
    seed: int = 0


def _initial(name: str, chains: int, g: torch.Generator) -> torch.Tensor:
    """Starting configurations ``(chains, n, d)``: DW4 random (scale 2); LJ a jittered cubic lattice of
    spacing 1.1 (no overlaps), the ``n`` sites nearest to the centre."""
    t = particle_target(name)
    n, d = t.n_particles, t.n_spatial  # type: ignore[attr-defined]
    if name == "dw4":
        x = 2.0 * torch.randn(chains, n, d, generator=g, dtype=torch.float64)
    else:
        k = math.ceil(n ** (1 / 3)) + 2
        grid = torch.stack(torch.meshgrid(*[torch.arange(k, dtype=torch.float64)] * 3, indexing="ij"), -1).reshape(-1, 3)
        grid = grid - grid.mean(0)
        sites = grid[grid.pow(2).sum(-1).argsort()[:n]] * 1.1
        x = sites[None] + 0.05 * torch.randn(chains, n, d, generator=g, dtype=torch.float64)
    return x - x.mean(1, keepdim=True)


def integrated_autocorrelation(trace: np.ndarray, c: float = 5.0) -> float:
    """Integrated autocorrelation time (steps) of ``trace: (steps, chains)`` from the chain-averaged
    autocorrelation, Sokal's automatic window (smallest M with M >= c tau(M))."""
    y = np.asarray(trace, dtype=np.float64)
    y = y - y.mean(0, keepdims=True)
    n = y.shape[0]
    f = np.fft.rfft(y, n=2 * n, axis=0)
    acf = np.fft.irfft(f * np.conj(f), axis=0)[:n].mean(1)
    if acf[0] <= 0:
        return 1.0
    rho = acf / acf[0]
    taus = 2.0 * np.cumsum(rho) - 1.0
    for m in range(1, n):
        if m >= c * taus[m]:
            return float(max(taus[m], 1.0))
    return float(taus[-1])


def _run(energy, x: torch.Tensor, u: torch.Tensor, steps: int, step: float, g: torch.Generator,
         adapt: bool, target: float, every: int = 0):
    """``steps`` Metropolis steps of every chain; returns (x, u, step, acceptance, energy trace, frames)."""
    acc_total, trace, frames = 0.0, [], []
    acc_window = 0.0
    for s in range(steps):
        prop = x + step * torch.randn(x.shape, generator=g, dtype=x.dtype)
        prop = prop - prop.mean(1, keepdim=True)
        u_new = energy(prop.reshape(len(x), -1))
        log_r = -(u_new - u)
        accept = torch.log(torch.rand(len(x), generator=g, dtype=x.dtype)) < log_r
        x = torch.where(accept[:, None, None], prop, x)
        u = torch.where(accept, u_new, u)
        a = float(accept.double().mean())
        acc_total += a
        acc_window += a
        if adapt and (s + 1) % 50 == 0:
            step *= math.exp(acc_window / 50 - target)
            acc_window = 0.0
        trace.append(u.numpy().copy())
        if every and (s + 1) % every == 0:
            frames.append(x.numpy().copy())
    return x, u, step, acc_total / max(steps, 1), np.asarray(trace), frames


def metropolis_reference(name: str, config: MCMCConfig = MCMCConfig(), log=print) -> tuple[np.ndarray, dict]:
    """Decorrelated reference frames of particle system ``name``: ``(chains * frames_per_chain, n, d)``
    CoM-free float64 in chain-major order (chain c: rows ``c F .. (c + 1) F - 1``, ``F = frames_per_chain``) and a dict of diagnostics
    (acceptance, step size, tau_int of the energy in steps, thin, total energy evaluations)."""
    g = torch.Generator().manual_seed(int(config.seed))
    return metropolis_chains(particle_target(name), _initial(name, config.chains, g), config, g, log, name)


def metropolis_chains(target: ToyTarget, x: torch.Tensor, config: MCMCConfig, g: torch.Generator, log=print,
                      name: str = "") -> tuple[np.ndarray, dict]:
    """The chains of :func:`metropolis_reference` from starting configurations ``x: (chains, n, d)``
    for any translation-invariant ``target`` (``energy((batch, n d)) -> (batch,)`` in kT)."""
    name = name or target.name
    energy = target.energy
    x = x.to(torch.float64)
    x = x - x.mean(1, keepdim=True)
    with torch.no_grad():
        u = energy(x.reshape(len(x), -1))
        x, u, step, acc_b, _, _ = _run(energy, x, u, config.burnin, config.step, g, True, config.target_acceptance)
        log(f"{name}: burn-in {config.burnin} steps, acceptance {acc_b:.3f}, step {step:.4f}")
        thin, tau, evals = config.thin, float("nan"), config.chains * config.burnin
        if thin <= 0:
            x, u, _, acc_p, trace, _ = _run(energy, x, u, config.pilot, step, g, False, 0.0)
            tau = integrated_autocorrelation(trace)
            thin = max(1, math.ceil(3 * tau))
            evals += config.chains * config.pilot
            log(f"{name}: pilot {config.pilot} steps, acceptance {acc_p:.3f}, tau_int(u) {tau:.1f} steps -> thin {thin}")
        steps = thin * config.frames_per_chain
        x, u, _, acc, trace, frames = _run(energy, x, u, steps, step, g, False, 0.0, every=thin)
        evals += config.chains * steps
        tau_prod = integrated_autocorrelation(trace)
    out = np.stack(frames, axis=1).reshape(-1, *x.shape[1:])  # chain-major: chain c holds rows c*F..(c+1)*F-1
    info = {"system": name, "chains": config.chains, "burnin": config.burnin, "thin": thin,
            "frames_per_chain": config.frames_per_chain, "step": step, "acceptance": acc,
            "tau_int_energy_pilot": tau, "tau_int_energy": tau_prod, "energy_evals": evals, "seed": config.seed,
            "mean_energy": float(trace.mean())}
    log(f"{name}: production {steps} steps, acceptance {acc:.3f}, tau_int(u) {tau_prod:.1f} steps, "
        f"{len(out)} frames, mean u {info['mean_energy']:.3f}")
    return out, info
