"""Stochastic normalizing flows: deterministic maps and stochastic (Langevin / Metropolis) blocks, with
the path weights that keep reweighting exact (Wu, Koehler, Noe 2020; wu2021 slides).

A path ``y_0 -> y_1 -> ... -> y_T`` starts from ``y_0 ~ p_0`` and goes through stages:

* :class:`Deterministic` ``y' = f(y)``: adds ``log|det df/dy|``;
* :class:`Stochastic` with kernel :class:`LangevinBlock` (unadjusted overdamped Langevin on an
  intermediate density rho, ``y' = y + eps grad log rho(y) + sqrt(2 eps) xi``): adds
  ``log b(y' -> y) - log f(y -> y')`` with the Gaussian forward/backward kernels
  ``-|y - y' - eps grad log rho(y')|^2 / (4 eps) + |xi|^2 / 2``;
* :class:`Stochastic` with :class:`MetropolisBlock` (MALA / HMC, reversible w.r.t. rho): adds
  ``log rho(y) - log rho(y')`` (0 on rejection).

The path log weight ``log w = log p~(y_T) - log p_0(y_0) + sum(stage terms)`` has ``E[exp(log w)] = Z``
(the normaliser of the unnormalised target p~) for any intermediate densities and step sizes, so
self-normalised averages with these weights are consistent, and the weight variance shrinks as the
stochastic blocks move the samples towards p~. :func:`latent_snf` applies this to a flow's latent space:
``y_0 ~ p_Z``, blocks on ``rho_k = p_Z^(1 - k/K) pi^(k/K)`` (pi the pulled-back target of
:mod:`.latent`), then ``x = G(y_T)``; with no blocks it is plain reweighting.

Periodic dims (``circular``) are wrapped onto ``[-pi, pi)`` after each move and the backward Langevin
kernel uses the minimum-image displacement (exact up to the wrapped Gaussian's other images, which at the
step sizes used here are beyond 20 standard deviations away).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

from ..errors import InputError
from .hmc import hmc_step, log_prob_and_grad
from .latent import EnergyFn, LatentMap, pulled_back_log_prob, wrap_periodic

LogProbFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LangevinBlock:
    """``n_steps`` unadjusted overdamped Langevin steps of size ``step_size`` (units of y squared: the
    noise is ``sqrt(2 step_size)`` per dim)."""

    step_size: float
    n_steps: int = 1

    def __post_init__(self):
        if not self.step_size > 0 or self.n_steps < 1:
            raise InputError("a Langevin block needs step_size > 0 and n_steps >= 1")


@dataclass(frozen=True)
class MetropolisBlock:
    """``n_steps`` Metropolis-adjusted transitions: HMC with ``n_leapfrog`` leapfrog steps of
    ``step_size`` (units of y); ``n_leapfrog = 1`` is MALA."""

    step_size: float
    n_steps: int = 1
    n_leapfrog: int = 1

    def __post_init__(self):
        if not self.step_size > 0 or self.n_steps < 1 or self.n_leapfrog < 1:
            raise InputError("a Metropolis block needs step_size > 0, n_steps >= 1 and n_leapfrog >= 1")


@dataclass(frozen=True)
class Deterministic:
    """A bijection stage: ``fn(y) -> (y', log|det dy'/dy|: (n,))``."""

    fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Stochastic:
    """A stochastic block on the intermediate density ``log_prob(y) -> (n,)`` (unnormalised,
    differentiable w.r.t. y)."""

    kernel: Union[LangevinBlock, MetropolisBlock]
    log_prob: LogProbFn


Stage = Union[Deterministic, Stochastic]


@dataclass(frozen=True)
class PathResult:
    """y: (n, ...) final states (detached); log_w: (n,) path log weights (-inf where a stage failed);
    log_target: (n,) the unnormalised target's log density at y; accept_rate: mean acceptance of Metropolis blocks (nan without); evals: log-density(+gradient)
    evaluations per sample in the stochastic blocks."""

    y: torch.Tensor
    log_w: torch.Tensor
    log_target: torch.Tensor
    accept_rate: float
    evals: int


def _sum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


def _langevin(y, block: LangevinBlock, log_prob: LogProbFn, generator, circular):
    """(y_T, sum of log b - log f over the steps, evaluations) of one Langevin block."""
    eps = float(block.step_size)
    lp, g = log_prob_and_grad(log_prob, y)
    evals = 1
    delta = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
    for _ in range(block.n_steps):
        xi = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
        y1 = y + eps * g + math.sqrt(2 * eps) * xi
        if circular is not None:
            y1 = wrap_periodic(y1, circular)
        lp1, g1 = log_prob_and_grad(log_prob, y1)
        evals += 1
        r = y - y1 - eps * g1
        if circular is not None:
            r = wrap_periodic(r, circular)
        step = -_sum(r * r) / (4 * eps) + 0.5 * _sum(xi * xi)
        ok = torch.isfinite(lp1) & torch.isfinite(step) & torch.isfinite(g1.reshape(y.shape[0], -1)).all(1)
        delta = torch.where(ok, delta + torch.where(ok, step, torch.zeros_like(step)), torch.full_like(delta, -math.inf))
        okb = ok.reshape(-1, *([1] * (y.dim() - 1)))
        y, lp, g = torch.where(okb, y1, y), torch.where(ok, lp1, lp), torch.where(okb, g1, g)
    return y, delta, evals


def stochastic_path(y0: torch.Tensor, log_p0: torch.Tensor, stages: Sequence[Stage], log_target: LogProbFn,
                    generator: torch.Generator | None = None, circular: torch.Tensor | None = None) -> PathResult:
    """Run ``y0: (n, ...)`` (drawn from p_0, ``log_p0 = log p_0(y0): (n,)``) through ``stages`` and return
    the final states with their path log weights towards the unnormalised ``log_target`` (module
    docstring). circular: optional ``(dim,)`` bool mask of periodic dims of flat ``(n, dim)`` states."""
    y = y0.detach()
    log_w = -log_p0.detach().to(y.dtype)
    rates: list[float] = []
    evals = 0
    for stage in stages:
        if isinstance(stage, Deterministic):
            with torch.no_grad():
                y, ld = stage.fn(y)
            log_w = log_w + ld.to(log_w.dtype)
            continue
        k = stage.kernel
        if isinstance(k, LangevinBlock):
            y, delta, n = _langevin(y, k, stage.log_prob, generator, circular)
            log_w = log_w + delta
            evals += n
            continue
        wrap = None if circular is None else (lambda t: wrap_periodic(t, circular))
        current = log_prob_and_grad(stage.log_prob, y)  # log rho(y) before the block (and its gradient)
        lp_start = current[0]
        evals += 1
        for _ in range(k.n_steps):
            res = hmc_step(y, stage.log_prob, k.step_size, k.n_leapfrog, generator, current=current, wrap=wrap)
            evals += res.n_evals
            y = res.x
            assert res.grad is not None
            current = (res.log_prob, res.grad)
            rates.append(res.accept_rate)
        # telescoping sum of log rho(y_prev) - log rho(y_next) over the block's steps
        log_w = log_w + (lp_start - current[0]).to(log_w.dtype)
    with torch.no_grad():
        lt = log_target(y).to(log_w.dtype)
    log_w = log_w + lt
    log_w = torch.where(torch.isnan(log_w), torch.full_like(log_w, -math.inf), log_w)
    return PathResult(y=y.detach(), log_w=log_w.detach(), log_target=lt.detach(),
                      accept_rate=sum(rates) / len(rates) if rates else float("nan"), evals=evals)


@dataclass(frozen=True)
class SNFSamples:
    """x: (n, ...) configurations G(y_T) (detached); log_w: (n,) path log weights towards exp(-u);
    u: (n,) reduced energies (kT); log_q: (n,) the flow's log density at x (not the path density);
    accept_rate: mean acceptance of Metropolis blocks (nan for Langevin); energy_evals: energy(+gradient)
    evaluations of the whole draw."""

    x: torch.Tensor
    log_w: torch.Tensor
    u: torch.Tensor
    log_q: torch.Tensor
    accept_rate: float
    energy_evals: int


def latent_snf(latent: LatentMap, energy: EnergyFn, n: int, blocks: int = 4, kernel: str = "langevin",
               step_size: float = 0.01, n_steps: int = 1, n_leapfrog: int = 1,
               generator: torch.Generator | None = None) -> SNFSamples:
    """``n`` samples of a flow followed by ``blocks`` stochastic blocks in its latent space on
    ``rho_k = p_Z^(1 - k/K) pi^(k/K)``, k = 1..K (kernel "langevin" or "mala"/"hmc": a Metropolis block
    with ``n_leapfrog`` leapfrog steps), each of ``n_steps`` steps of ``step_size`` (latent units).
    Returns the pushed-forward samples with exact path weights (module docstring)."""
    if kernel not in ("langevin", "mala", "hmc"):
        raise InputError(f"unknown SNF kernel {kernel!r}; choose langevin, mala or hmc")
    if n < 1 or blocks < 0:
        raise InputError("latent_snf needs n >= 1 and blocks >= 0")
    log_pi = pulled_back_log_prob(latent, energy)
    blk: LangevinBlock | MetropolisBlock = (LangevinBlock(step_size, n_steps) if kernel == "langevin" else
                                            MetropolisBlock(step_size, n_steps, 1 if kernel == "mala" else n_leapfrog))

    def rho(lam: float) -> LogProbFn:
        def f(z: torch.Tensor) -> torch.Tensor:
            return (1 - lam) * latent.base_log_prob(z).to(z.dtype) + lam * log_pi(z)

        return f

    stages = [Stochastic(blk, rho((k + 1) / blocks)) for k in range(blocks)]
    with torch.no_grad():
        z0 = latent.sample_latent(n, generator=generator)
        lp0 = latent.base_log_prob(z0)
    res = stochastic_path(z0, lp0, stages, log_pi, generator=generator, circular=latent.circular)
    with torch.no_grad():
        x, lq = latent.push(res.y)
        lq = lq.to(res.log_w.dtype)
        # u from the target term already evaluated: log pi = log p_Z - u - log q
        u = latent.base_log_prob(res.y).to(lq.dtype) - lq - res.log_target.to(lq.dtype)
    return SNFSamples(x=x.detach(), log_w=res.log_w, u=u, log_q=lq, accept_rate=res.accept_rate,
                      energy_evals=n * (res.evals + 1))
