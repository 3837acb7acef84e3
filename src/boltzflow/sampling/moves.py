"""Rejuvenating resampled frames with HMC in a generator's internal coordinates (resample-move).

An importance-resampled pool (:mod:`boltzflow.sampling.pool`) holds many copies of its few heavy-weight
draws: the frames in the regions the generator under-covers. Maximum likelihood on k identical copies
teaches the flow a point, not the region around it. A few HMC transitions that leave the Boltzmann
distribution invariant spread the copies over their neighbourhood (the "move" of sequential Monte Carlo's
resample-move, and what FAB's AIS does in the flow's coordinates), so the training frames cover the
under-covered regions with many distinct configurations while still following p.

The moves run in the coordinates the flow models (for molecules: standardised bonds and angles, torsions
in radians), where a unit-mass leapfrog with one step size suits every coordinate; in Cartesian
coordinates the stiffest bond sets the step and a torsion barely moves. The target there is

    log pi(q) = -u(x(q)) + log|det dx/dq|,

the Boltzmann density carried to q by the map's volume factor. Flows reach this module through the
:class:`CoordinateMap` protocol (``boltzflow.flows.latent.internal_map`` adapts generators), so sampling
never imports flows. The frames are training data only: the generator's samples are reweighted
exactly afterwards, so the step-size adaptation between transitions need not be exact MCMC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch

from ..errors import InputError
from .hmc import hmc_step
from .latent import wrap_periodic

EnergyFn = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class CoordinateMap(Protocol):
    """Configurations in other coordinates: ``dim`` coordinates, ``circular: (dim,)`` bool (periodic on
    ``[-pi, pi)``); ``pull(x: (n, ...)) -> q: (n, dim)``; ``push(q) -> (x, log|det dx/dq|: (n,))``,
    differentiable w.r.t. q, with ``push(pull(x))[0]`` equal to x up to a rigid motion."""

    dim: int
    circular: torch.Tensor

    def pull(self, x: torch.Tensor) -> torch.Tensor: ...

    def push(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class MoveResult:
    """x: (n, ...) moved frames (detached); step_size: the adapted leapfrog step (units of q) after the
    last transition; accept_rate: mean acceptance; energy_evals: energy(+gradient) evaluations."""

    x: torch.Tensor
    step_size: float
    accept_rate: float
    energy_evals: int


def boltzmann_log_prob(coords: CoordinateMap, energy: EnergyFn) -> Callable[[torch.Tensor], torch.Tensor]:
    """``q: (n, dim) -> log pi(q): (n,)`` = ``-u(x(q)) + log|det dx/dq|`` (module docstring); -inf where
    not finite. Differentiable w.r.t. q."""

    def log_pi(q: torch.Tensor) -> torch.Tensor:
        x, ld = coords.push(q)
        val = ld - energy(x).to(ld.dtype)
        return torch.where(torch.isfinite(val), val, torch.full_like(val, -math.inf))

    return log_pi


def hmc_move(x: torch.Tensor, coords: CoordinateMap, energy: EnergyFn, steps: int, step_size: float,
             n_leapfrog: int = 5, target_accept: float = 0.65, batch_size: int = 5000,
             generator: torch.Generator | None = None) -> MoveResult:
    """``steps`` HMC transitions of every frame of ``x: (n, ...)`` (nm) on :func:`boltzmann_log_prob`, in
    chunks of ``batch_size`` chains. After each transition the step size is multiplied by 1.1 / 0.9 when the
    chunk's acceptance is above / below ``target_accept`` and carries over to the next chunk. Returns the
    frames ``push(q)`` of the final states (one per input frame, in order)."""
    if steps < 0 or n_leapfrog < 1 or batch_size < 1:
        raise InputError(f"HMC moves need steps >= 0, n_leapfrog >= 1, batch_size >= 1; got {steps}, {n_leapfrog}, {batch_size}")
    if not step_size > 0:
        raise InputError(f"HMC move step size must be > 0, got {step_size}")
    if steps == 0 or x.shape[0] == 0:
        return MoveResult(x=x.detach(), step_size=float(step_size), accept_rate=float("nan"), energy_evals=0)
    log_pi = boltzmann_log_prob(coords, energy)
    circ = coords.circular

    def wrap(q: torch.Tensor) -> torch.Tensor:
        return wrap_periodic(q, circ.to(q.device))

    eps = float(step_size)
    out, rates, evals = [], [], 0
    for s in range(0, x.shape[0], batch_size):
        with torch.no_grad():
            q = coords.pull(x[s:s + batch_size].detach())
        m = q.shape[0]
        current = None
        for _ in range(steps):
            res = hmc_step(q, log_pi, eps, n_leapfrog, generator, current=current, wrap=wrap)
            evals += res.n_evals * m
            q = res.x
            current = (res.log_prob, res.grad) if res.grad is not None else None
            rates.append(res.accept_rate)
            eps *= 1.1 if res.accept_rate > target_accept else 0.9
        with torch.no_grad():
            out.append(coords.push(q)[0].to(x.dtype))
    return MoveResult(x=torch.cat(out), step_size=eps, accept_rate=sum(rates) / len(rates), energy_evals=evals)


__all__ = ["CoordinateMap", "MoveResult", "boltzmann_log_prob", "hmc_move"]
