"""Hamiltonian Monte Carlo on batched torch tensors.

Each row of ``x`` is an independent chain. ``x`` may be flat ``(batch, dim)`` or molecular
``(batch, n_atoms, 3)`` (nm); the log density ``log_prob(x) -> (batch,)`` must be differentiable
w.r.t. ``x``. Unit mass matrix, leapfrog integration, one Metropolis test per trajectory.
Non-finite log densities or gradients reject the proposal, so chains never move to invalid states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

LogProbFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class HMCResult:
    """x: accepted states, same shape as input; log_prob: (batch,) at x; accept: (batch,) bool;
    n_evals: number of log-density evaluations per chain (gradient included); grad: d log_prob / dx at
    x (pass ``(log_prob, grad)`` as the next step's ``current`` to save an evaluation)."""

    x: torch.Tensor
    log_prob: torch.Tensor
    accept: torch.Tensor
    n_evals: int
    grad: torch.Tensor | None = None

    @property
    def accept_rate(self) -> float:
        return float(self.accept.double().mean()) if self.accept.numel() else 0.0


def log_prob_and_grad(log_prob: LogProbFn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_prob(x), d log_prob / dx)`` with both detached; ``x: (batch, ...)`` -> ((batch,), x.shape).

    Non-finite gradients are returned as they are (callers reject those chains)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        lp = log_prob(xg)
        # only finite entries contribute, so one bad chain cannot poison the others' gradients
        safe = torch.where(torch.isfinite(lp), lp, torch.zeros_like(lp))
        (g,) = torch.autograd.grad(safe.sum(), xg, allow_unused=True)
    if g is None:
        g = torch.zeros_like(x)
    return lp.detach(), g.detach()


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def hmc_step(
    x: torch.Tensor,
    log_prob: LogProbFn,
    step_size: float | torch.Tensor,
    n_leapfrog: int = 5,
    generator: torch.Generator | None = None,
    current: tuple[torch.Tensor, torch.Tensor] | None = None,
    wrap: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> HMCResult:
    """One HMC transition of every chain (``n_leapfrog = 1`` is MALA).

    x: (batch, ...) current states; step_size: scalar or (batch,) leapfrog step (units of x);
    current: optional cached ``(log_prob(x), grad)`` to save one evaluation; wrap: maps positions back
    onto a periodic domain after each drift (e.g. torsions to [-pi, pi); ``log_prob`` must be periodic
    there, so the leapfrog map stays reversible and volume-preserving).
    Returns an :class:`HMCResult`; rejected chains keep their state.
    """
    if n_leapfrog < 1:
        raise ValueError("n_leapfrog must be >= 1")
    x = x.detach()
    eps = torch.as_tensor(step_size, dtype=x.dtype, device=x.device)
    if eps.dim() == 0:
        eps = eps.expand(x.shape[0])
    eps_b = _bcast(eps, x)
    lp0, g0 = current if current is not None else log_prob_and_grad(log_prob, x)
    n_evals = 0 if current is not None else 1
    p0 = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    # leapfrog: half kick, (drift, kick) * L with the last kick halved
    p = p0 + 0.5 * eps_b * g0
    xn = x
    lp, g = lp0, g0
    for i in range(n_leapfrog):
        xn = xn + eps_b * p
        if wrap is not None:
            xn = wrap(xn)
        lp, g = log_prob_and_grad(log_prob, xn)
        n_evals += 1
        scale = 0.5 if i == n_leapfrog - 1 else 1.0
        p = p + scale * eps_b * g
    dims = tuple(range(1, x.dim()))
    h0 = -lp0 + 0.5 * p0.pow(2).sum(dims)
    h1 = -lp + 0.5 * p.pow(2).sum(dims)
    log_accept = h0 - h1
    finite = torch.isfinite(log_accept) & torch.isfinite(g.reshape(g.shape[0], -1)).all(1)
    log_u = torch.log(torch.rand(x.shape[0], generator=generator, dtype=x.dtype, device=x.device))
    accept = finite & (log_u < torch.where(finite, log_accept, torch.full_like(log_accept, -torch.inf)))
    ab = _bcast(accept, x)
    x_out = torch.where(ab, xn, x)
    lp_out = torch.where(accept, lp, lp0)
    return HMCResult(x=x_out, log_prob=lp_out, accept=accept, n_evals=n_evals, grad=torch.where(ab, g, g0))


def hmc_sample(
    x0: torch.Tensor,
    log_prob: LogProbFn,
    n_steps: int,
    step_size: float,
    n_leapfrog: int = 5,
    generator: torch.Generator | None = None,
    adapt: bool = False,
    target_accept: float = 0.65,
) -> tuple[torch.Tensor, float, float]:
    """Run ``n_steps`` HMC transitions from ``x0``; returns (x, mean acceptance, final step size).

    With ``adapt=True`` the step size is multiplied by 1.1 / 0.9 after each transition depending on
    whether the batch acceptance is above / below ``target_accept`` (use for burn-in only)."""
    x = x0.detach()
    rates = []
    for _ in range(n_steps):
        res = hmc_step(x, log_prob, step_size, n_leapfrog, generator)
        x = res.x
        rates.append(res.accept_rate)
        if adapt:
            step_size = step_size * (1.1 if res.accept_rate > target_accept else 0.9)
    return x, (sum(rates) / len(rates) if rates else 0.0), float(step_size)
