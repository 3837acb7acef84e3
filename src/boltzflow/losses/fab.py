"""FAB: alpha = 2 divergence with annealed importance sampling (midgley2021 eq. 5, Algorithm 1).

Per step: draw x ~ p_G (detached), anneal it with AIS towards p_B (HMC transitions through
``p_G^(1-b) p_B^b``), keep detached AIS samples and log weights, and minimise
``logsumexp(log w_AIS + (-u(x_AIS) - log p_G(x_AIS))) - log N`` with only ``log p_G``
differentiated. With a :class:`~boltzflow.sampling.replay.PrioritisedReplayBuffer`, AIS samples are
stored with log weight ``log w_AIS - u - log p_G`` (so drawing proportional to the weight targets
p_B^2 / p_G) and the loss is ``-mean(log p_G)`` over a batch drawn from the buffer; drawn
weights are corrected by ``p_G,old / p_G,new`` after each step.
"""

from __future__ import annotations

import math

import torch

from ..sampling.ais import AISConfig, AnnealedImportanceSampler
from ..sampling.replay import PrioritisedReplayBuffer
from .base import EnergyFn, LossOutput, kish_ess, log_z_estimate, nan_loss, sample_stats
from .core import _detached_batch, _finish


def fab(
    gen,
    energy: EnergyFn,
    n: int,
    ais: AISConfig | AnnealedImportanceSampler | None = None,
    buffer: PrioritisedReplayBuffer | None = None,
    *,
    generator: torch.Generator | None = None,
    penalty_weight: float = 0.0,
) -> LossOutput:
    """FAB loss on ``n`` flow samples annealed by AIS.

    ais: an :class:`AISConfig` (fresh sampler, fixed step size per call) or a stateful
    :class:`AnnealedImportanceSampler` (its adapted step sizes persist across calls; the Trainer
    keeps one). buffer: optional prioritised replay buffer (see module docstring)."""
    sampler = ais if isinstance(ais, AnnealedImportanceSampler) else AnnealedImportanceSampler(ais)
    x0, log_q0, u0, pen = _detached_batch(gen, energy, n, generator, penalty_weight)
    valid0, log_w_is, metrics = sample_stats(u0, log_q0)
    res = sampler.run(x0, log_q0, gen.log_prob, energy, generator=generator, u0=u0)
    evals = n + res.energy_evals
    metrics.update({
        "ess_ais": kish_ess(res.log_w),
        "log_z_ais": log_z_estimate(res.log_w),
        "ais_accept": float(res.accept_rate),
        "ais_step_size": float(sum(sampler.step_sizes) / max(len(sampler.step_sizes), 1)),
    })
    ok = torch.isfinite(res.log_w) & torch.isfinite(res.u) & torch.isfinite(res.log_q)
    if buffer is not None:
        buffer.add(res.x[ok], (res.log_w - res.u - res.log_q)[ok], res.log_q[ok])
        metrics["buffer_length"] = float(len(buffer))
    if buffer is not None and buffer.ready:
        idx, xb, _ = buffer.sample(n, generator=generator)
        lp = gen.log_prob(xb)
        fin = torch.isfinite(lp)
        loss = -lp[fin].mean() if fin.any() else nan_loss(lp)
        buffer.adjust(idx, lp.detach())
    elif ok.any():
        lp = gen.log_prob(res.x[ok])
        loss = torch.logsumexp(res.log_w[ok] - res.u[ok] - lp, 0) - math.log(int(ok.sum()))
    else:
        loss = nan_loss(u0)
    loss = _finish(loss, pen, metrics)
    return LossOutput(loss=loss, metrics=metrics, samples=x0, log_w=log_w_is, energy_evals=evals)
