"""Shared pieces of the losses: the LossOutput record and sample statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..core.weights import kish_ess as core_kish_ess

EnergyFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LossOutput:
    """loss: scalar tensor to minimise (NaN when no sample was valid);
    metrics: diagnostics as floats (loss, u_mean, u_std, ess, log_z, n_invalid, ...);
    samples: detached generated samples ``(batch, ...)`` or None (KLz);
    log_w: ``(batch,)`` detached log importance weights ``-u - log q`` (-inf where invalid) or None;
    energy_evals: number of single-configuration energy evaluations this loss made."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    samples: torch.Tensor | None = None
    log_w: torch.Tensor | None = None
    energy_evals: int = 0


def kish_ess(log_w: torch.Tensor) -> float:
    """Kish effective sample size as a fraction of N: ``(sum w)^2 / (N sum w^2)``; -inf and NaN weights count
    as 0, no valid weight gives 0.0 (:func:`boltzflow.core.weights.kish_ess`, divided by N)."""
    n = log_w.numel()
    return core_kish_ess(log_w) / n if n else 0.0


def log_z_estimate(log_w: torch.Tensor) -> float:
    """``logsumexp(log w) - log N`` (biased low in log Z, unbiased in Z)."""
    lw = log_w.detach().double().reshape(-1)
    if lw.numel() == 0:
        return float("nan")
    return float(torch.logsumexp(lw, 0) - math.log(lw.numel()))


def sample_stats(u: torch.Tensor, log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(valid mask, log_w, metrics) for detached ``u, log_q: (batch,)``."""
    u = u.detach()
    log_q = log_q.detach()
    valid = torch.isfinite(u) & torch.isfinite(log_q)
    log_w = torch.where(valid, -u - log_q, torch.full_like(u, -math.inf))
    uv = u[valid].double()
    metrics = {
        "u_mean": float(uv.mean()) if uv.numel() else float("nan"),
        "u_std": float(uv.std()) if uv.numel() > 1 else float("nan"),
        "ess": kish_ess(log_w),
        "log_z": log_z_estimate(log_w),
        "n_invalid": float((~valid).sum()),
    }
    return valid, log_w, metrics


def nan_loss(like: torch.Tensor) -> torch.Tensor:
    """A NaN scalar (the trainer skips such steps)."""
    return torch.full((), float("nan"), dtype=like.dtype, device=like.device)
