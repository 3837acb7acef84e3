"""MCMC in a flow's latent space, on the pulled-back Boltzmann density.

A flow ``x = G(z)`` with base density ``p_Z`` and ``log q(x) = log p_Z(z) - log|det dG/dz|`` pulls the
target ``exp(-u(x))`` back to the latent space as

    log pi(z) = -u(G(z)) + log|det dG/dz| = log p_Z(z) + log w(G(z)),   log w = -u - log q,

whose normaliser is Z_B: states ``z ~ pi`` give ``x = G(z) ~ p_B`` exactly. A good flow makes pi close to
the base (a standard normal), so a local sampler with an isotropic step (MALA, HMC) mixes well there
(wu2021 slides: "MCMC in latent space"). Torsion-like latent dims are periodic (the flow's circular
splines map the circle to itself): the sampler wraps them back onto ``[-pi, pi)``.

Flows reach this module through the :class:`LatentMap` protocol (``boltzflow.flows.latent`` adapts
generators to it), so sampling never imports flows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch

from ..errors import InputError
from .hmc import hmc_step

EnergyFn = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class LatentMap(Protocol):
    """A flow seen from its latent space: ``dim`` latent dims, ``circular: (dim,)`` bool (periodic dims on
    ``[-pi, pi)``); ``sample_latent(n) -> z: (n, dim)`` from the base; ``base_log_prob(z) -> (n,)``;
    ``push(z) -> (x, log q(x))``, x the configurations the energy takes (molecules ``(n, n_atoms, 3)`` nm),
    differentiable w.r.t. z; ``wrap(z)`` maps periodic dims onto ``[-pi, pi)``."""

    dim: int
    circular: torch.Tensor

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def base_log_prob(self, z: torch.Tensor) -> torch.Tensor: ...

    def push(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def wrap(self, z: torch.Tensor) -> torch.Tensor: ...


def wrap_periodic(z: torch.Tensor, circular: torch.Tensor) -> torch.Tensor:
    """``z: (n, dim)`` with the ``circular: (dim,)`` dims mapped onto ``[-pi, pi)``."""
    if not bool(circular.any()):
        return z
    return torch.where(circular.to(z.device), torch.remainder(z + math.pi, 2 * math.pi) - math.pi, z)


def pulled_back_log_prob(latent: LatentMap, energy: EnergyFn) -> Callable[[torch.Tensor], torch.Tensor]:
    """``z: (n, dim) -> log pi(z): (n,)`` = ``log p_Z(z) - u(G(z)) - log q(G(z))`` (module docstring);
    -inf where the energy or the density is not finite. Differentiable w.r.t. z."""

    def log_pi(z: torch.Tensor) -> torch.Tensor:
        x, log_q = latent.push(z)
        u = energy(x).to(log_q.dtype)
        val = latent.base_log_prob(z).to(log_q.dtype) - u - log_q
        return torch.where(torch.isfinite(val), val, torch.full_like(val, -math.inf))

    return log_pi


@dataclass(frozen=True)
class LatentChains:
    """Output of :func:`latent_mcmc` (production steps only, all detached).

    z: (steps, chains, dim) latent states; x: (steps, chains, ...) configurations G(z); u: (steps, chains)
    reduced energies (kT); log_q: (steps, chains) flow log density at x; accept_rate: mean acceptance of
    production transitions; step_size: the (adapted) leapfrog step used in production; energy_evals:
    single-configuration energy(+gradient) evaluations of the whole run (start, burn-in, production)."""

    z: torch.Tensor
    x: torch.Tensor
    u: torch.Tensor
    log_q: torch.Tensor
    accept_rate: float
    step_size: float
    energy_evals: int


def latent_mcmc(latent: LatentMap, energy: EnergyFn, chains: int, steps: int, step_size: float = 0.1,
                n_leapfrog: int = 1, burnin: int = 50, target_accept: float = 0.6, candidates: int = 1,
                generator: torch.Generator | None = None) -> LatentChains:
    """MALA (``n_leapfrog = 1``) or HMC on the pulled-back density, ``chains`` chains of ``steps``
    recorded transitions after ``burnin`` ones.

    Each chain starts from a base draw pushed through the flow; with ``candidates = k > 1`` it starts on
    one of k draws picked with probability proportional to its importance weight (sampling-importance-
    resampling: close to stationarity for a good flow, cost k energy evaluations per chain). During
    burn-in the step size (latent units; the base is a standard normal) is multiplied by 1.1 / 0.9 after
    each transition with mean acceptance above / below ``target_accept``; production keeps it fixed, so
    the recorded chains are exact MCMC."""
    if chains < 1 or steps < 1 or burnin < 0 or candidates < 1 or n_leapfrog < 1:
        raise InputError("latent MCMC needs chains >= 1, steps >= 1, burnin >= 0, candidates >= 1, n_leapfrog >= 1")
    if not step_size > 0:
        raise InputError(f"step_size must be > 0, got {step_size}")
    log_pi = pulled_back_log_prob(latent, energy)
    with torch.no_grad():
        z = latent.sample_latent(chains * candidates, generator=generator)
        lp = log_pi(z)
    evals = chains * candidates
    if candidates > 1:
        lw = (lp - latent.base_log_prob(z)).reshape(chains, candidates)  # importance weights of the draws
        lw = torch.where(torch.isfinite(lw), lw, torch.full_like(lw, -math.inf))
        probs = torch.softmax(lw.double(), 1)
        probs = torch.where(torch.isfinite(probs), probs, torch.full_like(probs, 1.0 / candidates))
        pick = torch.multinomial(probs, 1, generator=generator).reshape(-1)
        rows = torch.arange(chains, device=z.device) * candidates + pick.to(z.device)
        z = z[rows]
    eps = float(step_size)
    zs, xs, us, lqs, rates = [], [], [], [], []
    current = None
    for t in range(burnin + steps):
        res = hmc_step(z, log_pi, eps, n_leapfrog, generator, current=current, wrap=latent.wrap)
        evals += res.n_evals * chains
        z = res.x
        current = (res.log_prob, res.grad) if res.grad is not None else None
        if t < burnin:
            eps *= 1.1 if res.accept_rate > target_accept else 0.9
            continue
        rates.append(res.accept_rate)
        with torch.no_grad():  # the flow again, not the energy: u = log p_Z - log q - log pi
            x, lq = latent.push(z)
            u = latent.base_log_prob(z).to(lq.dtype) - lq - res.log_prob.to(lq.dtype)
        zs.append(z)
        xs.append(x.detach())
        us.append(u.detach())
        lqs.append(lq.detach())
    return LatentChains(z=torch.stack(zs), x=torch.stack(xs), u=torch.stack(us), log_q=torch.stack(lqs),
                        accept_rate=sum(rates) / len(rates), step_size=eps, energy_evals=evals)
